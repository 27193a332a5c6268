"""torchvision's roi_align as a sparse matrix product when training on the CPU, registered as that op's CPU
autograd kernel.

torchvision's CPU backward visits one (box, channel, bin, sample) at a time on one thread: with the main job's
256 sampled boxes per step it took 28% of a CPU training step (docs/benchmarks.md, "RoIAlign on the CPU").
RoIAlign is linear in its input: output = W · input, where W holds the bilinear weight of every sample point of
every bin. As one sparse-dense product (channels innermost) torch computes it and its gradient, Wᵀ · output_grad,
with its own kernels and autograd: about 1.5x faster forward and 8x faster backward here, and no Python in the
backward graph (a Python autograd node there is freed by gloo's threads, which then take the GIL: with Python
3.11's fork bug, gh-112275, that deadlocked a DataLoader worker being forked at that moment).
Without gradients (evaluation, extraction) and on CUDA, torchvision's own kernels run.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def roi_align_as_sparse_product(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                                pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """torchvision.ops.roi_align's (boxes, C, pooled_height, pooled_width) output, differentiable in `input`.

    Follows torchvision's CPU kernel: a grid of sampling_ratio² points per bin (ceil(box size / bins) per axis
    when sampling_ratio <= 0), points outside [-1, size] count as zero, those in [-1, 0] are clamped to 0.
    """
    batch, channels, height, width = input.shape
    boxes = rois.shape[0]
    rows, columns, weights = _bilinear_weights(rois.detach().float(), height, width, spatial_scale, pooled_height,
                                               pooled_width, sampling_ratio, aligned)
    sample_weights = torch.sparse_coo_tensor(torch.stack([rows, columns]), weights,
                                             (boxes * pooled_height * pooled_width, batch * height * width),
                                             check_invariants=True)
    pixels_by_channel = input.float().permute(0, 2, 3, 1).reshape(-1, channels)  # a view for channels_last
    bins_by_channel = torch.sparse.mm(sample_weights, pixels_by_channel)
    output = bins_by_channel.view(boxes, pooled_height, pooled_width, channels).permute(0, 3, 1, 2)
    return output.to(input.dtype)


def _bilinear_weights(rois: Tensor, height: int, width: int, spatial_scale: float, pooled_height: int,
                      pooled_width: int, sampling_ratio: int, aligned: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(output bin, input pixel, weight) of the four neighbours of every sample point of every box."""
    boxes = rois.shape[0]
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale - (0.5 if aligned else 0.0)).unbind(1)
    box_width, box_height = x2 - x1, y2 - y1
    if not aligned:  # torchvision's legacy mode: boxes at least one feature-map pixel wide
        box_width, box_height = box_width.clamp(min=1.0), box_height.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_height = grid_width = torch.full((boxes,), sampling_ratio)
    else:  # adaptive: about one sample per feature-map pixel
        grid_height, grid_width = (box_height / pooled_height).ceil().long(), (box_width / pooled_width).ceil().long()
    most_y = max(int(grid_height.max()), 1) if boxes else 1
    most_x = max(int(grid_width.max()), 1) if boxes else 1
    used_y, ys = _sample_points(y1, box_height, pooled_height, grid_height, most_y)
    used_x, xs = _sample_points(x1, box_width, pooled_width, grid_width, most_x)
    inside_y, y_low, y_high, y_frac = _neighbours(ys, height)
    inside_x, x_low, x_high, x_frac = _neighbours(xs, width)

    # broadcast to (box, bin row, sample row, bin column, sample column)
    def along_y(t: Tensor) -> Tensor:
        return t.view(boxes, pooled_height, most_y, 1, 1)

    def along_x(t: Tensor) -> Tensor:
        return t.view(boxes, 1, 1, pooled_width, most_x)

    shape = (boxes, pooled_height, most_y, pooled_width, most_x)
    samples_per_bin = (grid_height * grid_width).clamp(min=1).view(boxes, 1, 1, 1, 1)
    share = (along_y(used_y & inside_y) & along_x(used_x & inside_x)).float() / samples_per_bin
    first_pixel = (rois[:, 0].long() * height * width).view(boxes, 1, 1, 1, 1)
    columns, weights = [], []
    for y, y_weight in ((y_low, 1 - y_frac), (y_high, y_frac)):
        for x, x_weight in ((x_low, 1 - x_frac), (x_high, x_frac)):
            columns.append((first_pixel + along_y(y) * width + along_x(x)).expand(shape))
            weights.append((along_y(y_weight) * along_x(x_weight) * share).expand(shape))
    bins = torch.arange(boxes * pooled_height * pooled_width).view(boxes, pooled_height, 1, pooled_width, 1)
    rows = bins.expand(shape).reshape(1, -1).expand(4, -1)
    return rows.reshape(-1), torch.stack(columns).reshape(-1), torch.stack(weights).reshape(-1)


def _sample_points(start: Tensor, length: Tensor, bins: int, grid: Tensor, most: int) -> tuple[Tensor, Tensor]:
    """(used, position), both (boxes, bins * most): the centres of a `grid`-point grid in each of `bins` equal
    bins of every box, padded to `most` points per bin (the padding is not used)."""
    point = torch.arange(most).view(1, 1, most)
    used = (point < grid.view(-1, 1, 1)).expand(-1, bins, -1)
    offsets = torch.arange(bins).view(1, bins, 1) + (point + 0.5) / grid.clamp(min=1).view(-1, 1, 1)
    positions = start.view(-1, 1, 1) + offsets * (length / bins).view(-1, 1, 1)
    return used.reshape(len(start), bins * most), positions.reshape(len(start), bins * most)


def _neighbours(points: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(inside, low index, high index, weight of the high one) of points on an axis of `size` pixels."""
    inside = (points >= -1.0) & (points <= size)
    points = points.clamp(min=0.0)
    low = points.floor().long()
    at_end = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(points), points - low)
    return inside, low, high, frac


def _roi_align_cpu(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                   sampling_ratio: int, aligned: bool) -> Tensor:
    """torchvision::roi_align on the CPU: the sparse product where a gradient is wanted, else torchvision's."""
    if torch.is_grad_enabled() and input.requires_grad:
        return roi_align_as_sparse_product(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                           aligned)
    with torch._C._AutoDispatchBelowAutograd():  # torchvision's CPU kernel, not this one again
        return torch.ops.torchvision.roi_align(input, rois, spatial_scale, pooled_height, pooled_width,
                                               sampling_ratio, aligned)


@functools.cache
def use_sparse_roi_align() -> torch.library.Library:
    """Make roi_align_as_sparse_product torchvision::roi_align's CPU kernel where gradients are needed, for the
    rest of the process (once). Returns the registration, which lasts while referenced (the cache keeps it)."""
    import torchvision  # noqa: F401  (defines the torchvision:: ops)

    library = torch.library.Library("torchvision", "IMPL")
    library.impl("roi_align", _roi_align_cpu, "AutogradCPU")
    return library
