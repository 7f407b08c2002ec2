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

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from innerloop.adapt import LearningRates, Params, adam_init, adam_step, adapt_trajectory
from innerloop.algorithms.base import GradientBased, Vectorize
from innerloop.tasks import Objective, TaskBatch

InnerOptimizer = Literal["sgd", "adam"]
INNER_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


def inner_trajectory(
    loss: Callable[[Params, Params, Tensor, Tensor], Tensor],
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int,
    lr: LearningRates,
    adapt_names: Sequence[str],
    optimizer: InnerOptimizer = "sgd",
    betas: tuple[float, float] = (0.0, 0.999),
    eps: float = 1e-8,
) -> Iterator[Params]:
    """Yield the parameters after 1..``steps`` full-batch steps of ``optimizer`` on the support set.

    ``sgd`` is :func:`innerloop.adapt.adapt_trajectory` (first order); ``adam`` is
    :func:`innerloop.adapt.adam_step` from zero moments. Inputs ``support_x [support, ...]``,
    ``support_y [support, ...]``; every yielded dict is keyed like ``params``.
    """
    if optimizer == "sgd":
        yield from adapt_trajectory(loss, params, buffers, support_x, support_y, steps=steps, lr=lr,
                                    adapt_names=adapt_names, first_order=True)
        return
    if optimizer != "adam":
        raise ValueError(f"unknown inner optimizer {optimizer!r}; choose one of {INNER_OPTIMIZERS}.")

    def support_loss(adapted: Params, current: Params) -> Tensor:
        return loss({**current, **adapted}, buffers, support_x, support_y)

    current, state = params, adam_init({n: params[n] for n in adapt_names})
    for _ in range(steps):
        grads = grad(support_loss)({n: current[n] for n in adapt_names}, current)
        current, state = adam_step(current, {n: g.detach() for n, g in grads.items()}, state, lr, betas, eps)
        yield current


class Reptile(GradientBased):
    """Reptile with an SGD or Adam inner loop.

    Args:
        model: the network; its parameters are the meta-learned initialisation.
        objective: ``regression`` or ``classification``.
        inner_lr: the inner learning rate (of SGD or Adam).
        inner_steps: inner steps per task in meta-training (the paper uses 5 to 10).
        inner_optimizer: ``sgd`` or ``adam``.
        betas: Adam's ``(beta1, beta2)`` for the inner loop, each in [0, 1).
        adapt: which parameters train in the inner loop (``all`` or glob patterns); the others
            get a zero meta-gradient and keep their value.
        vectorize: ``auto``, ``vmap`` or ``loop`` (see :class:`~innerloop.algorithms.base.GradientBased`);
            the inner loop is first order, so ``vmap`` is safe with BatchNorm here.
    """

    name = "reptile"

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        inner_optimizer: InnerOptimizer = "sgd",
        betas: Sequence[float] = (0.0, 0.999),
        adapt: str | list[str] = "all",
        vectorize: Vectorize = "auto",
    ) -> None:
        super().__init__(model, objective, inner_lr, inner_steps, "fixed", adapt, vectorize)
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {inner_optimizer!r}; choose one of {INNER_OPTIMIZERS}.")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Adam betas must be a pair (beta1, beta2), each in [0, 1); got {tuple(betas)}.")
        self.inner_optimizer: InnerOptimizer = inner_optimizer
        self.betas = (float(betas[0]), float(betas[1]))

    def trajectory(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor,
                   steps: int) -> Iterator[Params]:
        """The inner loop of one task: parameters after 1..``steps`` steps (no outer graph)."""
        return inner_trajectory(self._loss, params, buffers, support_x, support_y, steps=steps,
                                lr=self.inner_lr.as_dict(), adapt_names=self.adapt_names,
                                optimizer=self.inner_optimizer, betas=self.betas)

    def eval_trajectory(
        self, params: Params, buffers: Params, rates: Params, support_x: Tensor, support_y: Tensor, steps: int
    ) -> Iterator[Params]:
        """Test time runs the same inner optimiser as training."""
        return self.trajectory(params, buffers, support_x, support_y, steps)

    def adapt_task(self, params: Params, buffers: Params, task: tuple[Tensor, ...]) -> tuple[Params, Tensor]:
        """``phi`` of one task (the adapted names only) and its query ``[loss, metric]`` (shape ``[2]``)."""
        sx, sy, qx, qy = task
        phi = params
        for phi in self.trajectory(params, buffers, sx, sy, self.inner_steps):  # noqa: B007 - the last
            pass
        pred = self._predict(phi, buffers, qx)
        scores = torch.stack([self.fns.loss(pred, qy), self.fns.metric(pred, qy)])
        return {n: phi[n] for n in self.adapt_names}, scores

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """``theta - mean_i phi_i`` for the adapted parameters (zero for the others), and the mean
        query loss and metric at ``phi_i``. Inputs ``[tasks, examples, ...]``."""
        params = {n: p.detach() for n, p in self.params().items()}
        buffers = self.buffers_dict()
        tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        n = len(batch)
        with torch.no_grad():
            if self.use_vmap(second_order=False):
                phis, scores = vmap(lambda *task: self.adapt_task(params, buffers, task))(*tensors)
                mean_phi = {k: v.mean(0) for k, v in phis.items()}
                score = scores.mean(0)
            else:
                sums: dict[str, Tensor] = {k: torch.zeros_like(params[k]) for k in self.adapt_names}
                score = torch.zeros(2, dtype=params[self.adapt_names[0]].dtype)
                for i in range(n):
                    phi, s = self.adapt_task(params, buffers, tuple(t[i] for t in tensors))
                    for k in sums:
                        sums[k] += phi[k]
                    score += s
                mean_phi = {k: v / n for k, v in sums.items()}
                score = score / n
        grads = {k: torch.zeros_like(v) for k, v in self.named_parameters()}
        for k, phi in mean_phi.items():
            grads[f"model.{k}"] = params[k] - phi
        return grads, {"loss": float(score[0]), self.metric_name: float(score[1])}
