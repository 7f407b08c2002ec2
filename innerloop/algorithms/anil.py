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
adapted parameters ``phi(theta)`` (tested in ``tests/test_anil_boil.py``).
"""

from __future__ import annotations

from torch import nn

from innerloop.adapt import LRMode, select
from innerloop.algorithms.base import Vectorize
from innerloop.algorithms.maml import MAML
from innerloop.tasks import Objective


class ANIL(MAML):
    """MAML with only ``head.*`` adapting in the inner loop.

    Args:
        model: the network; it must have parameters named ``head.*`` (its last layer).
        objective: ``regression`` or ``classification``.
        inner_lr: inner learning rate of the head (initial value when learned).
        inner_steps: inner gradient steps per task.
        first_order: drop second-order terms.
        lr_mode: ``fixed``, ``scalar``, ``per_tensor`` or ``per_element`` (over the adapted part).
        vectorize: ``auto``, ``vmap`` or ``loop`` (see :class:`~innerloop.algorithms.base.GradientBased`).
    """

    name = "anil"
    adapt_pattern = "head.*"
    part = "head"

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        lr_mode: LRMode = "fixed",
        vectorize: Vectorize = "auto",
    ) -> None:
        names = [n for n, _ in model.named_parameters()]
        try:
            select(names, [self.adapt_pattern])
        except ValueError:
            raise ValueError(
                f"{self.name} adapts the model's {self.part} (parameters {self.adapt_pattern!r}) but the "
                f"model has none: its parameters are {names}. Name the body `features` and the last layer "
                "`head` (as innerloop.models do), or use MAML with adapt=[<your patterns>]."
            ) from None
        super().__init__(model, objective, inner_lr, inner_steps, first_order, lr_mode,
                         [self.adapt_pattern], vectorize)


class BOIL(ANIL):
    """MAML with only the body (``features.*``) adapting in the inner loop; the head is frozen
    in the inner loop and meta-learned. Arguments as :class:`ANIL`."""

    name = "boil"
    adapt_pattern = "features.*"
    part = "body"
