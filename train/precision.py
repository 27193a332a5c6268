"""The autocast precisions a run trains and evaluates in (`train.amp`), and the layers kept out of bf16 on the CPU."""

import torch
from torch import nn

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Float32Conv2d(nn.Conv2d):
    """A Conv2d that computes in float32 inside autocast (and returns float32; the next layer casts again)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input.float())


def depthwise_convs_in_float32(model: nn.Module) -> int:
    """Make every depthwise Conv2d (one group per input channel) of `model` a Float32Conv2d, with the same
    parameters, names and state dict; returns how many. For bf16 autocast on the CPU: oneDNN's bf16 depthwise
    kernels ran forward and backward 2-10x slower than float32 ones on AVX-512 BF16 for the shapes of the demo's
    MobileNet-v3 (docs/benchmarks.md), while its dense convolutions and matrix products gain from bf16."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d and child.groups > 1 and child.groups == child.in_channels:
                setattr(parent, name, _as_float32_conv(child))
                replaced += 1
    return replaced


def _as_float32_conv(conv: nn.Conv2d) -> Float32Conv2d:
    float32_conv = Float32Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                 conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                                 device="meta")
    float32_conv.weight = conv.weight
    float32_conv.bias = conv.bias
    return float32_conv.train(conv.training)
