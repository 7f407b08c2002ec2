"""MAML (Finn et al. 2017), first-order MAML, and Meta-SGD (Li et al. 2017).

The meta-objective of a meta-batch of tasks ``i``::

    L(theta, alpha) = mean_i  L_query_i( adapt(theta, support_i; alpha) )

with ``adapt`` the inner loop of :mod:`innerloop.adapt`. Second order by default; with
``first_order=True`` the inner gradients are treated as constants (FOMAML). Learned inner learning
rates (``lr_mode`` other than ``fixed``) are meta-parameters too: ``per_element`` is Meta-SGD. The
inner update may carry a weight decay, fixed or learned by hypergradient the same way (``wd_mode``).
How the tasks of a meta-batch run (vmap, per-task loop, threads, layout) is the execution layer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from innerloop.adapt import Params, last, unroll
from innerloop.algorithms.base import AlgorithmOptions, GradientBased, GradientOptions, check, check_adapt
from innerloop.algorithms.rates import LR_MODES, LRMode
from innerloop.execution import TaskTensors, meta_gradient
from innerloop.tasks import TaskBatch


@dataclass(frozen=True)
class MAMLOptions(GradientOptions):
    first_order: bool = False
    """Drop the second-order terms (FOMAML)."""
    lr_mode: LRMode = "fixed"
    """``fixed``, or learned ``scalar``, ``per_tensor`` or ``per_element`` inner rates (Meta-SGD)."""
    adapt: str | tuple[str, ...] = "all"
    """``all`` or glob patterns of the parameters that adapt (``head.*``: ANIL)."""
    weight_decay: float = 0.0
    """Inner weight decay ``wd``: each step is ``p - lr * (g + wd * p)`` (initial value if learned)."""
    wd_mode: LRMode = "fixed"
    """Learn the inner weight decay by hypergradient, like ``lr_mode`` the learning rate."""

    aliases: ClassVar[dict[str, str]] = {"inner_weight_decay": "weight_decay", "weight_decay_mode": "wd_mode"}

    def check(self) -> None:
        super().check()
        check_adapt(self)
        for key in ("lr_mode", "wd_mode"):
            check(getattr(self, key) in LR_MODES, key, getattr(self, key), f"choose one of {list(LR_MODES)}")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")


class MAML(GradientBased):
    """Model-agnostic meta-learning. Options: :class:`MAMLOptions` (as keywords, or ``options=``);
    how tasks run: ``execution=`` (:class:`~innerloop.execution.Execution`) or its fields as keywords."""

    name = "maml"
    Options: ClassVar[type[AlgorithmOptions]] = MAMLOptions
    variants: ClassVar[dict[str, dict[str, Any]]] = {"fomaml": {"first_order": True},
                                                     "metasgd": {"lr_mode": "per_element"}}

    def task_loss(self, model: nn.Module, params: Params, rates: Params,
                  task: TaskTensors) -> tuple[Tensor, Tensor]:
        """Query loss of one task after adaptation (differentiable in ``params`` and ``rates``) and
        its detached ``[loss, metric]``. ``task``: ``(support_x, support_y, query_x, query_y)``."""
        sy, qx, qy = task[1], task[2], task[3]
        view = self.view(model, params, task)  # the head alone on captured features where only a head adapts
        trajectory = unroll(lambda p, _: self.fns.loss(view.support(p), sy), params, steps=self.inner_steps,
                            rule=self.rule(rates), adapt_names=self.adapt_names,
                            first_order=self.options.first_order)
        adapted = last(trajectory, params)
        pred = view.query(adapted)
        self.norm.record(model, adapted, qx)  # batch_norm="running": the adapted network's query statistics
        loss = self.fns.loss(pred, qy)
        return loss, torch.stack([loss.detach(), self.fns.metric(pred.detach(), qy)])

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Mean over tasks of the query loss after adaptation, differentiated w.r.t. every
        meta-parameter (initial weights and learned inner rates)."""
        rates = dict(self.inner_lr.rates)
        grads, aux = meta_gradient(lambda m, p, task: self.task_loss(m, p, rates, task), self.model, self.params(),
                                   batch, self.trainable(), self.execution,
                                   second_order=not self.options.first_order, stateful=self.stateful)
        self.commit_statistics()
        return grads, {"loss": float(aux[0]), self.metric_name: float(aux[1])}
