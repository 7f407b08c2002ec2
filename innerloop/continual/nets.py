"""The networks of online meta-learning: OML's RLN + PLN and ANML's neuromodulated prediction network.

Both take images ``[n, C, H, W]`` and return logits ``[n, classes]``, and both name the parts the
continual learners need:

* ``train_adapt``: glob patterns of the parameters the meta-training inner loop adapts;
* ``test_head``: the submodule trained online at meta-test time (on the frozen ``embed`` features);
* ``out_name``: the output ``nn.Linear`` whose rows are reset for the classes of a trajectory.

Sizes (the papers': OML, Javed & White 2019, an RLN of 6 conv layers of 256 channels on 84 x 84
images and a PLN of 2 linear layers; ANML, Beaulieu et al. 2020, 3 conv layers of 256 channels in
the prediction network and a narrower NM network on 28 x 28 images, BatchNorm after each conv)
are arguments; the benchmark states what it uses.

Normalisation is per image (``ANMLNet(norm=True)``, the default): a ``GroupNorm`` with one group per
channel after each convolution, i.e. instance normalisation with a learned scale and shift. That is
what the ANML code's BatchNorm computes, since its forward runs BatchNorm in training mode on one
image at a time; it has no batch statistics and no buffers (the nets stay pure functions of their
parameters, the same on one image as on a batch), and ``native_group_norm`` has a correct
second-order gradient under ``vmap`` (:data:`innerloop.execution.UNSAFE_UNDER_VMAP`). Without it,
ANML's inner loop does not learn (``benchmarks/results/continual_omniglot.md``). OML's network has
none, as in the OML code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ANMLNet", "OMLNet", "conv_stack"]


def conv_stack(in_channels: int, channels: Sequence[int], image_size: int,
               norm: bool = False) -> tuple[nn.Sequential, int]:
    """3 x 3 valid convolutions with ReLU, a 2 x 2 max-pool after every one but the last (ANML's
    layout: 28 px -> 26 -> 13 -> 11 -> 5 -> 3), then a flatten.

    Args:
        norm: a per-image normalisation between each convolution and its ReLU (``GroupNorm`` with
            one group per channel: instance normalisation with a learned per-channel scale and
            shift; no batch statistics). Every conv output map must then hold more than one pixel.

    Returns:
        ``(stack, features)``: the module (``[n, C, H, W] -> [n, features]``) and its output width.
    """
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"conv channels must be a non-empty list of positive widths, got {list(channels)}.")
    layers: list[nn.Module] = []
    side, c_in = image_size, in_channels
    for i, c in enumerate(channels):
        side -= 2
        if side < 1:
            raise ValueError(f"{len(channels)} conv layers do not fit {image_size} px images; use fewer layers "
                             "or larger images.")
        if norm and side < 2:
            raise ValueError(f"conv layer {i + 1} of {len(channels)} outputs 1 x 1 maps on {image_size} px "
                             "images, which per-image normalisation maps to a constant; use larger images, fewer "
                             "layers or norm=False.")
        layers += [nn.Conv2d(c_in, c, 3), *([nn.GroupNorm(c, c)] if norm else []), nn.ReLU()]
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
            side //= 2
            if side < 1:
                raise ValueError(f"{len(channels)} conv layers do not fit {image_size} px images; use fewer "
                                 "layers or larger images.")
        c_in = c
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), c_in * side * side


class _PLN(nn.Module):
    """``features -> [hidden ->] classes``: OML's prediction learning network."""

    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(features, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.out = nn.Linear(hidden or features, classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.out(self.hidden(x))
        return out


class OMLNet(nn.Module):
    """OML's network: a representation learning network ``rln`` (convolutions, meta-learned in the
    outer loop only) and a prediction learning network ``pln`` (``hidden`` ReLU units, 0 for none,
    then the output layer ``pln.out``), which the inner loop adapts.

    Args:
        classes: output width (at least the number of meta-training classes).
        channels: conv widths of the RLN.
        hidden: the PLN's hidden width (0: the PLN is one linear layer).
        image_size: input side in pixels; in_channels: input channels.
    """

    train_adapt: tuple[str, ...] = ("pln.*",)
    test_head = "pln"
    out_name = "pln.out"

    def __init__(self, classes: int, channels: Sequence[int] = (256, 256, 256), hidden: int = 1024,
                 image_size: int = 28, in_channels: int = 1) -> None:
        super().__init__()
        if classes < 2 or hidden < 0:
            raise ValueError(f"need classes >= 2 and hidden >= 0, got classes={classes}, hidden={hidden}.")
        self.rln, features = conv_stack(in_channels, channels, image_size)
        self.pln = _PLN(features, hidden, classes)
        self.features = features

    def embed(self, x: Tensor) -> Tensor:
        """``[n, C, H, W] -> [n, features]``: the representation (the RLN)."""
        out: Tensor = self.rln(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.pln(self.embed(x))
        return out


class ANMLNet(nn.Module):
    """ANML's network: a prediction network (convolutions ``features`` and a linear ``head``) whose
    flattened last conv activations are multiplied elementwise by a gate in [0, 1], the sigmoid of
    a neuromodulatory network ``nm`` (convolutions and a linear layer of the same width) that sees
    the same image::

        logits = head( features(x) * sigmoid(nm(x)) )

    The NM network is meta-learned only; the meta-training inner loop adapts ``features`` (their
    normalisation's scale and shift too) and ``head``; meta-testing trains ``head`` alone (the
    paper's protocol).

    Args:
        classes: output width.
        channels: conv widths of the prediction network; nm_channels: of the NM network.
        image_size: input side in pixels; in_channels: input channels.
        norm: per-image normalisation after every convolution of both networks (see the module
            docstring; the ANML code's). ``False``: none (the first version here, which did not learn).
    """

    train_adapt: tuple[str, ...] = ("features.*", "head.*")
    test_head = "head"
    out_name = "head"

    def __init__(self, classes: int, channels: Sequence[int] = (256, 256, 256),
                 nm_channels: Sequence[int] = (128, 128, 128), image_size: int = 28, in_channels: int = 1,
                 norm: bool = True) -> None:
        super().__init__()
        if classes < 2:
            raise ValueError(f"need classes >= 2, got {classes}.")
        self.features, width = conv_stack(in_channels, channels, image_size, norm)
        nm_stack, nm_width = conv_stack(in_channels, nm_channels, image_size, norm)
        self.nm = nn.Sequential(*nm_stack, nn.Linear(nm_width, width))
        self.head = nn.Linear(width, classes)
        self.width = width

    def gate(self, x: Tensor) -> Tensor:
        """``[n, C, H, W] -> [n, width]``: the neuromodulatory gate ``sigmoid(nm(x))`` in [0, 1]."""
        return torch.sigmoid(self.nm(x))

    def embed(self, x: Tensor) -> Tensor:
        """``[n, C, H, W] -> [n, width]``: the gated features the head reads."""
        out: Tensor = self.features(x) * self.gate(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.embed(x))
        return out
