"""The batched QP solver: solutions against closed forms, brute force and projected gradient;
KKT residuals; gradients by implicit differentiation against finite differences (float64);
vmap and torch.func.grad; clear errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import grad, vmap

from innerloop.qp import QPConvergenceError, kkt_residuals, qp_solve

f64 = torch.float64


def random_problem(seed: int, batch: int = 3, n: int = 5, m: int = 4, k: int = 1):
    """Strictly convex, feasible problems (a known feasible point ``z0``) with some active constraints."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(batch, n, n, generator=g, dtype=f64)
    Q = L @ L.mT + 0.5 * torch.eye(n, dtype=f64)
    p = 3 * torch.randn(batch, n, generator=g, dtype=f64)
    G = torch.randn(batch, m, n, generator=g, dtype=f64)
    z0 = torch.randn(batch, n, generator=g, dtype=f64)
    h = (G @ z0[..., None]).squeeze(-1) + torch.rand(batch, m, generator=g, dtype=f64)
    A = torch.randn(batch, k, n, generator=g, dtype=f64)
    b = (A @ z0[..., None]).squeeze(-1)
    return Q, p, G, h, A, b


def brute_force(Q, p, G, h, A, b):  # noqa: N803  (a QP's standard names)
    """The unique KKT point of one problem, by trying every active set of the inequalities."""
    n, m, k = p.shape[0], h.shape[0], b.shape[0]
    for size in range(m + 1):
        for active in itertools.combinations(range(m), size):
            E = torch.cat([A, G[list(active)]]) if size else A
            e = torch.cat([b, h[list(active)]]) if size else b
            K = torch.cat([torch.cat([Q, E.T], 1), torch.cat([E, torch.zeros(len(e), len(e), dtype=f64)], 1)])
            try:
                sol = torch.linalg.solve(K, torch.cat([-p, e]))
            except RuntimeError:
                continue
            z, mult = sol[:n], sol[n:]
            lam = mult[k:]
            if (G @ z <= h + 1e-9).all() and (lam >= -1e-9).all():
                return z
    raise AssertionError("no KKT point found")


def test_unconstrained_and_equality_only_match_the_closed_form():
    Q, p, _, _, A, b = random_problem(0, k=2)
    z = qp_solve(Q, p).z
    torch.testing.assert_close(z, -torch.linalg.solve(Q, p))
    sol = qp_solve(Q, p, A=A, b=b)
    n, k = p.shape[-1], b.shape[-1]
    K = torch.cat([torch.cat([Q, A.mT], -1), torch.cat([A, torch.zeros(3, k, k, dtype=f64)], -1)], -2)
    closed = torch.linalg.solve(K, torch.cat([-p, b], -1))
    assert sol.iterations == 0  # no inequalities: one linear system, no interior point
    torch.testing.assert_close(sol.z, closed[:, :n])
    torch.testing.assert_close(sol.nu, closed[:, n:])


def test_box_constrained_1d_and_2d_by_hand():
    # min 1/2 q z^2 + p z  s.t. lo <= z <= hi: z = clip(-p / q, lo, hi)
    q = torch.tensor([2.0, 2.0, 2.0], dtype=f64)
    p = torch.tensor([1.0, -10.0, 10.0], dtype=f64)  # unconstrained minimisers -0.5, 5, -5
    G = torch.tensor([[1.0], [-1.0]], dtype=f64)  # z <= 1, -z <= 1
    h = torch.tensor([1.0, 1.0], dtype=f64)
    sol = qp_solve(q[:, None, None], p[:, None], G, h, tol=1e-11)
    torch.testing.assert_close(sol.z[:, 0], torch.tensor([-0.5, 1.0, -1.0], dtype=f64))
    # multipliers: interior 0; at z = 1, lam_upper = -(q z + p) = 8; at z = -1, lam_lower = q z + p = 8
    torch.testing.assert_close(sol.lam, torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]], dtype=f64),
                               atol=1e-8, rtol=0)
    # 2-D separable: a diagonal Q clips each coordinate on its own
    Q2 = torch.diag(torch.tensor([1.0, 4.0], dtype=f64))
    p2 = torch.tensor([-3.0, 2.0], dtype=f64)  # unconstrained (3, -0.5)
    G2 = torch.cat([torch.eye(2, dtype=f64), -torch.eye(2, dtype=f64)])
    h2 = torch.tensor([1.0, 1.0, 1.0, 0.25], dtype=f64)  # -1 <= z1 <= 1, -0.25 <= z2 <= 1
    torch.testing.assert_close(qp_solve(Q2, p2, G2, h2, tol=1e-11).z[0], torch.tensor([1.0, -0.25], dtype=f64))


