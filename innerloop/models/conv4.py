"""The conv-4 backbone of the MAML and Prototypical Networks papers.

Four blocks of 3x3 convolution (``hidden`` filters), BatchNorm, ReLU and 2x2 down-sampling
(max-pool, or stride 2 as in MAML's Omniglot model), then a linear ``head`` sized to the number
of ways. ``head=None`` (``ways=0``) gives the embedding network of ProtoNets.

With max-pool, a block applies the pool before the ReLU: ``relu(maxpool(x)) == maxpool(relu(x))``
exactly (ReLU is monotone), gradients included, and the ReLU then runs on a quarter of the
elements (measured in ``benchmarks/speed``). The parameter names are those of the usual order.

BatchNorm: by default the layers are built with ``track_running_stats=False``, so every forward
pass normalises with the statistics of the batch it is given. This is the MAML protocol
("transductive"): at test time the query set of a task is normalised with its own statistics.
``track_running_stats=True`` gives the layers running statistics, for the algorithms'
non-transductive policies (``batch_norm = "running"`` or MAML++'s ``"per_step"``,
:mod:`innerloop.norm`); ``norm="none"`` removes BatchNorm altogether. Every reported number says
which it used.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from innerloop.models.layers import Backbone, BatchNorm2d, Norm, check_norm

Pool = Literal["max", "stride"]


def _block(cin: int, cout: int, pool: Pool, norm: Norm, track: bool) -> nn.Sequential:
    stride = 2 if pool == "stride" else 1
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1)]
    if norm == "batch":
        layers.append(BatchNorm2d(cout, track_running_stats=track))
    # Max-pool first: the same function as ReLU then max-pool, with 4x less ReLU work.
    layers += [nn.MaxPool2d(2), nn.ReLU()] if pool == "max" else [nn.ReLU()]
    return nn.Sequential(*layers)


class Conv4(Backbone):
    """``[batch, C, H, W] -> [batch, ways]`` (or ``[batch, features]`` with ``ways=0``).

    Args:
        in_channels: 1 for Omniglot, 3 for miniImageNet.
        ways: output classes of the linear head; 0 for an embedding network (ProtoNets).
        hidden: filters per block: 64 (Omniglot), 32 (MAML's miniImageNet model).
        image_size: input height = width, to size the head (28 Omniglot, 84 miniImageNet).
        pool: ``max`` (2x2 max-pool after each block) or ``stride`` (stride-2 convolutions).
        norm: ``batch`` (BatchNorm) or ``none``.
        track_running_stats: give the BatchNorm layers running statistics (for the ``running`` and
            ``per_step`` policies); without them every forward uses batch statistics.
    """

    def __init__(
        self,
        in_channels: int = 1,
        ways: int = 5,
        hidden: int = 64,
        image_size: int = 28,
        pool: Pool = "max",
        norm: Norm = "batch",
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        if pool not in ("max", "stride"):
            raise ValueError(f"unknown pool {pool!r}; choose 'max' or 'stride'.")
        check_norm(norm)
        if ways < 0 or hidden < 1 or in_channels < 1:
            raise ValueError(
                f"need ways >= 0, hidden >= 1, in_channels >= 1; got {ways}, {hidden}, {in_channels}."
            )
        self.features = nn.Sequential(
            *[_block(in_channels if i == 0 else hidden, hidden, pool, norm, track_running_stats)
              for i in range(4)],
            nn.Flatten(),
        )
        size = image_size
        for _ in range(4):
            size = (size + 1) // 2 if pool == "stride" else size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for four down-sampling blocks.")
        self._add_head(hidden * size * size, ways)
