"""Inner-loop learning rates and weight decay as meta-parameters (fixed, or learned by hypergradient)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

LRMode = Literal["fixed", "scalar", "per_tensor", "per_element"]
LR_MODES: tuple[str, ...] = ("fixed", "scalar", "per_tensor", "per_element")


def _key(name: str) -> str:
    return name.replace(".", "__")


class InnerLR(nn.Module):
    """Inner-loop learning rates, fixed or learned as meta-parameters.

    Modes:
        ``fixed``: a constant, not learned (plain MAML).
        ``scalar``: one learned rate shared by every adapted parameter.
        ``per_tensor``: one learned rate per parameter tensor.
        ``per_element``: one learned rate per parameter element (Meta-SGD, Li et al. 2017).

    Learned rates are trained by the outer optimiser with the meta-gradient: this is
    hyperparameter optimisation by hypergradient, with the inner learning rate as the
    hyperparameter.

    Args:
        params: the adapted parameters (names and shapes).
        init: the initial (or fixed) learning rate.
        mode: one of ``LR_MODES``.
    """

    def __init__(self, params: Mapping[str, Tensor], init: float, mode: LRMode = "fixed") -> None:
        super().__init__()
        if mode not in LR_MODES:
            raise ValueError(f"unknown inner {self.what} mode {mode!r}; choose one of {LR_MODES}.")
        self._check_init(init)
        self.mode, self.init, self.names = mode, float(init), list(params)
        self.rates = nn.ParameterDict()
        if mode == "scalar":
            self.rates["all"] = nn.Parameter(torch.tensor(float(init)))
        elif mode == "per_tensor":
            for n in self.names:
                self.rates[_key(n)] = nn.Parameter(torch.tensor(float(init)))
        elif mode == "per_element":
            for n, p in params.items():
                self.rates[_key(n)] = nn.Parameter(torch.full_like(p.detach(), float(init)))

    what = "learning-rate"

    @staticmethod
    def _check_init(init: float) -> None:
        if not init > 0:
            raise ValueError(f"the inner learning rate must be > 0, got {init}.")

    def as_dict(self, rates: Mapping[str, Tensor] | None = None) -> dict[str, float | Tensor]:
        """Per-parameter learning rates. ``rates`` substitutes functional values for
        ``self.rates`` (keys as in ``self.rates``), e.g. inside ``vmap`` or ``grad``."""
        r = dict(self.rates) if rates is None else rates
        if self.mode == "fixed":
            return dict.fromkeys(self.names, self.init)
        if self.mode == "scalar":
            return dict.fromkeys(self.names, r["all"])
        return {n: r[_key(n)] for n in self.names}

    def extra_repr(self) -> str:
        return f"mode={self.mode}, init={self.init}"


class InnerWeightDecay(InnerLR):
    """Inner-loop weight decay ``wd`` (each inner step is ``p - lr * (g + wd * p)``), fixed or
    learned as a meta-parameter: hyperparameter optimisation by hypergradient, as
    :class:`InnerLR` does for the learning rate.

    Modes as :class:`InnerLR`: ``fixed`` (a constant; 0 means no weight decay at all), or learned
    ``scalar``, ``per_tensor``, ``per_element``, starting from ``init`` (>= 0; a learned value may
    leave that range, as a learned rate may).

    Args:
        params: the adapted parameters (names and shapes).
        init: the initial (or fixed) weight decay, >= 0.
        mode: one of ``LR_MODES``.
    """

    what = "weight-decay"

    @staticmethod
    def _check_init(init: float) -> None:
        if not init >= 0:
            raise ValueError(f"the inner weight decay must be >= 0, got {init}.")

    def __init__(self, params: Mapping[str, Tensor], init: float = 0.0, mode: LRMode = "fixed") -> None:
        super().__init__(params, init, mode)

    @property
    def enabled(self) -> bool:
        """False for the fixed weight decay 0 (the inner update is then exactly plain SGD)."""
        return self.mode != "fixed" or self.init != 0

    def as_dict(self, rates: Mapping[str, Tensor] | None = None) -> dict[str, float | Tensor] | None:  # type: ignore[override]
        """Per-parameter weight decay, or ``None`` when disabled (see :attr:`enabled`)."""
        return super().as_dict(rates) if self.enabled else None
