"""The task-execution layer: every path gives the plain loop's meta-gradient (float64), and ``auto``
never picks ``vmap`` where torch 2.13 gets the second-order gradient wrong.

The trap (``shared/docs/performance.md``): ``vmap`` over tasks of a second-order gradient through
``batch_norm`` or ``layer_norm`` is wrong in torch 2.13, whether the model uses ``nn.BatchNorm`` /
``nn.LayerNorm`` modules or calls ``torch.nn.functional`` directly. ``group_norm`` is right. The
layer decides by what the model computes (its aten operators), not by its module types.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from innerloop.algorithms import MAML
from innerloop.execution import UNSAFE_UNDER_VMAP, Execution, computed_ops, map_tasks, plan, vmap_safe
from innerloop.tasks import TaskBatch


class FunctionalLayerNorm(nn.Module):
    """An MLP that normalises with ``F.layer_norm`` and its own affine parameters: no norm module.
    (The torch bug needs the affine weight: without one, vmap happens to be right.)"""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(3, 6)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(6))
        self.shift = nn.Parameter(0.1 * torch.randn(6))
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(F.layer_norm(self.features(x), (6,), self.scale, self.shift)))


class FunctionalBatchNorm(FunctionalLayerNorm):
    """An MLP that normalises with ``F.batch_norm`` (batch statistics): no norm module anywhere."""

    def forward(self, x: Tensor) -> Tensor:
        h = F.batch_norm(self.features(x), None, None, self.scale, self.shift, training=True)
        return self.head(torch.tanh(h))


def _mlp_with(norm: nn.Module | None) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(3, 6)] + ([norm] if norm is not None else []) + [nn.Tanh()]
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*layers))
    model.add_module("head", nn.Linear(6, 1))
    return model


MODELS = {
    "plain": lambda: _mlp_with(None),
    "LayerNorm": lambda: _mlp_with(nn.LayerNorm(6)),
    "BatchNorm1d": lambda: _mlp_with(nn.BatchNorm1d(6, track_running_stats=False)),
    "GroupNorm": lambda: _mlp_with(nn.GroupNorm(2, 6)),
    "F.layer_norm": FunctionalLayerNorm,
    "F.batch_norm": FunctionalBatchNorm,
}
UNSAFE = {"LayerNorm", "BatchNorm1d", "F.layer_norm", "F.batch_norm"}


def _batch(tasks: int = 4) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return TaskBatch(torch.randn(tasks, 8, 3, generator=g, dtype=torch.float64),
                     torch.randn(tasks, 8, 1, generator=g, dtype=torch.float64),
                     torch.randn(tasks, 6, 3, generator=g, dtype=torch.float64),
                     torch.randn(tasks, 6, 1, generator=g, dtype=torch.float64))


def _grads(kind: str, first_order: bool = False, **execution: object) -> dict[str, Tensor]:
    torch.manual_seed(3)
    model = MODELS[kind]().double()
    maml = MAML(model, "regression", inner_lr=0.3, inner_steps=2, first_order=first_order, **execution)
    return maml.meta_gradient(_batch())[0]


def _rel(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    num = torch.cat([(a[k] - b[k]).reshape(-1) for k in a]).norm()
    return float(num / torch.cat([b[k].reshape(-1) for k in b]).norm())


@pytest.mark.parametrize("kind", ["LayerNorm", "BatchNorm1d", "F.layer_norm", "F.batch_norm"])
def test_the_torch_bug_is_real_so_the_guard_is_needed(kind):
    """Bypassing the guard, vmap's second-order meta-gradient through these norms is wrong (float64).
    If torch fixes this, this test fails: then shrink UNSAFE_UNDER_VMAP after checking the fix."""
    from innerloop import execution

    looped = _grads(kind, vectorize="loop")
    real_plan = execution.plan
    try:
        execution.plan = lambda *a, **k: execution.Plan(True, 1, False, "func")  # type: ignore[assignment]
        vmapped = _grads(kind, vectorize="loop")
    finally:
        execution.plan = real_plan
    assert _rel(vmapped, looped) > 1e-6


@pytest.mark.parametrize("kind", list(MODELS))
def test_auto_gives_the_loops_second_order_meta_gradient(kind):
    batch = _batch()
    model = MODELS[kind]().double()
    chosen = plan(Execution(), model, batch, second_order=True)
    assert chosen.vmap == (kind == "plain")  # normalisation of any kind runs as a loop under auto
    auto, looped = _grads(kind), _grads(kind, vectorize="loop")
    assert _rel(auto, looped) < 1e-12


@pytest.mark.parametrize("kind", list(MODELS))
def test_explicit_vmap_is_refused_exactly_where_it_would_be_wrong(kind):
    if kind in UNSAFE:
        with pytest.raises(ValueError, match="wrong gradient in torch"):
            _grads(kind, vectorize="vmap")
        # first order has no second derivative through the norm: vmap is right and allowed
        assert _rel(_grads(kind, True, vectorize="vmap"), _grads(kind, True, vectorize="loop")) < 1e-12
    else:  # plain and GroupNorm: vmap is right in second order
        assert _rel(_grads(kind, vectorize="vmap"), _grads(kind, vectorize="loop")) < 1e-12


def test_detection_reads_what_the_model_computes_without_side_effects():
    x = torch.randn(5, 3)
    for kind, model in MODELS.items():
        ops = computed_ops(model(), x)
        assert ops is not None
        assert bool(ops & UNSAFE_UNDER_VMAP) == (kind in UNSAFE), (kind, sorted(ops))
        assert vmap_safe(ops, second_order=True) == (kind not in UNSAFE)
        assert vmap_safe(ops, second_order=False)
    stock = _mlp_with(nn.BatchNorm1d(6))  # running statistics: the trace must not update them
    before = stock.features[1].running_mean.clone(), int(stock.features[1].num_batches_tracked)
    computed_ops(stock, x)
    assert torch.equal(stock.features[1].running_mean, before[0])
    assert int(stock.features[1].num_batches_tracked) == before[1]


@pytest.mark.parametrize("first_order", [False, True])
def test_threads_loop_and_vmap_agree(first_order):
    ref = _grads("plain", first_order, vectorize="loop", task_threads=1)
    for options in ({"vectorize": "vmap"}, {"vectorize": "loop", "task_threads": 2},
                    {"vectorize": "loop", "task_threads": 3}):
        assert _rel(_grads("plain", first_order, **options), ref) < 1e-12, options


def test_map_tasks_keeps_task_order_in_threads():
    model = MODELS["plain"]().double()
    batch = _batch(5)
    params = dict(model.named_parameters())

    def fn(m: nn.Module, p: dict[str, Tensor], task: tuple[Tensor, ...]) -> Tensor:
        return torch.func.functional_call(m, p, (task[2],)).sum()

    expected = torch.stack([fn(model, params, (batch.support_x[i], batch.support_y[i], batch.query_x[i],
                                               batch.query_y[i])) for i in range(5)]).detach()
    for options in ({"vectorize": "vmap"}, {"vectorize": "loop", "task_threads": 1},
                    {"vectorize": "loop", "task_threads": 2}):
        got = map_tasks(fn, model, params, batch, Execution(**options))  # type: ignore[arg-type]
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
        mean = map_tasks(fn, model, params, batch, Execution(**options), reduce="mean")  # type: ignore[arg-type]
        torch.testing.assert_close(mean, expected.mean(), rtol=1e-13, atol=1e-13)


def test_bad_execution_settings_are_named():
    with pytest.raises(ValueError, match="unknown vectorize 'always'"):
        Execution(vectorize="always")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task_threads must be None or an integer >= 1, got 0"):
        Execution(task_threads=0)
    with pytest.raises(ValueError, match="checkpoint=True runs the per-task loop"):
        Execution(vectorize="vmap", checkpoint=True)


def test_worker_threads_take_the_plans_differentiation_mode(monkeypatch):
    """A new Python thread starts with an empty context: the layer hands each worker its mode, so
    threads differentiate with torch.autograd (thread-safe) and checkpointing really checkpoints."""
    adapt = importlib.import_module("innerloop.adapt")  # the module (`innerloop.adapt` is also a function)

    seen: list[str] = []
    checkpointed: list[int] = []
    real_gradient, real_step = adapt.gradient, adapt._checkpointed_step

    def gradient(*args, **kwargs):
        seen.append(adapt.differentiation_mode())
        return real_gradient(*args, **kwargs)

    def checkpointed_step(*args, **kwargs):
        checkpointed.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(adapt, "gradient", gradient)
    monkeypatch.setattr(adapt, "_checkpointed_step", checkpointed_step)
    threaded = _grads("plain", vectorize="loop", task_threads=2)
    assert seen and set(seen) == {"autograd"}
    seen.clear()
    stored = _grads("plain", vectorize="loop", task_threads=1)
    assert set(seen) == {"func"}
    recomputed = _grads("plain", vectorize="loop", task_threads=2, checkpoint=True)
    assert len(checkpointed) == 4 * 2  # every inner step of every task (4 tasks, 2 steps)
    assert _rel(threaded, stored) < 1e-12 and _rel(recomputed, stored) < 1e-12


class WithUnused(nn.Module):
    """An MLP with a parameter its loss never uses (no first or second derivative)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(3, 6)
        self.head = nn.Linear(6, 1)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.features(x)))


