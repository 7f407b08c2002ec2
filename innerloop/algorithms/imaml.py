"""iMAML: implicit-gradient MAML (Rajeswaran, Finn, Kakade & Levine 2019).

The inner problem of task ``i`` is proximal: adapt from the meta-parameters ``theta`` by
minimising::

    G_i(phi) = L_support_i(phi) + lambda / 2 * ||phi - theta||^2

here with ``inner_steps`` gradient steps (step size ``inner_lr``) taken without any graph. At a
minimiser ``phi_i``, ``grad L_s(phi_i) + lambda (phi_i - theta) = 0``; differentiating that
identity gives ``d phi_i / d theta = (I + H_i / lambda)^{-1}`` with ``H_i`` the Hessian of the
support loss at ``phi_i``, so the meta-gradient of ``mean_i L_query_i(phi_i)`` is::

    mean_i (I + H_i / lambda)^{-1} grad L_query_i(phi_i)

Each solve is ``cg_steps`` iterations of conjugate gradient with Hessian-vector products at
``phi_i`` only (``torch.func.vjp`` of ``torch.func.grad``: one gradient graph at ``phi_i``, reused
by every iteration). Nothing of the inner loop is kept for the outer step, so memory does not grow
with ``inner_steps``.

Caveats, as in the paper: the implicit gradient is exact at an exact minimiser; with few inner
steps it is an approximation, and ``I + H / lambda`` must be positive definite for conjugate
gradient (true for convex support losses; choose ``lambda`` large enough otherwise). Every
parameter adapts (the proximal term ties all of them to ``theta``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from innerloop.adapt import Params, UpdateRule, gradient, hessian_vector_product, last, model_loss, sgd, unroll
from innerloop.algorithms.base import GradientBased, GradientOptions, check, scores
from innerloop.execution import TaskTensors, map_tasks
from innerloop.numerics import conjugate_gradient
from innerloop.split import TaskView
from innerloop.tasks import TaskBatch


@dataclass(frozen=True)
class IMAMLOptions(GradientOptions):
    inner_lr: float = 0.01
    """Gradient-descent step size on the proximal inner objective."""
    inner_steps: int = 10
    """Gradient steps on the inner objective (enough to get near its minimiser)."""
    reg_lambda: float = 2.0
    """``lambda`` of the proximal term ``lambda / 2 ||phi - theta||^2`` (> 0)."""
    cg_steps: int = 5
    """Conjugate-gradient iterations per task for the implicit gradient (>= 1)."""

    def check(self) -> None:
        super().check()
        check(isinstance(self.reg_lambda, int | float) and self.reg_lambda > 0, "reg_lambda", self.reg_lambda,
              "must be > 0; it weighs ||phi - theta||^2")
        check(isinstance(self.cg_steps, int) and not isinstance(self.cg_steps, bool) and self.cg_steps >= 1,
              "cg_steps", self.cg_steps, "must be an integer >= 1")


class IMAML(GradientBased):
    """Implicit MAML with a proximal inner problem and a conjugate-gradient implicit gradient.
    Options: :class:`IMAMLOptions`. Every trainable parameter adapts (the proximal term ties all of them to
    ``theta``); the Hessian-vector products are second order, so BatchNorm models run as a loop."""

    name = "imaml"
    Options = IMAMLOptions

    def proximal_rule(self, anchor: Params) -> UpdateRule:
        """The proximal step ``p - lr * (g + lambda (p - theta))``: gradient descent on
        ``L_support(p) + lambda/2 ||p - theta||^2`` with ``theta = anchor`` a constant."""
        return sgd(self.inner_lr.as_dict(), weight_decay=float(self.options.reg_lambda),
                   anchor={k: v.detach() for k, v in anchor.items()})

    def eval_trajectory(self, model: nn.Module, params: Params, task: TaskTensors, steps: int,
                        view: TaskView | None = None) -> Iterator[Params]:
        """Proximal steps anchored at ``params`` (iMAML's inner loop, at training and test time)."""
        view = view or self.view(model, params, task)
        sy = task[1]
        return unroll(lambda p, _: self.fns.loss(view.support(p), sy), params, steps=steps,
                      rule=self.proximal_rule({n: params[n] for n in self.adapt_names}),
                      adapt_names=self.adapt_names, first_order=True)

    def implicit_gradient(self, model: nn.Module, phi: Params, task: TaskTensors) -> tuple[Params, Tensor]:
        """``(I + H / lambda)^{-1} grad L_q(phi)`` by conjugate gradient, with ``H`` the support
        Hessian at ``phi``, and the query ``[loss, metric]`` at ``phi`` (shape ``[2]``)."""
        sx, sy, qx, qy = task
        loss, buffers, lam = model_loss(model, self.fns.loss), self.buffers_dict(), float(self.options.reg_lambda)
        adapted = {n: phi[n] for n in self.adapt_names}  # frozen parameters are constants
        hvp = hessian_vector_product(lambda p: loss({**phi, **p}, buffers, sx, sy), adapted)

        def matvec(v: Params) -> Params:
            hv = hvp(v)
            return {k: v[k] + hv[k] / lam for k in v}

        def query(p: Params) -> tuple[Tensor, Tensor]:  # the query loss, and its [loss, metric] as aux
            pred = self.predict(model, {**phi, **p}, qx, buffers)
            return self.fns.loss(pred, qy), scores(self.fns, pred, qy)

        g_query, score = gradient(query, adapted, create_graph=False, has_aux=True)
        return conjugate_gradient(matvec, g_query, self.options.cg_steps), score

    def inner_solve(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor,
                    steps: int | None = None, model: nn.Module | None = None) -> Params:
        """``phi``: ``steps`` (default ``inner_steps``) proximal steps from ``params``, without graph.
        Inputs ``support_x [support, ...]``, ``support_y [support, ...]``; ``buffers`` unused (the
        model's own are used)."""
        task = (support_x, support_y, support_x, support_y)
        params = {k: v.detach() for k, v in params.items()}
        with torch.no_grad():
            phi = last(self.eval_trajectory(model or self.model, params, task,
                                            self.inner_steps if steps is None else steps), params)
        return {k: v.detach() for k, v in phi.items()}

    def _task(self, model: nn.Module, params: Params, task: TaskTensors) -> tuple[Params, Tensor]:
        phi = self.inner_solve(params, {}, task[0], task[1], model=model)
        self.norm.record(model, phi, task[2])  # batch_norm="running": the adapted network's query statistics
        return self.implicit_gradient(model, phi, task)

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Mean implicit gradient over tasks (keyed ``model.<name>``) and the mean query loss and
        metric at the adapted parameters. Inputs ``[tasks, examples, ...]``."""
        params = {k: v.detach() for k, v in self.params().items()}
        total, score = map_tasks(self._task, self.model, params, batch, self.execution, reduce="mean",
                                 second_order=True, stateful=self.stateful)
        self.commit_statistics()
        grads = {k: torch.zeros_like(v) for k, v in self.trainable().items()}
        grads.update({f"model.{k}": v for k, v in total.items()})
        return grads, {"loss": float(score[0]), self.metric_name: float(score[1])}

