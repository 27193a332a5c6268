"""RoIAlign as a sparse product (train/roi_align.py) against torchvision's own CPU kernels, forward and backward,
and the registration that makes CPU training use it."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from train.roi_align import roi_align_as_sparse_product, use_sparse_roi_align

ROOT = Path(__file__).resolve().parents[1]


def torchvisions_roi_align(input, rois, spatial_scale, pooled_size, sampling_ratio, aligned, grad_output):
    """torchvision's CPU forward and its backward kernel's input gradient for `grad_output`."""
    with torch.no_grad():  # torchvision's kernel, registered or not
        output = torch.ops.torchvision.roi_align(input, rois, spatial_scale, *pooled_size, sampling_ratio, aligned)
    batch, channels, height, width = input.shape
    grad = torch.ops.torchvision._roi_align_backward(grad_output, rois, spatial_scale, *pooled_size, batch, channels,
                                                     height, width, sampling_ratio, aligned)
    return output, grad


def boxes_with_edge_cases(count: int, image_size: float, generator: torch.Generator) -> torch.Tensor:
    """(count + 4, 5) rois: random boxes, some reaching past every edge, plus tiny, line and outside ones."""
    corners = torch.rand(count, 2, generator=generator) * image_size * 1.2 - image_size * 0.1
    sizes = 0.5 + torch.rand(count, 2, generator=generator) * image_size * 0.6
    special = torch.tensor([[3.0, 3.0, 3.2, 3.1],                            # far below one feature pixel
                            [10.0, 5.0, 10.0, 40.0],                          # zero width
                            [image_size + 30, 2.0, image_size + 60, 20.0],    # outside the image
                            [-50.0, -50.0, -20.0, -30.0]])                    # outside, before the origin
    boxes = torch.cat([torch.cat([corners, corners + sizes], 1), special])
    images = torch.randint(0, 3, (len(boxes), 1), generator=generator).float()
    return torch.cat([images, boxes], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("map_size", [(8, 8), (13, 21)])
def test_sparse_product_equals_torchvisions_kernels(aligned, sampling_ratio, map_size):
    generator = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    input = torch.randn(3, 5, *map_size, generator=generator).requires_grad_()
    spatial_scale = map_size[0] / 128
    rois = boxes_with_edge_cases(40, 128.0, generator)
    grad_output = torch.randn(len(rois), 5, 7, 6, generator=generator)

    output = roi_align_as_sparse_product(input, rois, spatial_scale, 7, 6, sampling_ratio, aligned)
    output.backward(grad_output)
    expected_output, expected_grad = torchvisions_roi_align(input, rois, spatial_scale, (7, 6), sampling_ratio,
                                                            aligned, grad_output)

    assert expected_output.abs().sum() > 0 and expected_grad.abs().sum() > 0
    torch.testing.assert_close(output, expected_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(input.grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_no_boxes_give_an_empty_output_and_a_zero_gradient():
    input = torch.randn(2, 4, 8, 8, requires_grad=True)
    output = roi_align_as_sparse_product(input, torch.zeros(0, 5), 0.25, 7, 7, 2, False)
    output.sum().backward()
    assert output.shape == (0, 4, 7, 7) and input.grad.shape == input.shape and not input.grad.any()


def test_registered_kernel_serves_torchvisions_pooler_in_training_only():
    use_sparse_roi_align()
    use_sparse_roi_align()  # a second call registers nothing more
    generator = torch.Generator().manual_seed(0)
    features = {"0": torch.randn(2, 4, 16, 16, generator=generator).requires_grad_(),
                "1": torch.randn(2, 4, 8, 8, generator=generator).requires_grad_()}
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 50.0], [60.0, 10.0, 120.0, 100.0]]), torch.tensor([[0.0, 0.0, 8.0, 9.0]])]
    pooler = MultiScaleRoIAlign(["0", "1"], output_size=7, sampling_ratio=2)
    with torch.no_grad():
        evaluated = pooler(features, boxes, [(128, 128), (128, 128)])
    pooled = pooler(features, boxes, [(128, 128), (128, 128)])
    assert pooled.grad_fn.name() != "GeneratedBackwardFor_torchvision_roi_align_defaultBackward"
    grad_output = torch.randn(pooled.shape, generator=generator)
    pooled.backward(grad_output)

    torch.testing.assert_close(pooled, evaluated, rtol=1e-5, atol=1e-5)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    levels = pooler.map_levels(boxes)
    for level, name in enumerate(["0", "1"]):
        chosen = levels == level
        scale = features[name].shape[-1] / 128
        _, expected = torchvisions_roi_align(features[name], rois[chosen], scale, (7, 7), 2, False,
                                             grad_output[chosen])
        torch.testing.assert_close(features[name].grad, expected, rtol=1e-5, atol=1e-5)


def test_cpu_training_registers_it_and_nothing_else_does(small_manifest, tmp_path):
    """In a fresh process: torchvision's kernel until a CPU training run, the sparse product after it."""
    script = textwrap.dedent(f"""
        import torch
        from torchvision.ops import roi_align
        from train.main import main

        def gradient_kind():
            pooled = roi_align(torch.rand(1, 2, 8, 8, requires_grad=True), torch.tensor([[0.0, 1, 1, 6, 6]]), 3,
                               sampling_ratio=2)
            return pooled.grad_fn.name()

        before = gradient_kind()
        assert main(["data.manifest={small_manifest}", "run_dir={tmp_path}", "strategy=single", "wandb.mode=disabled",
                     "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.min_size=96", "model.max_size=128",
                     "data.batch_size=2", "data.num_workers=0", "train.max_steps=1", "eval.every_epochs=0",
                     "eval.test_at_end=false"]) == 0
        print(before, gradient_kind())
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torchvisions, ours = result.stdout.split()[-2:]
    assert torchvisions.startswith("GeneratedBackwardFor_torchvision_roi_align") and ours == "PermuteBackward0"