def test_imaml_in_threads_equals_the_loop():
    """iMAML's Hessian-vector products by autograd (threads) equal torch.func's (one thread)."""
    from innerloop.algorithms import IMAML

    def grads(**execution: object) -> dict[str, Tensor]:
        torch.manual_seed(4)
        imaml = IMAML(WithUnused().double(), "regression", inner_lr=0.1, inner_steps=3, cg_steps=3, **execution)
        return imaml.meta_gradient(_batch())[0]

    looped, threaded = grads(vectorize="loop", task_threads=1), grads(vectorize="loop", task_threads=2)
    assert _rel(threaded, looped) < 1e-12
    assert torch.equal(threaded["model.unused"], torch.zeros(2, dtype=torch.float64))


class _Attention(torch.nn.Module):
    """Multi-head self-attention over ``[n, tokens, 4]``, through ``F.scaled_dot_product_attention``
    (``fused=True``: 4-D inputs, which pick a fused CPU kernel without a double backward) or written out."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.q = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        q = self.q(x)
        q4 = q.view(q.shape[0], q.shape[1], 2, 2).transpose(1, 2)  # [n, heads, tokens, 2]
        if self.fused:
            z = torch.nn.functional.scaled_dot_product_attention(q4, q4, q4)
        else:
            z = torch.softmax(q4 @ q4.transpose(-1, -2) / 2**0.5, dim=-1) @ q4
        return self.head(z.transpose(1, 2).reshape(q.shape).mean(1))


@pytest.mark.parametrize("vectorize", ["auto", "loop", "vmap"])
def test_second_order_through_scaled_dot_product_attention(vectorize, float64):
    """Fused attention kernels have no double backward: second order selects the math kernel."""
    torch.manual_seed(0)
    fused, plain = _Attention(True), _Attention(False)
    plain.load_state_dict(fused.state_dict())
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(torch.randn(2, 5, 6, 4, generator=g), torch.randint(0, 3, (2, 5), generator=g),
                      torch.randn(2, 5, 6, 4, generator=g), torch.randint(0, 3, (2, 5), generator=g))
    got, _ = MAML(fused, "classification", vectorize=vectorize, task_threads=1).meta_gradient(batch)
    want, _ = MAML(plain, "classification", vectorize=vectorize, task_threads=1).meta_gradient(batch)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="this machine has a cuda:3")
def test_an_algorithm_on_a_missing_device_fails_when_built():
    with pytest.raises(ValueError, match=r"device = 'cuda:3', but this machine has"):
        MAML(torch.nn.Linear(1, 1), "regression", device="cuda:3")
    with pytest.raises(ValueError, match=r"device = 'gpu' is invalid: choose 'auto', 'cpu', 'cuda'"):
        Execution(device="gpu")
