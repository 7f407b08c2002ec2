"""ANIL (Raghu et al. 2020) and BOIL (Oh et al. 2021): MAML that adapts only part of the network.

Both are :class:`~innerloop.algorithms.maml.MAML` with a fixed choice of which parameters move in
the inner loop; every parameter is still meta-learned by the outer loop:

* ANIL ("almost no inner loop") adapts only the ``head`` (``head.*``); the body is meta-learned
  as a feature extractor shared by all tasks.
* BOIL ("body only inner loop") adapts only the body (``features.*``); the head is frozen in the
  inner loop and meta-learned.

The models of :mod:`innerloop.models` name their body ``features`` and their last layer ``head``;
any model that does the same works. For a parameter ``theta_f`` that does not adapt, the
first-order meta-gradient is exactly the gradient of the plain query loss at the adapted
parameters, ``d L_q(theta_f, phi) / d theta_f``; the second-order one adds the path through the
adapted parameters ``phi(theta)`` (tested in ``tests/algorithms/test_anil.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from innerloop.algorithms.base import GradientOptions, check
from innerloop.algorithms.maml import MAML
from innerloop.algorithms.rates import LR_MODES, LRMode


@dataclass(frozen=True)
class ANILOptions(GradientOptions):
    first_order: bool = False
    """Drop the second-order terms."""
    lr_mode: LRMode = "fixed"
    """``fixed``, ``scalar``, ``per_tensor`` or ``per_element`` inner rates (over the adapted part)."""

    def check(self) -> None:
        super().check()
        check(self.lr_mode in LR_MODES, "lr_mode", self.lr_mode, f"choose one of {list(LR_MODES)}")


class ANIL(MAML):
    """MAML with only ``head.*`` adapting in the inner loop. Options: :class:`ANILOptions`."""

    name = "anil"
    Options = ANILOptions
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    adapt_pattern = "head.*"
    part = "head"

    def chosen(self, names: list[str], which: str | tuple[str, ...]) -> list[str]:
        matched = [n for n in names if n.startswith(f"{self.adapt_pattern[:-1]}")]
        if not matched:
            raise ValueError(
                f"{self.name} adapts the model's {self.part} (parameters {self.adapt_pattern!r}) but the "
                f"model has none: its parameters are {names}. Name the body `features` and the last layer "
                "`head` (as innerloop.models do), or use MAML with adapt=[<your patterns>]."
            )
        return super().chosen(names, which)


class BOIL(ANIL):
    """MAML with only the body (``features.*``) adapting in the inner loop; the head is frozen
    in the inner loop and meta-learned. Options as :class:`ANIL`."""

    name = "boil"
    adapt_pattern = "features.*"
    part = "body"
