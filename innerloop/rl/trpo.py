"""Trust-region policy optimisation (Schulman et al. 2015) as an outer optimiser of parameter dicts.

One step maximises a surrogate advantage under a bound on the mean KL divergence between the
policy that sampled the data and the new one::

    min_theta  L(theta)   subject to   KL(theta_old, theta) <= max_kl

The step direction solves ``F x = -grad L`` with ``F`` the Fisher matrix (the Hessian of the mean
KL at ``theta_old``), by conjugate gradient (:func:`innerloop.numerics.conjugate_gradient`, stopped
early at a squared residual of ``CG_TOLERANCE``) on Fisher-vector products from double backward; it is
scaled to the boundary of the trust region (``0.5 s^T F s = max_kl``) and a backtracking line
search halves it until the surrogate improves and the measured KL is within the bound, or gives up
and keeps ``theta_old``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from innerloop.adapt import Params
from innerloop.numerics import conjugate_gradient, flatten, unflatten

Objective = Callable[[Params], tuple[Tensor, Tensor]]
"""``params -> (surrogate loss to minimise, mean KL from the sampling policy)``, both scalars."""

CG_TOLERANCE = 1e-10
"""Conjugate gradient stops once the squared residual of the natural-gradient system is below this."""


def fisher_vector_product(kl: Tensor, params: Sequence[Tensor],
                          damping: float = 0.0) -> Callable[[Tensor], Tensor]:
    """``v -> (H + damping I) v`` with ``H`` the Hessian of the scalar ``kl`` w.r.t. ``params`` (the
    Fisher matrix when ``kl`` is the mean KL from the current policy), by double backward."""
    grad_kl = flatten(torch.autograd.grad(kl, params, create_graph=True))

    def fvp(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(grad_kl @ v, params, retain_graph=True)
        return flatten(hv) + damping * v

    return fvp


@dataclass(frozen=True)
class TRPOStats:
    """What one TRPO step did."""

    loss_before: float
    loss_after: float
    kl: float
    """Mean KL between the sampling policy and the accepted one (0 when no step was accepted)."""
    step_fraction: float
    """The accepted fraction of the full trust-region step (0: rejected, parameters unchanged)."""


def trpo_step(params: Mapping[str, Tensor], objective: Objective, max_kl: float = 0.01,
              cg_iterations: int = 10, damping: float = 1e-5, backtracks: int = 15,
              backtrack_ratio: float = 0.5, fisher_kl: Callable[[Params], Tensor] | None = None) -> TRPOStats:
    """One TRPO update of ``params`` in place.

    Args:
        params: the leaf tensors to update (``named_parameters()`` of the policy).
        objective: see :data:`Objective`; called at the current and at candidate parameters.
        max_kl: the trust region (the MAML paper: 0.01).
        cg_iterations: conjugate-gradient iterations (10).
        damping: added to the Fisher matrix for numerical stability.
        backtracks: how many times the line search shrinks the step.
        backtrack_ratio: the shrink factor per backtrack.
        fisher_kl: the mean KL whose Hessian gives the Fisher-vector products (default: the
            objective's); e.g. the KL on a share of the data, which makes each conjugate-gradient
            iteration cheaper (rllab's ``subsample_factor``). The line search always checks the
            objective's own KL.
    """
    if max_kl <= 0 or cg_iterations < 1 or backtracks < 1 or not 0 < backtrack_ratio < 1:
        raise ValueError(f"need max_kl > 0 (got {max_kl}), cg_iterations >= 1 (got {cg_iterations}), "
                         f"backtracks >= 1 (got {backtracks}) and 0 < backtrack_ratio < 1 "
                         f"(got {backtrack_ratio}).")
    leaves = list(params.values())
    loss, kl = objective(dict(params))
    grad = flatten(torch.autograd.grad(loss, leaves, retain_graph=fisher_kl is None))
    if fisher_kl is not None:
        kl = fisher_kl(dict(params))
    fvp = fisher_vector_product(kl, leaves, damping)
    direction = conjugate_gradient(fvp, -grad, cg_iterations, tolerance=CG_TOLERANCE)
    shs = 0.5 * direction @ fvp(direction)
    loss_before = float(loss.detach())
    if not torch.isfinite(shs) or shs <= 0:
        return TRPOStats(loss_before, loss_before, 0.0, 0.0)
    full_step = direction * torch.sqrt(max_kl / shs)
    old = flatten([p.detach() for p in leaves]).clone()
    del loss, kl, fvp  # free the double-backward graph before the line search
    fraction = 1.0
    for _ in range(backtracks):
        candidate = unflatten(old + fraction * full_step, params)
        loss_t, kl_t = objective({n: t.detach() for n, t in candidate.items()})
        new_loss, new_kl = float(loss_t.detach()), float(kl_t.detach())
        if new_loss < loss_before and new_kl <= max_kl:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(candidate[name])
            return TRPOStats(loss_before, new_loss, new_kl, fraction)
        fraction *= backtrack_ratio
    return TRPOStats(loss_before, loss_before, 0.0, 0.0)
