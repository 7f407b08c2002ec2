"""Float64 proofs of the hypergradients: ridge regression's closed form, finite differences, truncation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from innerloop.tuning.hypergradient import Hyper, TrainingRun, implicit, mean_loss, unrolled

D = torch.float64


def ridge_data(n: int = 40, n_val: int = 30, d: int = 6, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, 1, generator=g, dtype=D)
    x, xv = torch.randn(n, d, generator=g, dtype=D), torch.randn(n_val, d, generator=g, dtype=D)
    y = x @ w_true + 1.5 * torch.randn(n, 1, generator=g, dtype=D)
    yv = xv @ w_true + 1.5 * torch.randn(n_val, 1, generator=g, dtype=D)
    return x, y, xv, yv


def linear(d: int) -> tuple[nn.Module, dict[str, Tensor]]:
    model = nn.Linear(d, 1, bias=False).to(D)
    return model, {"weight": torch.zeros(1, d, dtype=D)}


def closed_form_val(lam: Tensor, x: Tensor, y: Tensor, xv: Tensor, yv: Tensor) -> Tensor:
    """L_val(w*(lam)) with w* = (X^T X + n lam I)^{-1} X^T y (the minimiser of mean 1/2 r^2 + lam/2 |w|^2)."""
    n, d = x.shape
    w = torch.linalg.solve(x.T @ x + n * lam * torch.eye(d, dtype=D), x.T @ y)
    return 0.5 * (xv @ w - yv).pow(2).mean()


def ridge_run(steps: int = 400, lr: float = 0.3) -> tuple[TrainingRun, Tensor, Tensor, Tensor, Tensor]:
    x, y, xv, yv = ridge_data()
    model, init = linear(x.shape[1])
    return TrainingRun(model, init, x, y, steps=steps), x, y, xv, yv


@pytest.mark.parametrize("method, terms", [("cg", 6), ("neumann", 300)])
def test_implicit_equals_closed_form_derivative_and_finite_differences(method: str, terms: int) -> None:
    run, x, y, xv, yv = ridge_run(steps=1500, lr=0.5)
    lam0 = 0.2
    hyper = Hyper.create(run.init, lr=0.5, weight_decay=lam0, tune_weight_decay="scalar")
    # the run's end point is the ridge solution
    w_star = torch.linalg.solve(x.T @ x + len(x) * lam0 * torch.eye(x.shape[1], dtype=D), x.T @ y)
    hg = implicit(run, hyper, xv, yv, method=method, terms=terms)  # type: ignore[arg-type]
    assert torch.allclose(hg.params["weight"], w_star.T, atol=1e-10)
    raw = torch.tensor(lam0, dtype=D).log().requires_grad_()
    closed = torch.autograd.grad(closed_form_val(raw.exp(), x, y, xv, yv), raw)[0]
    eps = 1e-5
    fd = (closed_form_val(torch.tensor(lam0 * (1 + eps), dtype=D), x, y, xv, yv)
          - closed_form_val(torch.tensor(lam0 * (1 - eps), dtype=D), x, y, xv, yv)) / (2 * eps)  # d/dlog(lam)
    at = float(closed_form_val(torch.tensor(lam0, dtype=D), x, y, xv, yv))
    assert hg.val_loss == pytest.approx(at, rel=1e-10)
    assert torch.allclose(hg.grads["weight_decay"], closed, rtol=1e-7, atol=1e-12)
    assert torch.allclose(closed, fd, rtol=1e-6)
    assert hg.hvps == terms + 1


def test_gradient_descent_on_lambda_finds_the_closed_form_optimum() -> None:
    run, x, y, xv, yv = ridge_run(steps=100)
    grid = torch.logspace(-4, 1, 4001, dtype=D)
    losses = torch.stack([closed_form_val(lam, x, y, xv, yv) for lam in grid])
    best = float(grid[int(losses.argmin())])
    assert 1e-3 < best < 5  # an interior optimum
    hyper = Hyper.create(run.init, lr=0.5, weight_decay=0.05, tune_weight_decay="scalar")
    raw = hyper.tensors["weight_decay"].clone()
    start = None
    for _ in range(40):
        hg = implicit(run, hyper.with_tensors({"weight_decay": raw}), xv, yv, method="cg", terms=6, start=start)
        raw = raw - 20.0 * hg.grads["weight_decay"]
        start = hg.params  # warm start, as the tuner does
    found = float(raw.exp())
    assert found == pytest.approx(best, rel=5e-3)


def mlp_problem(batch_size: int | None = 8, steps: int = 12) -> tuple[TrainingRun, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(24, 3, generator=g, dtype=D), torch.randn(16, 3, generator=g, dtype=D)
    y, yv = torch.sin(x[:, :2]) + 0.1 * torch.randn(24, 2, generator=g, dtype=D), torch.sin(xv[:, :2])
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    return TrainingRun(model, init, x, y, steps=steps, batch_size=batch_size, seed=3), xv, yv


def finite_difference(run: TrainingRun, hyper: Hyper, xv: Tensor, yv: Tensor, key: str, index: tuple[int, ...],
                      eps: float = 1e-6) -> float:
    def value(delta: float) -> float:
        t = hyper.tensors[key].clone()
        t[index] += delta
        end = run.train(hyper.with_tensors({**hyper.tensors, key: t}))
        return float(mean_loss(run, end, xv, yv))

    return (value(eps) - value(-eps)) / (2 * eps)


def test_unrolled_equals_finite_differences_for_per_tensor_lr_and_weight_decay() -> None:
    run, xv, yv = mlp_problem()
    hyper = Hyper.create(run.init, lr=0.2, weight_decay=0.01, tune_lr="tensor", tune_weight_decay="tensor")
    hg = unrolled(run, hyper, xv, yv)
    assert hg.hvps == run.steps and hg.inner_steps == run.steps
    for key in hyper.tensors:
        fd = finite_difference(run, hyper, xv, yv, key, ())
        assert hg.grads[key].item() == pytest.approx(fd, rel=1e-6, abs=1e-10), key


def test_unrolled_per_element_lr_equals_finite_differences() -> None:
    run, xv, yv = mlp_problem(steps=5)
    hyper = Hyper.create(run.init, lr=0.2, tune_lr="element")
    hg = unrolled(run, hyper, xv, yv)
    for index in [(0, 0), (3, 2), (1, 4)]:
        fd = finite_difference(run, hyper, xv, yv, "lr/2.weight" if index == (1, 4) else "lr/0.weight", index)
        key = "lr/2.weight" if index == (1, 4) else "lr/0.weight"
        assert hg.grads[key][index].item() == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_truncated_unroll_equals_the_hand_written_truncation() -> None:
    run, xv, yv = mlp_problem(steps=10)
    hyper = Hyper.create(run.init, lr=0.2, weight_decay=0.01, tune_lr="scalar", tune_weight_decay="tensor")
    k = 3
    hg = unrolled(run, hyper, xv, yv, truncate=k)
    assert hg.hvps == k
    # by hand: T - K steps with detached hyperparameters, then K differentiable steps
    raw = {key: t.clone().requires_grad_() for key, t in hyper.tensors.items()}
    p = dict(run.init)
    loss = nn.functional.mse_loss
    for t in range(run.steps):
        live = t >= run.steps - k
        lr = raw["lr"].exp() if live else raw["lr"].exp().detach()
        idx = run.batch(t)
        assert idx is not None
        with torch.enable_grad():
            leaf = {n: v if v.requires_grad else v.detach().requires_grad_() for n, v in p.items()}
            pred = torch.func.functional_call(run.model, leaf, (run.train_x[idx],))
            value = 0.5 * loss(pred, run.train_y[idx], reduction="sum") / len(idx)
            grads = torch.autograd.grad(value, list(leaf.values()), create_graph=live)
        new = {}
        for (n, v), gr in zip(leaf.items(), grads, strict=True):
            wd = raw[f"weight_decay/{n}"].exp()
            wd = wd if live else wd.detach()
            new[n] = v - lr * (gr + wd * v)
        p = new if live else {n: v.detach() for n, v in new.items()}
        val = mean_loss(run, p, xv, yv)
    by_hand = torch.autograd.grad(val, list(raw.values()))
    for (key, _), want in zip(raw.items(), by_hand, strict=True):
        assert torch.allclose(hg.grads[key], want, rtol=1e-10, atol=1e-14), key
    full = unrolled(run, hyper, xv, yv)
    assert not torch.allclose(full.grads["lr"], hg.grads["lr"])  # truncation does change it


def test_data_weight_hypergradients_equal_finite_differences() -> None:
    run, xv, yv = mlp_problem(batch_size=None, steps=8)
    hyper = Hyper.create(run.init, lr=0.3, weight_decay=0.01, data_weights=run.n_train, init_data_weight=0.7)
    hg = unrolled(run, hyper, xv, yv)
    for i in (0, 5, 17):
        fd = finite_difference(run, hyper, xv, yv, "data_weights", (i,))
        assert hg.grads["data_weights"][i].item() == pytest.approx(fd, rel=1e-6, abs=1e-11)


def test_implicit_data_weights_equal_finite_differences_at_the_minimiser() -> None:
    x, y, xv, yv = ridge_data(n=20)
    model, init = linear(x.shape[1])
    run = TrainingRun(model, init, x, y, steps=4000)
    hyper = Hyper.create(init, lr=0.3, weight_decay=0.1, data_weights=len(x))
    hg = implicit(run, hyper, xv, yv, method="cg", terms=6)

    def closed(logits: Tensor) -> Tensor:  # weighted ridge: (X^T W X / n + lam I) w = X^T W y / n
        wts = logits.sigmoid()
        a = x.T @ (wts[:, None] * x) / len(x) + 0.1 * torch.eye(x.shape[1], dtype=D)
        w = torch.linalg.solve(a, x.T @ (wts[:, None] * y) / len(x))
        return 0.5 * (xv @ w - yv).pow(2).mean()

    logits = hyper.tensors["data_weights"].clone().requires_grad_()
    want = torch.autograd.grad(closed(logits), logits)[0]
    assert torch.allclose(hg.grads["data_weights"], want, rtol=1e-7, atol=1e-12)


def test_corrupted_labels_get_lower_weights() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 60, 4
    w_true = torch.randn(d, 3, generator=g, dtype=D)
    x, xv = torch.randn(n, d, generator=g, dtype=D), torch.randn(40, d, generator=g, dtype=D)
    y, yv = (x @ w_true).argmax(1), (xv @ w_true).argmax(1)
    bad = torch.arange(0, n, 4)  # every 4th label is wrong
    y = y.clone()
    y[bad] = (y[bad] + 1) % 3
    model = nn.Linear(d, 3).to(D)
    init = {n_: torch.zeros_like(p, dtype=D) for n_, p in model.named_parameters()}
    run = TrainingRun(model, init, x, y, steps=300, loss="cross_entropy")
    hyper = Hyper.create(init, lr=1.0, weight_decay=1e-3, data_weights=n)
    raw = hyper.tensors["data_weights"].clone()
    start = None
    for _ in range(30):
        hg = implicit(run.__class__(model, init, x, y, steps=100, loss="cross_entropy"),
                      hyper.with_tensors({"data_weights": raw}), xv, yv, method="cg", terms=20, start=start)
        raw = raw - 50.0 * hg.grads["data_weights"]
        start = hg.params
    weights = raw.sigmoid()
    clean = torch.ones(n, dtype=torch.bool)
    clean[bad] = False
    assert weights[bad].mean() < 0.5 < weights[clean].mean()  # started at 0.5 each


def test_bad_input_is_refused() -> None:
    run, xv, yv = mlp_problem()
    with pytest.raises(ValueError, match="cannot tune learning rates"):
        implicit(run, Hyper.create(run.init, lr=0.1, tune_lr="scalar"), xv, yv)
    with pytest.raises(ValueError, match=r"truncate must be in 1\.\.12"):
        unrolled(run, Hyper.create(run.init, lr=0.1, tune_lr="scalar"), xv, yv, truncate=13)
    with pytest.raises(ValueError, match="granularity 'layer'"):
        Hyper.create(run.init, lr=0.1, tune_lr="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no hyperparameter is tuned"):
        unrolled(run, Hyper.create(run.init, lr=0.1), xv, yv)
    with pytest.raises(ValueError, match="loss 'l1' is unknown"):
        TrainingRun(run.model, run.init, run.train_x, run.train_y, steps=2, loss="l1")
