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

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from innerloop.adapt import Params, adapt, adapt_trajectory
from innerloop.algorithms.base import GradientBased, Vectorize
from innerloop.tasks import Objective, TaskBatch

LossFn = Callable[[Params, Params, Tensor, Tensor], Tensor]


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """Approximately solve ``A x = b`` for symmetric positive definite ``A`` by ``steps``
    iterations of conjugate gradient from ``x = 0``.

    ``matvec(v) = A v`` on dicts of tensors shaped like ``b``. A fixed number of iterations
    and no data-dependent branches, so it runs under ``vmap``; once the residual is exactly zero
    the iterate stops moving (guarded divisions instead of NaNs). In exact arithmetic ``steps``
    equal to the number of unknowns solves the system exactly.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r, p = dict(b), dict(b)
    rs = _dot(r, r)
    for _ in range(steps):
        ap = matvec(p)
        pap = _dot(p, ap)
        alpha = rs / torch.where(pap == 0, torch.ones_like(pap), pap)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = _dot(r, r)
        beta = rs_new / torch.where(rs == 0, torch.ones_like(rs), rs)
        p = {k: r[k] + beta * p[k] for k in p}
        rs = rs_new
    return x


class IMAML(GradientBased):
    """Implicit MAML with a proximal inner problem and a conjugate-gradient implicit gradient.

    Args:
        model: the network; its parameters are the meta-parameters ``theta``.
        objective: ``regression`` or ``classification``.
        inner_lr: gradient-descent step size on the proximal inner objective.
        inner_steps: gradient steps on the inner objective (enough to get near its minimiser).
        reg_lambda: ``lambda`` of the proximal term ``lambda / 2 ||phi - theta||^2`` (> 0).
        cg_steps: conjugate-gradient iterations per task for the implicit gradient (>= 1).
        vectorize: ``auto``, ``vmap`` or ``loop`` (see :class:`~innerloop.algorithms.base.GradientBased`);
            the Hessian-vector products are second order, so BatchNorm models run as a loop.
    """

    name = "imaml"

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_lr: float = 0.01,
        inner_steps: int = 10,
        reg_lambda: float = 2.0,
        cg_steps: int = 5,
        vectorize: Vectorize = "auto",
    ) -> None:
        super().__init__(model, objective, inner_lr, inner_steps, "fixed", "all", vectorize)
        if not reg_lambda > 0:
            raise ValueError(f"iMAML's reg_lambda must be > 0, got {reg_lambda}; it weighs ||phi - theta||^2.")
        if not isinstance(cg_steps, int) or cg_steps < 1:
            raise ValueError(f"cg_steps must be an integer >= 1, got {cg_steps!r}.")
        self.reg_lambda = float(reg_lambda)
        self.cg_steps = cg_steps

    def proximal_loss(self, anchor: Params) -> LossFn:
        """``(params, buffers, x, y) -> L(params) + lambda/2 ||params - anchor||^2``, with ``anchor``
        (the meta-parameters) a constant."""
        anchor = {k: v.detach() for k, v in anchor.items()}

        def loss(params: Params, buffers: Params, x: Tensor, y: Tensor) -> Tensor:
            prox = sum(((params[k] - anchor[k]) ** 2).sum() for k in anchor)
            return self._loss(params, buffers, x, y) + 0.5 * self.reg_lambda * prox

        return loss

    def inner_solve(self, params: Params, buffers: Params, support_x: Tensor, support_y: Tensor,
                    steps: int | None = None) -> Params:
        """``phi``: ``steps`` (default ``inner_steps``) gradient steps on the proximal objective from
        ``params``, without graph. Inputs ``support_x [support, ...]``, ``support_y [support, ...]``."""
        params = {k: v.detach() for k, v in params.items()}
        with torch.no_grad():
            phi = adapt(self.proximal_loss(params), params, buffers, support_x, support_y,
                        steps=self.inner_steps if steps is None else steps, lr=self.inner_lr.as_dict(),
                        first_order=True)
        return {k: v.detach() for k, v in phi.items()}

    def implicit_gradient(self, phi: Params, buffers: Params, task: tuple[Tensor, ...]) -> tuple[Params, Tensor]:
        """``(I + H / lambda)^{-1} grad L_q(phi)`` by conjugate gradient, with ``H`` the support
        Hessian at ``phi``, and the query ``[loss, metric]`` at ``phi`` (shape ``[2]``)."""
        sx, sy, qx, qy = task

        def support(p: Params) -> Tensor:
            return self._loss(p, buffers, sx, sy)

        def query(p: Params) -> tuple[Tensor, Tensor]:
            pred = self._predict(p, buffers, qx)
            loss = self.fns.loss(pred, qy)
            return loss, torch.stack([loss.detach(), self.fns.metric(pred.detach(), qy)])

        # reverse-over-reverse: the graph of grad L_s at phi is built once and reused by every
        # conjugate-gradient iteration (H is symmetric, so v^T H = (H v)^T). Forward-over-reverse
        # (jvp of grad) fails on F.mse_loss in torch 2.13 ("ZeroTensors are immutable").
        _, hvp = vjp(grad(support), phi)

        def matvec(v: Params) -> Params:
            hv = hvp(v)[0]
            return {k: v[k] + hv[k] / self.reg_lambda for k in v}

        g_query, scores = grad(query, has_aux=True)(phi)
        return conjugate_gradient(matvec, g_query, self.cg_steps), scores

    def _task(self, params: Params, buffers: Params, task: tuple[Tensor, ...]) -> tuple[Params, Tensor]:
        phi = self.inner_solve(params, buffers, task[0], task[1])
        return self.implicit_gradient(phi, buffers, task)

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Mean implicit gradient over tasks (keyed ``model.<name>``) and the mean query loss and
        metric at the adapted parameters. Inputs ``[tasks, examples, ...]``."""
        params = {k: v.detach() for k, v in self.params().items()}
        buffers = self.buffers_dict()
        tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        n = len(batch)
        with torch.no_grad():
            if self.use_vmap(second_order=True):
                sols, scores = vmap(lambda *task: self._task(params, buffers, task))(*tensors)
                total = {k: v.mean(0) for k, v in sols.items()}
                score = scores.mean(0)
            else:
                total = {k: torch.zeros_like(v) for k, v in params.items()}
                score = torch.zeros(2, dtype=next(iter(params.values())).dtype)
                for i in range(n):
                    sol, s = self._task(params, buffers, tuple(t[i] for t in tensors))
                    for k in total:
                        total[k] += sol[k] / n
                    score += s / n
        grads = {k: torch.zeros_like(v) for k, v in self.named_parameters()}
        grads.update({f"model.{k}": v for k, v in total.items()})
        return grads, {"loss": float(score[0]), self.metric_name: float(score[1])}

    def eval_trajectory(
        self, params: Params, buffers: Params, rates: Params, support_x: Tensor, support_y: Tensor, steps: int
    ) -> Iterator[Params]:
        """Gradient steps on the proximal objective anchored at ``params`` (iMAML's test-time loop)."""
        return adapt_trajectory(
            self.proximal_loss(params), params, buffers, support_x, support_y, steps=steps,
            lr=self.inner_lr.as_dict(), first_order=True,
        )
