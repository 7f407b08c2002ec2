"""Linear algebra on parameter dicts: one conjugate gradient, dot products, flatten / unflatten.

Parameters are ``dict[str, Tensor]`` throughout the library; these helpers work on such dicts
directly, so a solver never has to concatenate the parameters of a network into one vector (and
copy them back). A flat tensor is the special case of a one-entry dict.

Used by iMAML (the implicit gradient, under ``torch.func.vmap``) and by TRPO (the natural
gradient direction from Fisher-vector products).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast, overload

import torch
from torch import Tensor

__all__ = ["conjugate_gradient", "dot", "flatten", "unflatten"]

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