@pytest.mark.parametrize("seed", range(4))
def test_random_problems_match_brute_force_and_satisfy_kkt(seed):
    Q, p, G, h, A, b = random_problem(seed)
    sol = qp_solve(Q, p, G, h, A, b, tol=1e-10)
    for i in range(p.shape[0]):
        torch.testing.assert_close(sol.z[i], brute_force(Q[i], p[i], G[i], h[i], A[i], b[i]), atol=1e-7, rtol=0)
    scale = 1 + max(p.abs().max(), h.abs().max(), b.abs().max())
    for name, r in kkt_residuals(Q, p, G, h, A, b, sol.z, sol.lam, sol.nu).items():
        assert float(r.max()) <= 1e-10 * scale, name


def test_box_qp_matches_projected_gradient():
    g = torch.Generator().manual_seed(5)
    L = torch.randn(2, 4, 4, generator=g, dtype=f64)
    Q = L @ L.mT + 0.3 * torch.eye(4, dtype=f64)
    p = 4 * torch.randn(2, 4, generator=g, dtype=f64)
    G = torch.cat([torch.eye(4, dtype=f64), -torch.eye(4, dtype=f64)])
    h = torch.ones(8, dtype=f64)  # |z_i| <= 1
    z = torch.zeros(2, 4, dtype=f64)
    step = 1 / torch.linalg.eigvalsh(Q).amax(-1, keepdim=True)
    for _ in range(5000):
        z = (z - step * ((Q @ z[..., None]).squeeze(-1) + p)).clamp(-1, 1)
    sol = qp_solve(Q, p, G, h, tol=1e-11)
    assert bool(((sol.z.abs() - 1).abs() < 1e-6).any())  # some bounds active
    torch.testing.assert_close(sol.z, z, atol=1e-7, rtol=0)


def test_gradients_of_every_input_match_finite_differences():
    Q, p, G, h, A, b = random_problem(1, batch=2, n=4, m=4, k=1)
    sol = qp_solve(Q, p, G, h, A, b)
    active = sol.lam > 1e-6
    assert bool(active.any()) and bool((~active).any())  # both kinds of constraint are exercised
    args = [t.clone().requires_grad_() for t in (Q, p, G, h, A, b)]
    torch.autograd.gradcheck(lambda *a: qp_solve(*a, tol=1e-11).z, args)


def test_gradient_of_a_box_qp_is_the_closed_form():
    q = torch.tensor([2.0, 2.0], dtype=f64)
    p = torch.tensor([1.0, -10.0], dtype=f64, requires_grad=True)  # z = -p/q (interior), z = 1 (active)
    G, h = torch.tensor([[1.0], [-1.0]], dtype=f64), torch.tensor([1.0, 1.0], dtype=f64, requires_grad=True)
    z = qp_solve(q[:, None, None], p[:, None], G, h, tol=1e-11).z[:, 0]
    dp, dh = torch.autograd.grad(z.sum(), [p, h])
    torch.testing.assert_close(dp, torch.tensor([-0.5, 0.0], dtype=f64), atol=1e-8, rtol=0)
    torch.testing.assert_close(dh, torch.tensor([1.0, 0.0], dtype=f64), atol=1e-8, rtol=0)  # dz/dh_upper = 1


def test_backward_is_one_node_not_the_unrolled_iterations():
    Q, p, G, h, A, b = random_problem(2)
    p = p.requires_grad_()
    sol = qp_solve(Q, p, G, h, A, b)
    assert sol.iterations > 3
    assert "QPBackward" in type(sol.z.grad_fn).__name__
    # the graph between p and z is that single node (plus the expand of shared inputs)
    assert all("QPBackward" in type(f).__name__ or f is None or "AccumulateGrad" in type(f).__name__
               or "Expand" in type(f).__name__ for f, _ in sol.z.grad_fn.next_functions)


