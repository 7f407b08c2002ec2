"""A batched, differentiable quadratic-program solver in torch (the OptNet layer, Amos & Kolter 2017).

For each problem of a batch::

    minimise_z   1/2 z^T Q z + p^T z
    subject to   G z <= h,   A z = b

with ``Q`` symmetric positive definite (only its symmetric part counts: ``(Q + Q^T) / 2``). The forward
pass is a primal-dual interior-point method with Mehrotra's predictor-corrector steps, run in float64
whatever the inputs' dtype, on the inputs' device (nothing leaves torch, so CUDA tensors stay on the
GPU). The backward pass differentiates the KKT conditions at the solution (implicit differentiation,
one linear solve per batch), not the solver's iterations: its memory and time do not depend on how many
iterations the forward took.

``qp_solve`` also runs under :func:`torch.func.vmap` (a ``vmap`` rule folds the mapped dimension into the
batch, so the same solver runs once on the larger batch) and under :func:`torch.func.grad`.

A problem that does not reach the tolerance within ``max_iter`` iterations raises
:class:`QPConvergenceError`, naming the residual, the problem and the way out; an infeasible problem or a
``Q`` that is not positive definite shows up the same way (the residuals stall).
"""

# ruff: noqa: N803  (Q, G, A: the standard names of a QP's matrices)
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["QPConvergenceError", "QPSolution", "kkt_residuals", "qp_solve"]

DEFAULT_TOL = 1e-9
"""Convergence tolerance: every KKT residual (max norm), complementarity ``max_i s_i lam_i`` included,
below ``tol * (1 + the largest magnitude in p, h, b)``."""
DEFAULT_MAX_ITER = 50
"""Interior-point iterations before :class:`QPConvergenceError` (Mehrotra's method usually needs 10-25)."""
_STEP_FRACTION = 0.99
"""Fraction of the step to the boundary of ``s >= 0, lam >= 0`` taken (keeps iterates interior)."""


class QPConvergenceError(RuntimeError):
    """The interior-point method did not reach its tolerance within its iterations."""


@dataclass(frozen=True)
class QPSolution:
    """The solution of a batch of QPs.

    Attributes:
        z: ``[batch, n]`` primal solution (differentiable w.r.t. ``Q, p, G, h, A, b``).
        lam: ``[batch, m]`` multipliers of ``G z <= h`` (>= 0; not differentiable).
        nu: ``[batch, k]`` multipliers of ``A z = b`` (not differentiable).
        iterations: interior-point iterations taken (0 for a problem without inequalities,
            solved by one linear system).
    """

    z: Tensor
    lam: Tensor
    nu: Tensor
    iterations: int


def _bmv(m: Tensor, v: Tensor) -> Tensor:
    """``[B, r, c] @ [B, c] -> [B, r]``."""
    return (m @ v.unsqueeze(-1)).squeeze(-1)


def kkt_residuals(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, z: Tensor, lam: Tensor,
                  nu: Tensor) -> dict[str, Tensor]:
    """The KKT residuals of batched QPs at ``(z, lam, nu)``, each ``[batch]`` (max norm over the problem):

    * ``stationarity``: ``Q z + p + G^T lam + A^T nu``,
    * ``inequality``: the violation ``max(G z - h, 0)``,
    * ``equality``: ``A z - b``,
    * ``complementarity``: ``lam * (h - G z)``,
    * ``dual_sign``: the violation ``max(-lam, 0)``.

    Shapes as in :func:`qp_solve` (batched, ``m`` or ``k`` may be 0).
    """
    Qs = (Q + Q.mT) / 2
    slack = h - _bmv(G, z)

    def top(x: Tensor) -> Tensor:
        return x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])

    return {
        "stationarity": top(_bmv(Qs, z) + p + _bmv(G.mT, lam) + _bmv(A.mT, nu)),
        "inequality": top((-slack).clamp_min(0)),
        "equality": top(_bmv(A, z) - b),
        "complementarity": top(lam * slack),
        "dual_sign": top((-lam).clamp_min(0)),
    }


def _max_step(x: Tensor, dx: Tensor) -> Tensor:
    """``[B]``: the largest ``a <= 1`` with ``x + a dx >= 0`` (``x > 0``)."""
    ratio = torch.where(dx < 0, -x / dx.clamp(max=-torch.finfo(x.dtype).tiny), torch.ones_like(x))
    return ratio.amin(-1).clamp(max=1.0) if x.shape[-1] else x.new_ones(x.shape[:-1])


