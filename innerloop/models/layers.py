"""Layers with faster kernels for the channels-last layout on CPU; the same functions and
parameters as their ``torch.nn`` parents."""

from __future__ import annotations

from torch import Tensor, nn


def is_channels_last(x: Tensor) -> bool:
    """Whether the 4-D ``x`` ``[N, C, H, W]`` has channels-last strides (memory ``[N, H, W, C]``).

    Reads the strides, so it also answers inside ``torch.func.vmap`` (where
    ``is_contiguous(memory_format=...)`` is not implemented)."""
    if x.dim() != 4:
        return False
    n, c, h, w = x.shape
    s0, s1, s2, s3 = x.stride()
    return c > 1 and s1 == 1 and (w == 1 or s3 == c) and (h == 1 or s2 == w * c) and (n == 1 or s0 == h * w * c)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers, state dict and results) that normalises a
    channels-last input as the 2-D ``[N*H*W, C]`` matrix its memory already is, centred first
    when it uses batch statistics only.

    Why: on CPU, torch 2.13's 2-D kernel runs the double backward that second-order MAML takes
    through the support set faster than its channels-last 4-D kernel, and the centring keeps float32
    accuracy near the NCHW kernel's (the 4-D channels-last kernel loses digits on uncentred inputs).
    Measured in ``benchmarks/results/speed_levers_kernels.md`` and ``speed_parity*.md``. Other
    layouts take the parent's path.

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``, in the input's memory format.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        pass  # checked in forward (the parent would refuse the 2-D view)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"expected a 4-D input [N, C, H, W], got shape {tuple(input.shape)}")
        if not is_channels_last(input):
            return super().forward(input)
        n, c, h, w = input.shape
        flat = input.permute(0, 2, 3, 1).reshape(n * h * w, c)
        if self.running_mean is None:
            # Batch statistics only: centre each channel first. The result is the same function
            # (normalising with batch statistics ignores a per-channel shift, and so do its
            # derivatives), but torch's channels-last kernel sums sequentially in float32, and on an
            # uncentred input its mean and variance lose digits (tests/models/test_layers.py).
            flat = flat - flat.detach().mean(0)
        return super().forward(flat).view(n, h, w, c).permute(0, 3, 1, 2)
