"""ResNet-12, the backbone of MetaOptNet and FEAT (64-160-320-640 filters).

Four residual blocks, each: three 3x3 convolutions (no bias) with BatchNorm, LeakyReLU(0.1) after
the first two; a 1x1 convolution with BatchNorm as the shortcut; LeakyReLU after the sum; a 2x2
max-pool; then dropout (blocks 1-2) or DropBlock (blocks 3-4) at ``drop_rate`` in training. The
body ends with a global average pool (``avg_pool=True``, FEAT: ``[batch, 640]``) or a flatten
(MetaOptNet's miniImageNet model: ``[batch, 640 * 5 * 5]`` at 84 px), then an optional linear
``head`` sized to the number of ways (``ways=0``: the embedding network of ProtoNets and
MetaOptNet).

Names: the body is ``features`` and the last layer ``head``, as in :class:`~innerloop.models.Conv4`
(ANIL adapts ``head.*``, BOIL ``features.*``, the Baseline runs ``features`` then ``head``).
Inside ``features`` the blocks are ``layer1`` ... ``layer4``, each a one-block ``Sequential`` with
``conv1``/``bn1``/``conv2``/``bn2``/``conv3``/``bn3``/``downsample``: MetaOptNet's and FEAT's
parameter names, so their checkpoints load with :func:`~innerloop.models.load_pretrained`: FEAT's
with ``key="params", rename={"encoder.": "features."}``, MetaOptNet's (``{"embedding": ...}``, saved
from ``DataParallel``) with ``key="embedding", prefix="module.", rename={"": "features."}``.

The max-pool runs before the last LeakyReLU: LeakyReLU is strictly increasing, so
``leaky(maxpool(x)) == maxpool(leaky(x))`` exactly, gradients included, and the activation runs on a
quarter of the elements (as Conv4 does with ReLU).

BatchNorm is innerloop's :class:`~innerloop.models.BatchNorm2d`: ``track_running_stats=False``
(default) normalises every forward with its batch's statistics (the MAML protocol); ``True`` gives
the layers running statistics for the ``running`` and ``per_step`` policies of :mod:`innerloop.norm`;
``norm="none"`` removes BatchNorm (the convolutions then have biases).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from innerloop.models.layers import (
    Backbone,
    DropBlock,
    Dropout,
    GlobalAvgPool,
    Norm,
    check_drop_rate,
    check_norm,
    check_positive_int,
    norm_layer,
)

RESNET12_WIDTHS: tuple[int, int, int, int] = (64, 160, 320, 640)


class ResBlock(nn.Module):
    """One ResNet-12 block: ``[N, cin, H, W] -> [N, cout, H // 2, W // 2]``.

    Args:
        cin, cout: input and output channels.
        norm, track_running_stats: as :class:`ResNet12`.
        drop: the regulariser after the pool (``Dropout``, ``DropBlock`` or ``nn.Identity``).
    """

    def __init__(self, cin: int, cout: int, norm: Norm, track_running_stats: bool, drop: nn.Module) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
        self.bn1 = norm_layer(cout, norm, track_running_stats)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.bn2 = norm_layer(cout, norm, track_running_stats)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.bn3 = norm_layer(cout, norm, track_running_stats)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=bias), norm_layer(cout, norm, track_running_stats)
        )
        self.pool = nn.MaxPool2d(2)
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        out = out + self.downsample(x)
        # max-pool first: the same function as LeakyReLU then max-pool (strictly increasing), 4x less work
        y: Tensor = self.drop(F.leaky_relu(self.pool(out), 0.1))
        return y


class ResNet12(Backbone):
    """``[batch, C, H, W] -> [batch, ways]`` (or ``[batch, features]`` with ``ways=0``).

    Args:
        in_channels: 1 for Omniglot, 3 for miniImageNet.
        ways: output classes of the linear head; 0 for an embedding network (ProtoNets, MetaOptNet).
        widths: filters of the four blocks (64-160-320-640 in MetaOptNet and FEAT; small ones for tests).
        image_size: input height = width (28 Omniglot, 84 miniImageNet): sizes the head and
            ``out_features`` when ``avg_pool=False``. Each block halves it (floor): at least 16.
        drop_rate: dropout (blocks 1-2) and DropBlock (blocks 3-4) rate in training; 0 (default) draws
            no random numbers (MetaOptNet uses 0.1 on miniImageNet, 0 on CIFAR-FS and FC100).
        dropblock_size: DropBlock's block side (5 in MetaOptNet; a smaller map drops as one block).
        avg_pool: global average pool (``[batch, widths[3]]``) or flatten (``[batch, widths[3] * s * s]``,
            ``s = image_size // 16``).
        norm: ``batch`` (BatchNorm) or ``none``.
        track_running_stats: give the BatchNorm layers running statistics (for the ``running`` and
            ``per_step`` policies); without them every forward uses batch statistics.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ways: int = 0,
        widths: Sequence[int] = RESNET12_WIDTHS,
        image_size: int = 84,
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
        avg_pool: bool = True,
        norm: Norm = "batch",
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if len(widths) != 4 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be four integers >= 1 (e.g. (64, 160, 320, 640)), got {widths!r}.")
        check_norm(norm)
        if ways < 0 or in_channels < 1:
            raise ValueError(f"need ways >= 0 and in_channels >= 1; got {ways}, {in_channels}.")
        if image_size < 16:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 max-pools: give at least 16.")
        check_drop_rate(drop_rate)
        check_positive_int("dropblock_size", dropblock_size)
        self.widths, self.drop_rate, self.avg_pool = widths, float(drop_rate), avg_pool
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        for i, cout in enumerate(widths):
            drop: nn.Module
            if drop_rate == 0.0:
                drop = nn.Identity()
            else:
                drop = Dropout(drop_rate) if i < 2 else DropBlock(drop_rate, dropblock_size)
            layers[f"layer{i + 1}"] = nn.Sequential(ResBlock(cin, cout, norm, track_running_stats, drop))
            cin = cout
        layers["pool"] = GlobalAvgPool() if avg_pool else nn.Flatten()
        self.features = nn.Sequential(layers)
        side = image_size // 16
        self._add_head(widths[3] if avg_pool else widths[3] * side * side, ways)
        self._kaiming_init_convs("leaky_relu")  # MetaOptNet's initialisation
