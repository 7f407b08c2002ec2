"""Layers of innerloop's backbones: a BatchNorm with faster kernels for the channels-last layout on
CPU (the same function and parameters as its ``torch.nn`` parent), and the random regularisers of
ResNet-12 and WRN (dropout, DropBlock) as pure functions of torch's generator that refuse ``vmap``
clearly; and what the backbones share: :class:`Backbone` (a body ``features`` and an optional linear
``head``), :func:`norm_layer` and the checks of their common arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["batch", "none"]


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


def norm_layer(channels: int, norm: Norm, track: bool) -> nn.Module:
    """A :class:`BatchNorm2d` over ``channels`` (with running statistics when ``track``) for
    ``norm="batch"``, the identity for ``"none"``."""
    return BatchNorm2d(channels, track_running_stats=track) if norm == "batch" else nn.Identity()


def check_norm(norm: str) -> None:
    """Refuse a ``norm`` other than ``"batch"`` and ``"none"``."""
    if norm not in ("batch", "none"):
        raise ValueError(f"unknown norm {norm!r}; choose 'batch' or 'none'.")


def check_drop_rate(drop_rate: float) -> None:
    """Refuse a ``drop_rate`` outside ``[0, 1)``."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must lie in [0, 1), got {drop_rate!r}.")


def check_positive_int(name: str, value: object) -> None:
    """Refuse ``value`` (the argument ``name``) unless it is an integer >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


class Backbone(nn.Module):
    """``[batch, C, H, W] -> [batch, ways]``: a body ``features`` (``[batch, C, H, W] ->
    [batch, out_features]``) then a linear ``head``, or the features themselves when the head is None
    (``ways = 0``: an embedding network). The names ``features`` and ``head`` are what ANIL, BOIL and
    the Baseline address. A subclass builds ``self.features`` in its ``__init__``, then calls
    :meth:`_add_head`.
    """

    features: nn.Module
    out_features: int
    head: nn.Linear | None

    def _add_head(self, out_features: int, ways: int) -> None:
        """Set ``out_features`` and a linear head to ``ways`` outputs (none when ``ways == 0``)."""
        self.out_features = out_features
        self.head = nn.Linear(out_features, ways) if ways > 0 else None

    def _kaiming_init_convs(self, nonlinearity: Literal["relu", "leaky_relu"]) -> None:
        """Re-draw every convolution's weight with He initialisation (``fan_out``), as ResNets do."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)

    def forward(self, x: Tensor) -> Tensor:
        z: Tensor = self.features(x)
        if self.head is None:
            return z
        y: Tensor = self.head(z)
        return y


def _random_mask(draw: Callable[[], Tensor], layer: str) -> Tensor:
    """``draw()``, with torch.func's refusal of a random op under ``vmap`` turned into one that names
    the way out (vmap's default ``randomness="error"``, which :mod:`innerloop.execution` keeps)."""
    try:
        return draw()
    except RuntimeError as err:
        if "randomness" not in str(err):
            raise
        raise ValueError(
            f"{layer} draws a random mask in training, which vmap over tasks refuses (torch.func's "
            "randomness='error'); run the meta-batch as a loop (Execution(vectorize='auto') or 'loop'), "
            "set drop_rate=0, or call model.eval()."
        ) from err


class Dropout(nn.Module):
    """Element-wise dropout (as ``torch.nn.functional.dropout``): in training, each element is zeroed with
    probability ``drop_rate`` and the rest scaled by ``1 / (1 - drop_rate)``; the identity in eval mode
    or with ``drop_rate = 0``. Draws from torch's default generator (``torch.manual_seed``), so a
    checkpointed inner step (``torch.utils.checkpoint`` restores the generator) recomputes the same
    mask. Under ``vmap`` it refuses with the way out instead of torch.func's bare error.

    Shapes: ``[N, ...] -> [N, ...]``.
    """

    def __init__(self, drop_rate: float = 0.0) -> None:
        super().__init__()
        check_drop_rate(drop_rate)
        self.drop_rate = float(drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        # the mask from torch.rand, not F.dropout: F.dropout's kernel under torch.func.grad draws other
        # masks than under torch.autograd, so the inner loop's differentiation modes would disagree
        draw = _random_mask(lambda: torch.rand(x.shape, dtype=x.dtype, device=x.device), "Dropout")
        return x * draw.ge(self.drop_rate).to(x.dtype) / (1.0 - self.drop_rate)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}"


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., 2018) as MetaOptNet's ResNet-12 applies it: in training, squares of
    ``block_size x block_size`` around random seeds are zeroed in every channel map, and the output is
    rescaled by ``elements / kept elements`` (of the whole batch); the identity in eval mode or with
    ``drop_rate = 0``.

    Seeds fall with probability ``gamma = drop_rate / b**2 * (H * W) / ((H - b + 1) * (W - b + 1))``
    on the ``(H - b + 1) x (W - b + 1)`` positions where a whole block fits (``b = min(block_size, H,
    W)``: a map smaller than the block is dropped as one block), so about ``drop_rate`` of the elements
    are dropped. MetaOptNet ramps the rate up over its first 40,000 forwards from a counter kept in the
    module; here the rate is fixed (a forward changes no state, as :mod:`innerloop.norm` requires).

    Random state: torch's default generator (``torch.manual_seed``); a checkpointed inner step
    recomputes the same mask (``torch.utils.checkpoint`` restores the generator). Under ``vmap`` it
    refuses with the way out. With several task threads the masks depend on the threads' order.

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``.
    """

    def __init__(self, drop_rate: float = 0.0, block_size: int = 5) -> None:
        super().__init__()
        check_drop_rate(drop_rate)
        check_positive_int("block_size", block_size)
        self.drop_rate = float(drop_rate)
        self.block_size = block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0.0:
            return x
        if x.dim() != 4:
            raise ValueError(f"DropBlock expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        b = min(self.block_size, h, w)
        gamma = self.drop_rate / b**2 * (h * w) / ((h - b + 1) * (w - b + 1))
        seeds = _random_mask(
            lambda: torch.rand(n, c, h - b + 1, w - b + 1, dtype=x.dtype, device=x.device), "DropBlock",
        ).lt(gamma).to(x.dtype)
        # a seed at (i, j) drops [i, i + b) x [j, j + b): a max over the b x b window ending at each element
        dropped = F.max_pool2d(F.pad(seeds, (b - 1, b - 1, b - 1, b - 1)), b, stride=1) if b > 1 else seeds
        keep = 1.0 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"


class GlobalAvgPool(nn.Module):
    """The mean over the spatial dimensions: ``[N, C, H, W] -> [N, C]``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))
