"""WRN-28-10, the wide residual network of few-shot papers (LEO, S2M2, Baseline++ follow-ups).

Zagoruyko and Komodakis's WideResNet (2016): a 3x3 convolution to 16 filters, then three groups of
``(depth - 4) / 6`` pre-activation blocks with ``16 * widen``, ``32 * widen`` and ``64 * widen``
filters (strides 1, 2, 2), BatchNorm and ReLU, and a global average pool: ``[batch, 640]`` for
WRN-28-10 at any input size. Each block: BatchNorm-ReLU-conv3x3, BatchNorm-ReLU, dropout at
``drop_rate`` (training only), conv3x3, plus the identity (or, where the width or stride changes, a
1x1 convolution of the pre-activated input). An optional linear ``head`` follows (``ways=0``: an
embedding network).

Names: the body is ``features`` and the last layer ``head``, as in :class:`~innerloop.models.Conv4`;
inside ``features`` the names are the reference implementation's (``conv1``, ``block1.layer.0.bn1``,
..., ``convShortcut``, ``bn1``), so its state dicts load with ``rename={"module.": "features."}``
(:func:`~innerloop.models.load_pretrained`).

BatchNorm is innerloop's :class:`~innerloop.models.BatchNorm2d`, with the policies of
:mod:`innerloop.norm` (``track_running_stats`` as in :class:`~innerloop.models.ResNet12`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from innerloop.models.layers import (
    Backbone,
    Dropout,
    GlobalAvgPool,
    Norm,
    check_drop_rate,
    check_norm,
    check_positive_int,
    norm_layer,
)


class WideBlock(nn.Module):
    """One pre-activation block: ``[N, cin, H, W] -> [N, cout, H / stride, W / stride]`` (ceil)."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float, norm: Norm, track: bool) -> None:
        super().__init__()
        self.bn1 = norm_layer(cin, norm, track)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(cout, norm, track)
        self.drop = Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.convShortcut = (None if cin == cout and stride == 1 else
                             nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        out: Tensor = self.conv2(self.drop(F.relu(self.bn2(self.conv1(a)))))
        shortcut: Tensor = x if self.convShortcut is None else self.convShortcut(a)
        return out + shortcut


class _Group(nn.Module):
    def __init__(self, blocks: int, cin: int, cout: int, stride: int, drop_rate: float, norm: Norm,
                 track: bool) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                               drop_rate, norm, track) for i in range(blocks)])

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.layer(x)
        return y


class WRN28_10(Backbone):  # noqa: N801  (the network's name in the papers)
    """``[batch, C, H, W] -> [batch, ways]`` (or ``[batch, 64 * widen]`` with ``ways=0``).

    Args:
        in_channels: 1 for Omniglot, 3 for miniImageNet.
        ways: output classes of the linear head; 0 for an embedding network.
        depth: 28 (WRN-28-10); any ``6 n + 4 >= 10`` (10: one block per group, for tests).
        widen: width multiplier (10); ``out_features = 64 * widen``.
        drop_rate: dropout between a block's convolutions, in training (0: no random numbers).
        norm: ``batch`` (BatchNorm) or ``none``.
        track_running_stats: give the BatchNorm layers running statistics (``running``, ``per_step``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        ways: int = 0,
        depth: int = 28,
        widen: int = 10,
        drop_rate: float = 0.0,
        norm: Norm = "batch",
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth!r}.")
        check_positive_int("widen", widen)
        check_norm(norm)
        if ways < 0 or in_channels < 1:
            raise ValueError(f"need ways >= 0 and in_channels >= 1; got {ways}, {in_channels}.")
        check_drop_rate(drop_rate)
        n = (depth - 4) // 6
        c = (16, 16 * widen, 32 * widen, 64 * widen)
        self.depth, self.widen, self.drop_rate = depth, widen, float(drop_rate)
        track = track_running_stats
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, c[0], 3, padding=1, bias=False)),
            ("block1", _Group(n, c[0], c[1], 1, drop_rate, norm, track)),
            ("block2", _Group(n, c[1], c[2], 2, drop_rate, norm, track)),
            ("block3", _Group(n, c[2], c[3], 2, drop_rate, norm, track)),
            ("bn1", norm_layer(c[3], norm, track)),
            ("relu", nn.ReLU()),
            ("pool", GlobalAvgPool()),
        ]))
        self._add_head(c[3], ways)
        self._kaiming_init_convs("relu")  # the reference implementation's initialisation
