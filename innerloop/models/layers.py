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
    channels-last input as the 2-D ``[N*H*W, C]`` matrix its memory already is.

    The 2-D kernels of torch 2.13 are faster on CPU than its channels-last 4-D ones: on a
    ``[75, 64, 28, 28]`` tensor, forward + backward 6.7 ms against 9.4 ms, and the double backward
    that second-order MAML runs through the support pass 2x faster (``benchmarks/speed``,
    notes). Other layouts take the parent's path.

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``, in the input's memory format.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected a 4-D input [N, C, H, W], got shape {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        if not is_channels_last(input):
            if input.dim() != 4:
                raise ValueError(f"expected a 4-D input [N, C, H, W], got shape {tuple(input.shape)}")
            return super().forward(input)
        n, c, h, w = input.shape
        flat = input.permute(0, 2, 3, 1).reshape(n * h * w, c)
        if self.running_mean is None:
            # Batch statistics only: centre each channel first. The result is the same function
            # (normalising with batch statistics ignores a per-channel shift, and so do its
            # derivatives), but torch's channels-last kernel sums sequentially in float32, and on an
            # uncentred input its mean and variance lose digits: 1e-4 relative error on a
            # [75, 64, 28, 28] input with mean 30x its std, 4e-6 centred (NCHW: 1e-6).
            flat = flat - flat.detach().mean(0)
        return super().forward(flat).view(n, h, w, c).permute(0, 3, 1, 2)
