"""Multi-layer perceptrons for regression tasks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """``features`` (hidden layers) then a linear ``head``: ``[batch, in] -> [batch, out]``.

    The split into ``features`` and ``head`` names the body and the head for algorithms that
    adapt only one of them (ANIL adapts ``head.*``, BOIL ``features.*``).

    Args:
        in_features: input size.
        out_features: output size.
        hidden: hidden layer widths; the MAML paper's sinusoid model is ``(40, 40)``.
        activation: ``relu``, ``tanh`` or ``gelu``.
    """

    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 1,
        hidden: Sequence[int] = (40, 40),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {list(ACTIVATIONS)}.")
        if any(h < 1 for h in hidden) or in_features < 1 or out_features < 1:
            raise ValueError(f"layer sizes must be >= 1, got in={in_features} hidden={list(hidden)} "
                             f"out={out_features}.")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.head(self.features(x))
        return y
