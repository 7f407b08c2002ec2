"""Reptile (Nichol, Achiam & Schulman 2018): move the initialisation toward adapted weights.

For each task ``i`` of a meta-batch, train on the support set for ``k`` steps of SGD or Adam,
starting from ``theta``, to get ``phi_i``; then move ``theta`` toward the mean of the adapted
weights::

    theta <- theta + eps * mean_i (phi_i - theta)

The "meta-gradient" this algorithm hands to the training loop is therefore
``theta - mean_i phi_i``, and the loop's outer optimiser does the interpolation: ``sgd`` with
``outer_lr = eps`` is exactly the update above (``train.lr_schedule = "linear"`` anneals ``eps``
linearly to ``train.final_outer_lr``, as in the paper); any other outer optimiser treats the
difference as a gradient. No second-order terms and no graph through the inner loop: memory is
that of one inner step.

Differences from the paper's code, by design: the inner loop takes full-batch steps on the
support set (the paper samples mini-batches of the task's data), and an Adam inner loop starts
from fresh moments for every task (the paper's code keeps the Adam state across tasks and sets
beta1 = 0 because of it; ``betas`` default to ``(0, 0.999)`` here all the same). Evaluation
fine-tunes with the same inner optimiser. The query set is only scored, for the reported
training loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from innerloop.adapt import Params, UpdateRule, adam, last, sgd, unroll
from innerloop.algorithms.base import GradientBased, GradientOptions, check, check_adapt, scores
from innerloop.execution import TaskTensors, map_tasks
from innerloop.split import TaskView
from innerloop.tasks import TaskBatch

InnerOptimizer = Literal["sgd", "adam"]
INNER_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclass(frozen=True)
class ReptileOptions(GradientOptions):
    inner_steps: int = 5
    """Inner steps per task in meta-training (the paper uses 5 to 10)."""
    inner_optimizer: InnerOptimizer = "sgd"
    """The inner update: plain gradient steps or Adam (fresh moments for every task)."""
    betas: tuple[float, float] = (0.0, 0.999)
    """Adam's ``(beta1, beta2)`` for the inner loop, each in [0, 1); Nichol et al. use beta1 = 0."""
    adapt: str | tuple[str, ...] = "all"
    """Which parameters train in the inner loop (``all`` or glob patterns); the others get a zero
    meta-gradient and keep their value."""

    aliases: ClassVar[dict[str, str]] = {"inner_betas": "betas"}

    def check(self) -> None:
        super().check()
        check_adapt(self)
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        check(self.inner_optimizer in INNER_OPTIMIZERS, "inner_optimizer", self.inner_optimizer,
              f"choose one of {list(INNER_OPTIMIZERS)}")
        b = self.betas
        check(isinstance(b, tuple) and len(b) == 2 and all(isinstance(x, int | float) and 0 <= x < 1 for x in b),
              "betas", b, "give [beta1, beta2], each in [0, 1)")
        object.__setattr__(self, "betas", (float(b[0]), float(b[1])))


class Reptile(GradientBased):
    """Reptile with an SGD or Adam inner loop. Options: :class:`ReptileOptions`. The inner loop is
    first order, so ``vmap`` is safe with BatchNorm here."""

    name = "reptile"
    Options = ReptileOptions

    def rule(self, rates: Mapping[str, Tensor] | None = None, detach: bool = False) -> UpdateRule:
        """SGD or Adam (fresh moments per task) with the inner learning rate."""
        lr = self.inner_lr.as_dict()
        o: ReptileOptions = self.options
        return sgd(lr) if o.inner_optimizer == "sgd" else adam(lr, o.betas)

    def eval_trajectory(self, model: nn.Module, params: Params, task: TaskTensors, steps: int,
                        view: TaskView | None = None) -> Iterator[Params]:
        """The inner loop of one task (training and test time alike): parameters after 1..``steps``."""
        view = view or self.view(model, params, task)
        sy = task[1]
        return unroll(lambda p, _: self.fns.loss(view.support(p), sy), params, steps=steps, rule=self.rule(),
                      adapt_names=self.adapt_names, first_order=True)

    def adapt_task(self, model: nn.Module, params: Params, task: TaskTensors) -> tuple[Params, Tensor]:
        """``phi`` of one task (the adapted names only) and its query ``[loss, metric]`` (shape ``[2]``)."""
        view = self.view(model, params, task)
        phi = last(self.eval_trajectory(model, params, task, self.inner_steps, view), params)
        self.norm.record(model, phi, task[2])  # batch_norm="running": the adapted network's query statistics
        return {n: phi[n] for n in self.adapt_names}, scores(self.fns, view.query(phi), task[3])

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """``theta - mean_i phi_i`` for the adapted parameters (zero for the others), and the mean
        query loss and metric at ``phi_i``. Inputs ``[tasks, examples, ...]``."""
        params = {n: p.detach() for n, p in self.params().items()}
        mean_phi, score = map_tasks(self.adapt_task, self.model, params, batch, self.execution, reduce="mean",
                                    stateful=self.stateful)
        self.commit_statistics()
        grads = {k: torch.zeros_like(v) for k, v in self.trainable().items()}
        for k, phi in mean_phi.items():
            grads[f"model.{k}"] = params[k] - phi
        return grads, {"loss": float(score[0]), self.metric_name: float(score[1])}
