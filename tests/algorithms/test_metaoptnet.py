"""MetaOptNet-SVM and R2D2: the heads against closed forms and the Crammer-Singer KKT conditions,
their gradients and the whole meta-gradient against finite differences (float64), and a short
training run that learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from innerloop.algorithms.metaoptnet import MetaOptNet, MetaOptNetOptions, ridge_weights, svm_dual, svm_qp
from innerloop.algorithms.registry import ALGORITHMS
from innerloop.qp import kkt_residuals, qp_solve
from innerloop.tasks import TaskBatch

f64 = torch.float64


def blobs(g: torch.Generator, ways: int, per_class: int, d: int = 2, spread: float = 0.3):
    """Points ``[ways * per_class, d]`` around ``ways`` well-separated centres, labels ``[ways * per_class]``."""
    angles = torch.arange(ways, dtype=f64) * (2 * torch.pi / ways)
    centres = 3 * torch.stack([angles.cos(), angles.sin(), *[torch.zeros(ways, dtype=f64)] * (d - 2)], -1)
    labels = torch.arange(ways).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), d, generator=g, dtype=f64), labels


@pytest.mark.parametrize(("n", "d"), [(4, 7), (7, 3)])  # the dual (Woodbury) branch and the primal one
def test_ridge_weights_equal_the_primal_closed_form(n, d):
    g = torch.Generator().manual_seed(0)
    X, Y, lam = torch.randn(n, d, generator=g, dtype=f64), torch.randn(n, 3, generator=g, dtype=f64), 0.7
    primal = torch.linalg.solve(X.T @ X + lam * torch.eye(d, dtype=f64), X.T @ Y)
    dual = X.T @ torch.linalg.solve(X @ X.T + lam * torch.eye(n, dtype=f64), Y)
    torch.testing.assert_close(primal, dual)
    torch.testing.assert_close(ridge_weights(X, Y, lam), primal)


@pytest.mark.parametrize(("n", "d"), [(4, 6), (6, 3)])
def test_ridge_gradient_matches_finite_differences(n, d):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=g, dtype=f64, requires_grad=True)
    Y = torch.randn(n, 2, generator=g, dtype=f64, requires_grad=True)
    lam = torch.tensor(0.5, dtype=f64, requires_grad=True)
    torch.autograd.gradcheck(ridge_weights, (X, Y, lam))


def test_svm_dual_satisfies_the_crammer_singer_kkt_conditions_and_strong_duality():
    g = torch.Generator().manual_seed(2)
    X, y = blobs(g, ways=3, per_class=4, spread=1.5)  # overlapping: some margins are violated
    ways, C = 3, 0.5
    alpha = svm_dual(X, y, ways, C, diagonal=0.0, tol=1e-10)  # the SVM's own dual (no added diagonal)
    onehot = F.one_hot(y, ways).to(f64)
    # dual feasibility: alpha_i[c] <= C [c = y_i] and sum_c alpha_i[c] = 0
    assert bool((alpha <= C * onehot + 1e-9).all())
    torch.testing.assert_close(alpha.sum(-1), torch.zeros(len(y), dtype=f64), atol=1e-9, rtol=0)
    # the QP's KKT conditions (stationarity, complementarity, signs) at the solution
    Q, p, G, h, A, b = svm_qp(X, y, ways, C, 0.0)
    sol = qp_solve(Q, p, G, h, A, b, tol=1e-10)
    torch.testing.assert_close(sol.z.reshape(-1, ways)[None], alpha[None])
    for name, r in kkt_residuals(Q[None], p[None], G[None], h[None], A[None], b[None], sol.z, sol.lam,
                                 sol.nu).items():
        assert float(r.max()) < 1e-8, name
    # strong duality with the Crammer-Singer primal at W = X^T alpha:
    # P(W) = 1/2 ||W||^2 + C sum_i max_c (1 - [c = y_i] + w_c.x_i - w_{y_i}.x_i) = sum_i alpha_i[y_i] - 1/2 ||W||^2
    W = X.T @ alpha  # [d, ways]
    scores = X @ W
    slack = (1 - onehot + scores - scores.gather(1, y[:, None])).amax(-1)
    primal = 0.5 * W.pow(2).sum() + C * slack.sum()
    dual = alpha.gather(1, y[:, None]).sum() - 0.5 * W.pow(2).sum()
    torch.testing.assert_close(primal, dual, atol=1e-7, rtol=0)
    assert float(slack.max()) > 0  # some margins are violated: the bound C is exercised


def test_svm_predicts_the_labels_of_separable_data():
    g = torch.Generator().manual_seed(3)
    X, y = blobs(g, ways=5, per_class=2)
    Xq, yq = blobs(g, ways=5, per_class=6)
    alpha = svm_dual(X, y, 5, c=0.1, diagonal=1.0)
    assert torch.equal(((Xq @ X.T) @ alpha).argmax(-1), yq)


def test_svm_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(4)
    X, y = blobs(g, ways=3, per_class=2, d=3, spread=1.0)
    X = X.requires_grad_()
    torch.autograd.gradcheck(lambda x: svm_dual(x, y, 3, c=0.5, diagonal=0.5, tol=1e-11), (X,))


def episodes(seed: int, tasks: int, ways: int = 3, shots: int = 2, queries: int = 3, noise: float = 2.0):
    """A tiny synthetic 2-D family in 4-D inputs: per task, ``ways`` random blobs in the first two
    coordinates; the last two coordinates are large noise that the embedding has to learn to ignore."""
    g = torch.Generator().manual_seed(seed)
    sx, sy, qx, qy = [], [], [], []
    for _ in range(tasks):
        centres = 2 * torch.randn(ways, 2, generator=g, dtype=f64)

        def draw(k: int, centres=centres):
            labels = torch.arange(ways).repeat_interleave(k)
            signal = centres[labels] + 0.3 * torch.randn(len(labels), 2, generator=g, dtype=f64)
            return torch.cat([signal, noise * torch.randn(len(labels), 2, generator=g, dtype=f64)], -1), labels

        (a, b), (c, d) = draw(shots), draw(queries)
        sx.append(a)
        sy.append(b)
        qx.append(c)
        qy.append(d)
    return TaskBatch(torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy))


@pytest.mark.parametrize("name", ["metaoptnet", "r2d2"])
def test_meta_gradient_matches_finite_differences(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    options = ALGORITHMS[name].options({"qp_tol": 1e-11, "learn_lambda": True, "logit_scale": 2.0})
    algo = MetaOptNet(model, "classification", options, task_threads=1)
    batch = episodes(5, tasks=2)
    grads, metrics = algo.meta_gradient(batch)
    params = algo.trainable()
    assert set(grads) == set(params) and ("log_lambda" in params) == (name == "r2d2") and "scale" in params

    def mean_loss() -> float:
        with torch.no_grad():
            losses = [algo.task_loss(algo.model, dict(algo.model.named_parameters()),
                                     tuple(t[i] for t in (batch.support_x, batch.support_y, batch.query_x,
                                                          batch.query_y)), record=False)[0]
                      for i in range(len(batch))]
        return float(torch.stack(losses).mean())

    assert abs(metrics["loss"] - mean_loss()) < 1e-9
    eps = 1e-6
    for key, p in params.items():
        numeric = torch.zeros_like(p)
        for j in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[j] += eps
            up = mean_loss()
            with torch.no_grad():
                p.view(-1)[j] -= 2 * eps
            down = mean_loss()
            with torch.no_grad():
                p.view(-1)[j] += eps
            numeric.view(-1)[j] = (up - down) / (2 * eps)
        torch.testing.assert_close(grads[key], numeric, atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["metaoptnet", "r2d2"])
def test_a_short_training_run_improves_query_accuracy(name):
    torch.manual_seed(0)
    model = nn.Linear(4, 4).double()
    algo = MetaOptNet(model, "classification", ALGORITHMS[name].options(), task_threads=1)
    test = episodes(123, tasks=60)

    def accuracy() -> float:
        return float(algo.evaluate(test, steps=0)["accuracy"].mean())

    before = accuracy()
    opt = torch.optim.Adam(algo.trainable().values(), lr=0.05)
    for step in range(25):
        grads, _ = algo.meta_gradient(episodes(step, tasks=6))
        for k, p in algo.trainable().items():
            p.grad = grads[k]
        opt.step()
    after = accuracy()
    assert after > before + 0.1, (before, after)


def test_evaluate_is_the_same_after_every_step_count():
    algo = MetaOptNet(nn.Linear(4, 3).double(), "classification", head="ridge", task_threads=1)
    out = algo.evaluate(episodes(0, tasks=3), steps=2)
    assert out["accuracy"].shape == (3, 3) and out["loss"].shape == (3, 3)
    assert bool((out["loss"] == out["loss"][:, :1]).all())


def test_registry_options_and_errors():
    assert ALGORITHMS["r2d2"].options().head == "ridge" and ALGORITHMS["metaoptnet"].options().head == "svm"
    assert ALGORITHMS["r2d2"].capabilities.head == "none"
    with pytest.raises(ValueError, match="head is fixed"):
        ALGORITHMS["r2d2"].options({"head": "svm"})
    for bad, message in [({"svm_c": 0.0}, "svm_c = 0.0 is invalid"), ({"head": "lasso"}, "head = 'lasso'"),
                         ({"ridge_lambda": -1.0}, "ridge_lambda = -1.0 is invalid"),
                         ({"qp_max_iter": 0}, "qp_max_iter = 0 is invalid")]:
        with pytest.raises(ValueError, match=message):
            MetaOptNetOptions(**bad)
    algo = MetaOptNet(nn.Linear(4, 3), "classification", learn_scale=False)
    assert "scale" not in algo.trainable() and "log_lambda" not in algo.trainable()
    with pytest.raises(ValueError, match="learns classification"):
        MetaOptNet(nn.Linear(4, 3), "regression")


def test_task_threads_give_the_same_meta_gradient():
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    batch = episodes(7, tasks=4)
    one = MetaOptNet(model, "classification", task_threads=1).meta_gradient(batch)
    two = MetaOptNet(model, "classification", task_threads=2).meta_gradient(batch)
    for k in one[0]:
        torch.testing.assert_close(one[0][k], two[0][k])
    assert abs(one[1]["loss"] - two[1]["loss"]) < 1e-12


def test_every_registered_algorithm_and_its_options_are_exported_at_the_top_level():
    import innerloop
    from innerloop.algorithms.registry import CLASSES

    for cls in CLASSES:
        assert getattr(innerloop, cls.__name__, None) is cls and cls.__name__ in innerloop.__all__, cls.__name__
        if cls.Options.__name__ != "NoOptions":
            assert getattr(innerloop, cls.Options.__name__, None) is cls.Options, cls.Options.__name__
