"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML").

MAML with the paper's fixes, each an option here:

* LSLR: learned per-layer, per-step inner learning rates, ``alpha[name][j]`` for inner step ``j``
  (always on: it is what the algorithm meta-learns besides the initialisation).
* MSL: the multi-step loss ``sum_j w_j L_query(phi_j)`` over the query losses after every inner
  step, with weights annealed from uniform to the final step over ``msl_iterations`` outer
  iterations (the schedule of the paper's code, with outer iterations in place of epochs; after
  it, only the final step's loss). ``msl_iterations = 0``: the final step's loss only.
* DA: derivative-order annealing, first-order meta-gradients for the first
  ``first_order_iterations`` outer iterations, second order after.
* CA: cosine annealing of the meta learning rate, the training loop's
  ``train.lr_schedule = "cosine"`` (with ``train.final_outer_lr``), not part of this class.
* BNWB: per-step BatchNorm weights, one set of BatchNorm ``weight``/``bias`` per inner step
  (step 0 uses the model's own; steps 1..N-1 extra meta-parameters), used by the forward passes
  of that step and not adapted in the inner loop. The query loss after step ``j`` uses the set of
  step ``j`` (0-based), as in the paper's code.
* BNRS: per-step running statistics, ``batch_norm = "per_step"`` (:mod:`innerloop.norm`): one set
  of running statistics per inner step (buffers ``step_stats.<j>``, checkpointed with the model),
  accumulated in meta-training from the support forward of step ``j`` and used at test time by the
  forwards of step ``j`` (its support forward, and the query after it, which also uses step ``j``'s
  BatchNorm weights). It needs BatchNorm layers that track running statistics
  (``Conv4(track_running_stats=True)`` or stock ``nn.BatchNorm2d``); the default ``batch`` uses the
  statistics of each batch (the transductive MAML protocol), ``running`` one set for every step.

The outer iteration reaches the algorithm through :meth:`set_progress`, which the training loop
calls before every iteration (and with the true step on resume), so the annealing needs no
checkpointed state. Called outside the loop, the algorithm is at iteration 0 unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from innerloop.adapt import Params, model_loss, sgd, unroll
from innerloop.algorithms.base import GradientBased, GradientOptions, ObjectiveFns, check, check_adapt, scores
from innerloop.execution import Execution, TaskTensors, meta_gradient
from innerloop.tasks import Objective, TaskBatch


def _key(name: str) -> str:
    return name.replace(".", "__")


def msl_weights(iteration: int, steps: int, msl_iterations: int) -> list[float]:
    """Weights of the query losses after inner steps 1..``steps`` at outer ``iteration``.

    The paper's schedule: start uniform (``1 / N`` each); every non-final weight falls by
    ``1 / (N * msl_iterations)`` per iteration down to ``0.03 / N``; the final weight rises by
    ``(N - 1)`` times that up to ``1 - (N - 1) * 0.03 / N``. From ``msl_iterations`` on (or when it
    is 0), only the final step counts: ``[0, ..., 0, 1]``.
    """
    if msl_iterations <= 0 or iteration >= msl_iterations:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / msl_iterations
    floor = 0.03 / steps
    weights = [max(1.0 / steps - iteration * decay, floor) for _ in range(steps - 1)]
    weights.append(min(1.0 / steps + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return weights


@dataclass(frozen=True)
class MAMLPlusPlusOptions(GradientOptions):
    inner_lr: float = 0.01
    """Initial value of every learned per-layer, per-step inner learning rate (LSLR)."""
    inner_steps: int = 5
    """Inner steps ``N`` per task."""
    msl_iterations: int = 0
    """Outer iterations over which the multi-step loss weights anneal to the final step (0: the
    final step's loss only)."""
    first_order_iterations: int = 0
    """Outer iterations with first-order meta-gradients before second order (derivative-order
    annealing; 0: second order from the start, unless ``first_order``)."""
    first_order: bool = False
    """First order throughout (overrides ``first_order_iterations``)."""
    per_step_bn: bool = True
    """One set of BatchNorm weights per inner step (BNWB); no effect without BatchNorm."""
    adapt: str | tuple[str, ...] = "all"
    """Parameters that adapt (``all`` or glob patterns); BatchNorm weights never adapt with
    ``per_step_bn``."""

    def check(self) -> None:
        super().check()
        check_adapt(self)
        for key in ("msl_iterations", "first_order_iterations"):
            value = getattr(self, key)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, key, value,
                  "must be an integer >= 0")


class MAMLPlusPlus(GradientBased):
    """MAML++: LSLR, multi-step loss, derivative-order annealing and per-step BatchNorm weights.
    Options: :class:`MAMLPlusPlusOptions`."""

    name = "mamlpp"
    Options = MAMLPlusPlusOptions
    per_step_statistics = True

    def __init__(self, model: nn.Module, objective: Objective | ObjectiveFns = "regression",
                 options: MAMLPlusPlusOptions | None = None, execution: Execution | None = None,
                 **overrides: Any) -> None:
        super().__init__(model, objective, options, execution, **overrides)
        o: MAMLPlusPlusOptions = self.options
        params = dict(model.named_parameters())
        self.bn_names: list[str] = []
        if o.per_step_bn:
            for prefix, module in model.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                    self.bn_names += [f"{prefix}.{w}" if prefix else w for w in ("weight", "bias")
                                      if getattr(module, w).requires_grad]  # frozen: one set for every step
            self.adapt_names = [n for n in self.adapt_names if n not in self.bn_names]
            if not self.adapt_names:
                raise ValueError("with per_step_bn the BatchNorm weights do not adapt, and nothing else was "
                                 "chosen to adapt; widen `adapt` or set per_step_bn=False.")
        # LSLR: alpha[name] has one learned rate per inner step
        self.step_lr = nn.ParameterDict({
            _key(n): nn.Parameter(torch.full((o.inner_steps,), float(o.inner_lr), dtype=params[n].dtype))
            for n in self.adapt_names
        })
        # BNWB: BatchNorm weights of inner steps 1..N-1 (step 0 uses the model's own)
        self.bn_steps = nn.ParameterDict({
            _key(n): nn.Parameter(torch.stack([params[n].detach().clone() for _ in range(o.inner_steps - 1)]))
            for n in self.bn_names if o.inner_steps > 1
        })
        # BNRS: running statistics of inner steps 0..N-1 (batch_norm = "per_step")
        self.step_stats = nn.ModuleList()
        if self.norm.policy == "per_step":
            own = dict(model.named_buffers())
            for _ in range(o.inner_steps):
                holder = nn.Module()
                for n in self.norm.names:
                    holder.register_buffer(_key(n), own[n].detach().clone())
                self.step_stats.append(holder)
        self.iteration = 0

    def statistics_sets(self) -> int:
        return int(self.options.inner_steps)

    def _stats(self, step: int) -> Params | None:
        """The running statistics of inner step ``step`` (clamped to the last), keyed like the model's
        buffers; ``None`` unless ``batch_norm = "per_step"``."""
        if not len(self.step_stats):
            return None
        holder = self.step_stats[min(step, self.inner_steps - 1)]
        return {n: holder.get_buffer(_key(n)) for n in self.norm.names}

    def _step_buffers(self, step: int) -> Params:
        """The buffers of the forwards of inner step ``step`` under the BatchNorm policy."""
        return cast(Params, self.norm.buffers(self.model, self._stats(step)))

    def commit_statistics(self) -> None:
        if not self.norm.pending():
            return
        if self.norm.policy == "per_step":
            self.norm.commit([cast(dict[str, Tensor], self._stats(j)) for j in range(self.inner_steps)])
        else:
            super().commit_statistics()

    def set_progress(self, step: int, total: int) -> None:
        """Remember the outer iteration: it sets the MSL weights and the derivative order."""
        self.iteration = int(step)

    def uses_first_order(self) -> bool:
        """Whether the meta-gradient at the current outer iteration is first order (DA)."""
        return bool(self.options.first_order or self.iteration < self.options.first_order_iterations)

    def loss_weights(self) -> list[float]:
        """The MSL weights of the current outer iteration (see :func:`msl_weights`)."""
        return msl_weights(self.iteration, self.inner_steps, self.options.msl_iterations)

    def _bn(self, bn: Params, step: int) -> Params:
        """The BatchNorm weights of inner step ``step`` (clamped to the last set): ``{}`` for step 0
        (the model's own, already in the parameters)."""
        j = min(step, self.inner_steps - 1)
        if j == 0 or not bn:
            return {}
        return {n: bn[_key(n)][j - 1] for n in self.bn_names}

    def unroll_task(self, model: nn.Module, params: Params, step_lr: Params, bn: Params, task: TaskTensors,
                    steps: int, first_order: bool, weights: list[float] | None) -> tuple[Tensor, list[Tensor]]:
        """Adapt one task for ``steps`` steps with per-step rates and BatchNorm weights.

        Returns the weighted query loss ``sum_j weights[j] * L_q(phi_{j+1})`` (0 when ``weights`` is
        ``None``) and detached ``[loss, metric]`` stacks (shape ``[2]``) after 0..steps steps when
        ``weights`` is ``None``, else after the final step only.
        """
        sx, sy, qx, qy = task
        loss = model_loss(model, self.fns.loss)
        last_step = self.inner_steps - 1
        rule = sgd([{n: step_lr[_key(n)][min(j, last_step)] for n in self.adapt_names} for j in range(steps)])
        trajectory = unroll(lambda p, j: loss({**p, **self._bn(bn, j)}, self._step_buffers(j), sx, sy), params,
                            steps=steps, rule=rule, adapt_names=self.adapt_names, first_order=first_order)
        total: Tensor = params[self.adapt_names[0]].new_zeros(())
        out = [] if weights is not None else [
            scores(self.fns, self.predict(model, params, qx, self._step_buffers(0)), qy)]
        training = weights is not None  # only meta-training feeds the running statistics
        per_step = training and self.norm.policy == "per_step"
        before = params
        for j, current in enumerate(trajectory):
            now = {**current, **self._bn(bn, j)}
            if per_step:  # BNRS: step j's support forward (at the parameters before step j) feeds set j
                self.norm.record(model, {**before, **self._bn(bn, j)}, sx, which=min(j, last_step),
                                 start=self._stats(j))
            elif training and j == steps - 1:
                self.norm.record(model, now, qx)  # batch_norm="running": one set, the final query forward
            before = current
            if weights is None:
                out.append(scores(self.fns, self.predict(model, now, qx, self._step_buffers(j)), qy))
            elif weights[j] != 0 or j == steps - 1:
                pred = self.predict(model, now, qx, self._step_buffers(j))
                loss_j = self.fns.loss(pred, qy)
                total = total + weights[j] * loss_j
                if j == steps - 1:
                    out.append(torch.stack([loss_j.detach(), self.fns.metric(pred.detach(), qy)]))
        return total, out

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Mean over tasks of the MSL-weighted query loss, differentiated w.r.t. the initial weights,
        the per-step rates and the per-step BatchNorm weights (first or second order per DA).
        Metrics are the query loss and metric after the final step."""
        step_lr, bn = dict(self.step_lr), dict(self.bn_steps)
        first_order, weights = self.uses_first_order(), self.loss_weights()

        def one(model: nn.Module, params: Params, task: TaskTensors) -> tuple[Tensor, Tensor]:
            total, out = self.unroll_task(model, params, step_lr, bn, task, self.inner_steps, first_order, weights)
            return total, out[-1]

        grads, final = meta_gradient(one, self.model, self.params(), batch, self.trainable(),
                                     self.execution, second_order=not first_order, stateful=self.stateful)
        self.commit_statistics()
        return grads, {"loss": float(final[0]), self.metric_name: float(final[1])}

    def trajectory_scores(self, model: nn.Module, params: Params, task: TaskTensors, steps: int) -> Tensor:
        """``[2, steps + 1]``: query (loss, metric) after 0..steps inner steps with the learned
        per-step rates and BatchNorm weights (beyond ``inner_steps``, those of the last step)."""
        step_lr = {k: v.detach() for k, v in self.step_lr.items()}
        bn = {k: v.detach() for k, v in self.bn_steps.items()}
        _, out = self.unroll_task(model, params, step_lr, bn, task, steps, True, None)
        return torch.stack(out, dim=-1)
