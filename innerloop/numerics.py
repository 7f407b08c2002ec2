"""Linear algebra on parameter dicts: one conjugate gradient, dot products, flatten / unflatten.

Parameters are ``dict[str, Tensor]`` throughout the library; these helpers work on such dicts
directly, so a solver never has to concatenate the parameters of a network into one vector (and
copy them back). A flat tensor is the special case of a one-entry dict.

Used by iMAML (the implicit gradient, under ``torch.func.vmap``) and by TRPO (the natural
gradient direction from Fisher-vector products).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import cast, overload

import torch
from torch import Tensor

__all__ = ["conjugate_gradient", "dot", "flatten", "student_t_quantile", "unflatten"]

TensorDict = Mapping[str, Tensor]


def dot(a: TensorDict, b: TensorDict) -> Tensor:
    """``sum_k <a[k], b[k]>``: the inner product of two dicts of tensors with the same keys and shapes
    (a 0-dimensional tensor; differentiable, and fine under ``vmap``)."""
    total: Tensor | None = None
    for k in a:
        term = (a[k] * b[k]).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("dot of empty dicts: there is nothing to multiply.")
    return total


def flatten(tensors: TensorDict | Sequence[Tensor]) -> Tensor:
    """One vector of every entry of ``tensors`` (a dict in its key order, or a sequence), each
    reshaped to 1-D."""
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    return torch.cat([t.reshape(-1) for t in values])


def unflatten(vector: Tensor, like: TensorDict) -> dict[str, Tensor]:
    """The inverse of :func:`flatten`: ``vector`` cut into views shaped like the entries of ``like``."""
    total = sum(p.numel() for p in like.values())
    if vector.numel() != total:
        raise ValueError(f"a vector of {vector.numel()} numbers cannot fill tensors of {total} numbers.")
    out, i = {}, 0
    for name, p in like.items():
        out[name] = vector[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def _nonzero(t: Tensor) -> Tensor:
    """``t`` with exact zeros replaced by one: a division guard without a data-dependent branch."""
    return torch.where(t == 0, torch.ones_like(t), t)


@overload
def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int = 10, *,
                       tolerance: float | None = None) -> Tensor: ...


@overload
def conjugate_gradient(matvec: Callable[[dict[str, Tensor]], TensorDict], b: TensorDict, steps: int = 10, *,
                       tolerance: float | None = None) -> dict[str, Tensor]: ...


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor] | Callable[[dict[str, Tensor]], TensorDict],
    b: Tensor | TensorDict,
    steps: int = 10,
    *,
    tolerance: float | None = None,
) -> Tensor | dict[str, Tensor]:
    """Approximately solve ``A x = b`` for a symmetric positive-definite ``A`` given as
    ``matvec(v) = A v``, by ``steps`` iterations of conjugate gradient from ``x = 0``.

    Args:
        matvec: ``v -> A v``, on dicts of tensors shaped like ``b`` (or on tensors, when ``b`` is one).
        b: the right-hand side: a dict of tensors (``Params``) or a tensor.
        steps: the number of iterations. In exact arithmetic as many iterations as unknowns
            solve the system exactly.
        tolerance: stop early once the squared residual ``|r|^2`` falls below it (``None``: run
            all ``steps``). That test is a data-dependent Python branch, so it cannot run under
            ``torch.func.vmap``: leave it ``None`` there.

    Without ``tolerance`` the iteration count is fixed and there is no data-dependent branch, so
    it runs under ``vmap`` (iMAML solves one system per task that way). Divisions are guarded:
    once the residual is exactly zero (a zero ``b``, or an exact solution) the iterate stops
    moving instead of turning into NaNs.
    """
    if steps < 0:
        raise ValueError(f"conjugate gradient needs steps >= 0, got {steps}.")
    if isinstance(b, Tensor):
        on_tensor = cast(Callable[[Tensor], Tensor], matvec)
        return _solve(lambda v: {"x": on_tensor(v["x"])}, {"x": b}, steps, tolerance)["x"]
    return _solve(cast(Callable[[dict[str, Tensor]], TensorDict], matvec), b, steps, tolerance)


def _solve(matvec: Callable[[dict[str, Tensor]], TensorDict], b: TensorDict, steps: int,
           tolerance: float | None) -> dict[str, Tensor]:
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r, p = dict(b), dict(b)
    rs = dot(r, r)
    for _ in range(steps):
        if tolerance is not None and bool(rs < tolerance):
            break
        ap = matvec(p)
        alpha = rs / _nonzero(dot(p, ap))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = dot(r, r)
        beta = rs_new / _nonzero(rs)
        p = {k: r[k] + beta * p[k] for k in p}
        rs = rs_new
    return x


# -- Student's t (confidence intervals from few tasks) ----------------------------------------------------
def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` (Lentz's continued fraction)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side only
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front) / a
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df > 0`` degrees of freedom (bisection on the CDF, to
    1e-12): 12.706 for ``(0.975, 1)``, 2.023 for ``(0.975, 39)``, 1.964 for ``(0.975, 599)``."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p = {p!r}, df = {df!r}.")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)