def _newton(Q: Tensor, G: Tensor, A: Tensor, w: Tensor, r_d: Tensor, t: Tensor,
            r_e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Newton system of the interior point, ``lam`` eliminated (``w = lam / s``, ``[B, m]``)::

        [Q + G^T W G   A^T] [dz]   [-r_d + G^T W t]
        [A             0  ] [dnu] = [-r_e          ],      dlam = W (G dz - t)
    """
    n, k = Q.shape[-1], A.shape[-2]
    H = Q + G.mT @ (w.unsqueeze(-1) * G)
    top = torch.cat([H, A.mT], dim=-1)
    bottom = torch.cat([A, A.new_zeros(A.shape[0], k, k)], dim=-1)
    K = torch.cat([top, bottom], dim=-2)
    rhs = torch.cat([-r_d + _bmv(G.mT, w * t), -r_e], dim=-1)
    sol = torch.linalg.solve(K, rhs)
    dz, dnu = sol[..., :n], sol[..., n:]
    dlam = w * (_bmv(G, dz) - t)
    return dz, dlam, dnu


def _interior_point(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, tol: float,
                    max_iter: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Mehrotra's predictor-corrector method on float64 batched problems; see :func:`qp_solve`."""
    B, m, k = p.shape[0], h.shape[-1], b.shape[-1]
    ones_m = h.new_ones(B, m)
    # start: the equality-constrained problem with unit scaling (CVXOPT's initial point), made interior
    z, r, nu = _newton(Q, G, A, ones_m, p, h, -b)  # Q z + G^T (G z - h) + A^T nu = -p, A z = b; r = G z - h
    if m == 0:
        return z, r, nu, 0
    s, lam = -r, r
    s = torch.where(s.amin(-1, keepdim=True) > 0, s, s - s.amin(-1, keepdim=True) + 1.0)
    lam = torch.where(lam.amin(-1, keepdim=True) > 0, lam, lam - lam.amin(-1, keepdim=True) + 1.0)
    scale = 1.0 + max(float(p.abs().max()), float(h.abs().max()), float(b.abs().max()) if k else 0.0)
    worst = float("inf")
    for it in range(1, max_iter + 1):
        r_d = _bmv(Q, z) + p + _bmv(G.mT, lam) + _bmv(A.mT, nu)
        r_p = _bmv(G, z) + s - h
        r_e = _bmv(A, z) - b
        mu = (s * lam).sum(-1) / m
        worst_each = torch.stack([r_d.abs().amax(-1), r_p.abs().amax(-1), (s * lam).amax(-1)]).amax(0)
        if k:
            worst_each = torch.maximum(worst_each, r_e.abs().amax(-1))
        worst = float(worst_each.max())
        if worst <= tol * scale:
            return z, lam, nu, it - 1
        done = (worst_each <= tol * scale).unsqueeze(-1)  # converged problems stay where they are
        w = lam / s
        # predictor (affine scaling): complementarity target 0
        dz, dlam, dnu = _newton(Q, G, A, w, r_d, s - r_p, r_e)
        ds = -s - s * dlam / lam
        a = torch.minimum(_max_step(s, ds), _max_step(lam, dlam)).unsqueeze(-1)
        mu_aff = ((s + a * ds) * (lam + a * dlam)).sum(-1) / m
        sigma = (mu_aff / mu).clamp(0, 1).pow(3).unsqueeze(-1)
        # corrector: centring towards sigma * mu and Mehrotra's second-order term
        r_c = s * lam + ds * dlam - sigma * mu.unsqueeze(-1)
        dz, dlam, dnu = _newton(Q, G, A, w, r_d, r_c / lam - r_p, r_e)
        ds = (-r_c - s * dlam) / lam
        a = (_STEP_FRACTION * torch.minimum(_max_step(s, ds), _max_step(lam, dlam))).clamp(max=1.0).unsqueeze(-1)
        a = torch.where(done, torch.zeros_like(a), a)
        z, s, lam, nu = z + a * dz, s + a * ds, lam + a * dlam, nu + a * dnu
    bad = int(worst_each.argmax())
    raise QPConvergenceError(
        f"the QP solver did not converge in max_iter = {max_iter} interior-point iterations: the largest KKT "
        f"residual is {worst:.3g} (problem {bad} of the batch of {B}), above tol * scale = {tol * scale:.3g} "
        f"(tol = {tol:g}). Raise max_iter or loosen tol; if it persists, check that Q is positive definite "
        "and that the constraints G z <= h, A z = b can be met.")


def _kkt_backward(Q: Tensor, G: Tensor, A: Tensor, h: Tensor, z: Tensor, lam: Tensor, nu: Tensor,
                  gz: Tensor) -> tuple[Tensor, ...]:
    """Gradients w.r.t. ``(Q, p, G, h, A, b)`` from ``gz = dl/dz`` by the differentiated KKT conditions.

    With ``M = [[Q, G^T, A^T], [D(lam) G, D(G z - h), 0], [A, 0, 0]]`` (the Jacobian of the KKT conditions
    in ``(z, lam, nu)``), ``[d_z; d_lam; d_nu] = -M^{-T} [gz; 0; 0]`` and (OptNet, eq. 8)::

        dl/dQ = sym(d_z z^T)   dl/dp = d_z   dl/dG = lam d_z^T + D(lam) d_lam z^T   dl/dh = -lam * d_lam
        dl/dA = nu d_z^T + d_nu z^T          dl/db = -d_nu
    """
    B, n, m, k = z.shape[0], z.shape[-1], lam.shape[-1], nu.shape[-1]
    slack = _bmv(G, z) - h  # <= 0
    row1 = torch.cat([Q, G.mT, A.mT], dim=-1)
    row2 = torch.cat([lam.unsqueeze(-1) * G, torch.diag_embed(slack), G.new_zeros(B, m, k)], dim=-1)
    row3 = torch.cat([A, A.new_zeros(B, k, m), A.new_zeros(B, k, k)], dim=-1)
    M = torch.cat([row1, row2, row3], dim=-2)
    rhs = torch.cat([gz, gz.new_zeros(B, m + k)], dim=-1)
    d = -torch.linalg.solve(M.mT, rhs)
    d_z, d_lam, d_nu = d[..., :n], d[..., n : n + m], d[..., n + m :]
    outer = d_z.unsqueeze(-1) * z.unsqueeze(-2)
    gQ = (outer + outer.mT) / 2
    gG = lam.unsqueeze(-1) * d_z.unsqueeze(-2) + (lam * d_lam).unsqueeze(-1) * z.unsqueeze(-2)
    gh = -lam * d_lam
    gA = nu.unsqueeze(-1) * d_z.unsqueeze(-2) + d_nu.unsqueeze(-1) * z.unsqueeze(-2)
    gb = -d_nu
    return gQ, d_z, gG, gh, gA, gb


class _QP(torch.autograd.Function):
    """``(Q, p, G, h, A, b) -> (z, lam, nu)``, all batched; ``lam`` and ``nu`` are not differentiable."""

    @staticmethod
    def forward(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, tol: float,
                max_iter: int, iterations: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        dtype = p.dtype
        with torch.autocast(p.device.type, enabled=False):
            f64 = [t.detach().to(torch.float64) for t in (Q, p, G, h, A, b)]
            for name, t in zip("QpGhAb", f64, strict=True):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"qp_solve: {name} has non-finite values (nan or inf); the QP needs finite "
                                     "data (check the features or scales that built it).")
            Qs = (f64[0] + f64[0].mT) / 2
            z, lam, nu, its = _interior_point(Qs, f64[1], f64[2], f64[3], f64[4], f64[5], tol, max_iter)
        iterations.append(its)
        return z.to(dtype), lam.to(dtype), nu.to(dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        Q, _p, G, h, A, _b = inputs[:6]
        z, lam, nu = output
        ctx.save_for_backward(Q, G, h, A, z, lam, nu)
        ctx.dtypes = [t.dtype for t in inputs[:6]]
        ctx.mark_non_differentiable(lam, nu)

    @staticmethod
    def backward(ctx: Any, gz: Tensor, _glam: Tensor, _gnu: Tensor) -> tuple[Tensor | None, ...]:
        Q, G, h, A, z, lam, nu = (t.to(torch.float64) for t in ctx.saved_tensors)
        Qs = (Q + Q.mT) / 2
        grads = _kkt_backward(Qs, G, A, h, z, lam, nu, gz.to(torch.float64))
        out = tuple(g.to(dt) if need else None
                    for g, dt, need in zip(grads, ctx.dtypes, ctx.needs_input_grad[:6], strict=True))
        return (*out, None, None, None)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor,
             b: Tensor, tol: float, max_iter: int, iterations: list[int]) -> tuple[tuple[Tensor, ...],
                                                                                     tuple[int, ...]]:
        """Under ``vmap`` the mapped dimension joins the batch: one solve of ``[mapped * batch]`` problems."""
        V = info.batch_size
        flat = []
        for t, d in zip((Q, p, G, h, A, b), in_dims[:6], strict=True):
            t = t.movedim(d, 0) if d is not None else t.expand(V, *t.shape)
            flat.append(t.reshape(V * t.shape[1], *t.shape[2:]))
        z, lam, nu = _apply(flat, tol, max_iter, iterations)
        B = flat[1].shape[0] // V  # p's batch, wherever vmap put the mapped dimension
        return (z.reshape(V, B, -1), lam.reshape(V, B, -1), nu.reshape(V, B, -1)), (0, 0, 0)


def _apply(tensors: list[Tensor], tol: float, max_iter: int,
           iterations: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``_QP.apply`` typed: ``tensors`` are ``(Q, p, G, h, A, b)``, batched alike."""
    out: tuple[Tensor, Tensor, Tensor] = _QP.apply(*tensors, tol, max_iter, iterations)  # type: ignore[no-untyped-call]
    return out


def _batched(x: Tensor, name: str, dims: int) -> Tensor:
    if x.dim() == dims - 1:
        return x.unsqueeze(0)
    if x.dim() != dims:
        raise ValueError(f"qp_solve: {name} has shape {tuple(x.shape)}; give it as [batch, ...] with "
                         f"{dims} dimensions (or {dims - 1} for one problem shared by the batch).")
    return x


def qp_solve(Q: Tensor, p: Tensor, G: Tensor | None = None, h: Tensor | None = None, A: Tensor | None = None,
             b: Tensor | None = None, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER) -> QPSolution:
    """Solve ``min 1/2 z^T Q z + p^T z  s.t.  G z <= h, A z = b`` for a batch of problems, differentiably.

    Args:
        Q: ``[batch, n, n]`` positive definite (its symmetric part is used).
        p: ``[batch, n]``.
        G: ``[batch, m, n]`` inequality constraints ``G z <= h`` (``None``: none).
        h: ``[batch, m]`` (``None`` with ``G``).
        A: ``[batch, k, n]`` equality constraints ``A z = b`` (``None``: none); full row rank.
        b: ``[batch, k]`` (``None`` with ``A``).
        tol: convergence tolerance, relative to ``1 + max(|p|, |h|, |b|)`` (see :data:`DEFAULT_TOL`).
        max_iter: interior-point iterations before :class:`QPConvergenceError`.

    Any argument may drop its leading ``batch`` dimension to be shared by every problem. The solver runs
    in float64; the solution comes back in ``p``'s dtype, and gradients flow to every tensor argument by
    implicit differentiation of the KKT conditions.

    Returns:
        :class:`QPSolution` with ``z [batch, n]``, ``lam [batch, m]``, ``nu [batch, k]``.

    Raises:
        ValueError: shapes that do not fit, non-finite values, or a bad ``tol`` / ``max_iter``,
            before any work.
        QPConvergenceError: the tolerance was not reached within ``max_iter`` iterations.
    """
    if not (isinstance(tol, float | int) and not isinstance(tol, bool) and 0 < tol < 1):
        raise ValueError(f"qp_solve: tol = {tol!r} is invalid: give a number in (0, 1), e.g. {DEFAULT_TOL}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"qp_solve: max_iter = {max_iter!r} is invalid: give an integer >= 1.")
    if (G is None) != (h is None) or (A is None) != (b is None):
        raise ValueError("qp_solve: give G with h and A with b (both or neither of each pair).")
    Q, p = _batched(Q, "Q", 3), _batched(p, "p", 2)
    n = p.shape[-1]
    if G is None or h is None:
        G, h = p.new_zeros(1, 0, n), p.new_zeros(1, 0)
    if A is None or b is None:
        A, b = p.new_zeros(1, 0, n), p.new_zeros(1, 0)
    G, h, A, b = _batched(G, "G", 3), _batched(h, "h", 2), _batched(A, "A", 3), _batched(b, "b", 2)
    m, k = h.shape[-1], b.shape[-1]
    if n < 1:
        raise ValueError("qp_solve: p has no variables (its last dimension is 0); give at least one.")
    wanted = {"Q": (n, n), "G": (m, n), "h": (m,), "A": (k, n), "b": (k,)}
    for name, t in (("Q", Q), ("G", G), ("h", h), ("A", A), ("b", b)):
        if tuple(t.shape[1:]) != wanted[name]:
            raise ValueError(f"qp_solve: {name} has shape {tuple(t.shape)} but p has {n} variables, h {m} "
                             f"inequalities and b {k} equalities: {name} must be [batch, "
                             f"{', '.join(map(str, wanted[name]))}].")
    if k > n:
        raise ValueError(f"qp_solve: {k} equality constraints on {n} variables; A must have full row rank "
                         "(at most n rows).")
    sizes = {t.shape[0] for t in (Q, p, G, h, A, b)} - {1}
    if len(sizes) > 1:
        raise ValueError(f"qp_solve: the batch sizes {sorted(sizes)} differ; give one batch size (or 1 / no "
                         "batch dimension for a shared argument).")
    batch = sizes.pop() if sizes else 1
    tensors = [t.expand(batch, *t.shape[1:]) for t in (Q, p, G, h, A, b)]
    for name, t in zip("QpGhAb", tensors, strict=True):
        if not t.is_floating_point():
            raise ValueError(f"qp_solve: {name} is {t.dtype}; give floating-point tensors.")
    iterations: list[int] = []
    z, lam, nu = _apply(tensors, float(tol), max_iter, iterations)
    return QPSolution(z, lam, nu, max(iterations, default=0))
