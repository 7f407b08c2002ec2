"""MAML (Finn et al. 2017), first-order MAML, and Meta-SGD (Li et al. 2017).

The meta-objective of a meta-batch of tasks ``i``::

    L(theta, alpha) = mean_i  L_query_i( adapt(theta, support_i; alpha) )

with ``adapt`` the inner loop of :mod:`innerloop.adapt`. Second order by default; with
``first_order=True`` the inner gradients are treated as constants (FOMAML). Learned inner
learning rates (``lr_mode`` other than ``fixed``) are meta-parameters too: ``per_element`` is
Meta-SGD. The inner update may carry a weight decay (``weight_decay``), fixed or learned by
hypergradient the same way (``wd_mode``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import vmap

from innerloop.adapt import LRMode, Params, adapt
from innerloop.algorithms.base import GradientBased, Vectorize
from innerloop.tasks import Objective, TaskBatch


class MAML(GradientBased):
    """Model-agnostic meta-learning.

    Args:
        model: the network; its parameters are the meta-learned initialisation.
        objective: ``regression`` or ``classification``.
        inner_lr: inner learning rate (initial value when ``lr_mode`` learns it).
        inner_steps: inner gradient steps per task.
        first_order: drop second-order terms (FOMAML).
        lr_mode: ``fixed``, ``scalar``, ``per_tensor`` or ``per_element`` (Meta-SGD).
        adapt: parameters that adapt: ``all`` or glob patterns.
        vectorize: ``auto``, ``vmap`` or ``loop`` (see :class:`GradientBased`).
        weight_decay: inner weight decay (initial value when ``wd_mode`` learns it); 0: none.
        wd_mode: ``fixed``, ``scalar``, ``per_tensor`` or ``per_element`` (learned weight decay).
    """

    name = "maml"

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        lr_mode: LRMode = "fixed",
        adapt: str | list[str] = "all",
        vectorize: Vectorize = "auto",
        weight_decay: float = 0.0,
        wd_mode: LRMode = "fixed",
    ) -> None:
        super().__init__(model, objective, inner_lr, inner_steps, lr_mode, adapt, vectorize, weight_decay, wd_mode)
        self.first_order = first_order

    def task_loss(
        self, params: Params, buffers: Params, rates: Params, task: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor]:
        """Query (loss, metric) of one task after adaptation; differentiable in params, rates.

        ``task`` is ``(support_x [s, ...], support_y [s, ...], query_x [q, ...], query_y [q, ...])``.
        """
        sx, sy, qx, qy = task
        adapted = adapt(
            self._loss, params, buffers, sx, sy,
            steps=self.inner_steps, lr=self.inner_lr.as_dict(rates),
            adapt_names=self.adapt_names, first_order=self.first_order, weight_decay=self.inner_wd.as_dict(),
        )
        pred = self._predict(adapted, buffers, qx)
        return self.fns.loss(pred, qy), self.fns.metric(pred.detach(), qy)

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Mean over tasks of the query loss after adaptation, differentiated w.r.t. every
        meta-parameter (initial weights and learned learning rates)."""
        targets = dict(self.named_parameters())
        params, rates, buffers = self.params(), dict(self.inner_lr.rates), self.buffers_dict()
        tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        n = len(batch)
        if self.use_vmap(second_order=not self.first_order):
            def one(*task: Tensor) -> tuple[Tensor, Tensor]:
                return self.task_loss(params, buffers, rates, task)

            losses, metrics = vmap(one)(*tensors)
            loss, metric = losses.mean(), metrics.mean()
            grads = self._grads(loss, targets)
        else:
            # One backward per task: memory stays that of a single task's graph.
            grads = {k: torch.zeros_like(v) for k, v in targets.items()}
            loss_sum = metric_sum = 0.0
            for i in range(n):
                task_loss, task_metric = self.task_loss(params, buffers, rates, tuple(t[i] for t in tensors))
                for k, g in self._grads(task_loss / n, targets).items():
                    grads[k] += g
                loss_sum += float(task_loss.detach())
                metric_sum += float(task_metric)
            loss, metric = torch.tensor(loss_sum / n), torch.tensor(metric_sum / n)
        return grads, {"loss": float(loss.detach()), self.metric_name: float(metric)}