def test_shared_inputs_broadcast_and_their_gradients_sum():
    Q, p, G, h, A, b = random_problem(3)
    Gs, hs = G[0].clone().requires_grad_(), h[0].clone().requires_grad_()
    z = qp_solve(Q, p, Gs, hs, A, b).z
    zb = qp_solve(Q, p, G[0].expand(3, -1, -1), h[0].expand(3, -1), A, b).z
    torch.testing.assert_close(z, zb)
    dG, dh = torch.autograd.grad(z.sum(), [Gs, hs])
    assert dG.shape == Gs.shape and dh.shape == hs.shape


def test_vmap_and_func_grad_agree_with_the_batched_solver():
    Q, p, G, h, A, b = random_problem(4, batch=4)
    per = vmap(lambda q_, p_: qp_solve(q_, p_, G[0], h[0], A[0], b[0]).z)(Q, p)
    torch.testing.assert_close(per[:, 0], qp_solve(Q, p, G[0], h[0], A[0], b[0]).z)  # each call: a batch of 1
    # vmap with an inner batch: the mapped dimension joins the batch
    P = p.reshape(2, 2, -1)
    nested = vmap(lambda p_: qp_solve(Q[:2], p_, G[:2], h[:2], A[:2], b[:2]).z)(P)
    torch.testing.assert_close(nested, torch.stack([qp_solve(Q[:2], P[i], G[:2], h[:2], A[:2], b[:2]).z
                                                    for i in range(2)]))

    def loss(p_, h_):
        return qp_solve(Q[0], p_, G[0], h_, A[0], b[0]).z.pow(2).sum()

    per_grad = vmap(grad(loss, argnums=(0, 1)))(p, h)
    for i in range(4):
        pi, hi = p[i].clone().requires_grad_(), h[i].clone().requires_grad_()
        ref = torch.autograd.grad(loss(pi, hi), [pi, hi])
        torch.testing.assert_close(per_grad[0][i], ref[0])
        torch.testing.assert_close(per_grad[1][i], ref[1])


def test_float32_inputs_are_solved_in_float64_and_returned_in_float32():
    Q, p, G, h, A, b = random_problem(6)
    sol32 = qp_solve(*(t.float() for t in (Q, p, G, h, A, b)))
    assert sol32.z.dtype == torch.float32
    torch.testing.assert_close(sol32.z.double(), qp_solve(Q, p, G, h, A, b).z, atol=1e-5, rtol=1e-5)


def test_an_infeasible_problem_is_refused_with_the_residual_and_the_way_out():
    Q = torch.eye(1, dtype=f64)
    p = torch.zeros(1, dtype=f64)
    G, h = torch.tensor([[1.0], [-1.0]], dtype=f64), torch.tensor([-1.0, -1.0], dtype=f64)  # z <= -1, z >= 1
    with pytest.raises(QPConvergenceError, match=r"max_iter = 20 .*residual.*Raise max_iter or loosen tol"):
        qp_solve(Q, p, G, h, max_iter=20)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tol": 0.0}, "tol = 0.0 is invalid"),
    ({"max_iter": 0}, "max_iter = 0 is invalid"),
    ({"G": torch.zeros(2, 3, dtype=f64), "h": torch.zeros(2, dtype=f64)}, "G has shape"),
    ({"G": torch.zeros(2, 2, dtype=f64)}, "both or neither"),
    ({"p": torch.tensor([float("nan"), 0.0], dtype=f64)}, "p has non-finite values"),
    ({"Q": torch.eye(2, dtype=f64).expand(3, 2, 2), "p": torch.zeros(2, 2, dtype=f64)}, "batch sizes"),
])
def test_bad_input_is_refused_before_work(kwargs, message):
    args = {"Q": torch.eye(2, dtype=f64), "p": torch.zeros(2, dtype=f64), **kwargs}
    with pytest.raises(ValueError, match=message):
        qp_solve(**args)


def test_the_vmap_rule_takes_the_mapped_dimension_anywhere():
    """The rule reads p's batch size after moving the mapped dimension first (here vmap maps p's
    dimension 1, which qp_solve's own expand would normally move to 0)."""
    from innerloop.qp import _apply

    Q, p, G, h, A, b = random_problem(4, batch=2)
    P = torch.randn(2, 3, p.shape[-1], dtype=f64)  # [batch, mapped, n]
    out = vmap(lambda p_: _apply([Q, p_, G, h, A, b], 1e-9, 50, [])[0], in_dims=1)(P)
    torch.testing.assert_close(out, torch.stack([qp_solve(Q, P[:, i], G, h, A, b).z for i in range(3)]))
