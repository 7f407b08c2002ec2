"""The fast default path of MAML on conv nets is exact (float64, second order, with BatchNorm).

It differs from the plain per-task loop in three ways, each proven here against a hand-written
unroll in plain autograd on the usual conv-4 (ReLU before max-pool, NCHW):

1. Conv4 applies max-pool before ReLU (the same function, 4x less ReLU work).
2. The per-task loop runs in the channels-last layout (``memory_format="auto"``).
3. A float inner rate updates with one fused ``torch.add``.
4. On CPU the tasks run in ``task_threads`` Python threads (``torch.autograd.grad`` in the inner
   loop, one model copy per thread).

and ``checkpoint=True`` (recomputed inner steps, for memory) gives the same meta-gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from innerloop.algorithms import MAML
from innerloop.execution import plan
from innerloop.models.conv4 import Conv4
from innerloop.tasks import TaskBatch

pytestmark = pytest.mark.usefixtures("float64")


def _images(tasks=3, ways=3, shots=2, queries=2, size=16) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return TaskBatch(
        torch.rand(tasks, ways * shots, 1, size, size, generator=g),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone(),
        torch.rand(tasks, ways * queries, 1, size, size, generator=g),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone(),
    )


def _relu_then_pool(model: Conv4) -> Conv4:
    """The same network (same parameters) in the usual block order conv, BN, ReLU, max-pool."""
    for block in list(model.features)[:4]:
        block[2], block[3] = block[3], block[2]
        assert isinstance(block[2], nn.ReLU) and isinstance(block[3], nn.MaxPool2d)
    return model


def _hand_unroll(model: nn.Module, batch: TaskBatch, lr: float, steps: int) -> dict[str, torch.Tensor]:
    """Second-order MAML in plain autograd (``create_graph=True``), NCHW, one task at a time."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(batch)):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads, strict=True)}
        query = F.cross_entropy(functional_call(model, fast, (batch.query_x[i],)), batch.query_y[i]) / len(batch)
        for n, g in zip(params, torch.autograd.grad(query, list(params.values())), strict=True):
            total[n] += g
    return total


def test_pool_before_relu_is_the_same_function():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16)
    x = torch.randn(5, 1, 16, 16)
    fast = model(x)
    assert torch.equal(fast, _relu_then_pool(model)(x))


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("memory_format", ["auto", "contiguous"])
@pytest.mark.parametrize("task_threads", [None, 1, 2])
def test_default_conv_path_equals_hand_unroll(steps, memory_format, task_threads):
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16)
    maml = MAML(model, "classification", inner_lr=0.4, inner_steps=steps, memory_format=memory_format,
                task_threads=task_threads)
    batch = _images()
    assert plan(maml.execution, maml.model, batch, second_order=True).channels_last == (memory_format == "auto")
    before = torch.get_num_threads()
    grads, _ = maml.meta_gradient(batch)
    assert torch.get_num_threads() == before
    expected = _hand_unroll(_relu_then_pool(model), batch, 0.4, steps)
    for n, g in expected.items():
        torch.testing.assert_close(grads[f"model.{n}"], g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lr_mode", ["fixed", "per_element"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize(("checkpoint", "task_threads"), [(True, 1), (True, 2), (False, 2)])
def test_checkpoint_and_threads_give_the_plain_loops_meta_gradient(lr_mode, first_order, checkpoint, task_threads):
    """Against the single-threaded torch.func loop without checkpoint, learned rates included."""
    batch = _images(tasks=5)
    grads, metrics = {}, {}
    for variant in ("plain", "tested"):
        torch.manual_seed(0)
        model = Conv4(1, 3, hidden=4, image_size=16)
        options = {"checkpoint": checkpoint, "task_threads": task_threads} if variant == "tested" else {
            "task_threads": 1}
        maml = MAML(model, "classification", inner_lr=0.3, inner_steps=3, first_order=first_order,
                    lr_mode=lr_mode, weight_decay=0.01, **options)
        grads[variant], metrics[variant] = maml.meta_gradient(batch)
    assert set(grads["tested"]) == set(grads["plain"])
    assert any(k.startswith("inner_lr") for k in grads["plain"]) == (lr_mode != "fixed")
    for k, g in grads["plain"].items():
        torch.testing.assert_close(grads["tested"][k], g, rtol=1e-9, atol=1e-12)
    assert metrics["tested"] == pytest.approx(metrics["plain"], rel=1e-12)


def test_threads_take_the_callers_autocast_and_grad_mode():
    """Autocast is thread-local in torch: the threaded loop must run under the caller's."""
    batch = _images(tasks=4)
    batch = type(batch)(*(t.float() if t.is_floating_point() else t for t in
                          (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    out = {}
    before = torch.get_num_threads()
    for threads, autocast in ((1, True), (2, True), (2, False)):
        torch.manual_seed(0)
        maml = MAML(Conv4(1, 3, hidden=4, image_size=16).float(), "classification", inner_lr=0.4,
                    task_threads=threads)
        # Each task thread runs one intra-op thread; so does the reference (bfloat16 kernels
        # round differently when their reductions are split over threads).
        torch.set_num_threads(1)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                grads, _ = maml.meta_gradient(batch)
        finally:
            torch.set_num_threads(before)
        out[threads, autocast] = torch.cat([g.flatten() for g in grads.values()])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert rel(out[2, True], out[1, True]) < 1e-5  # the same bfloat16 computation
    assert rel(out[2, False], out[1, True]) > 1e-3  # float32 is measurably different


def test_task_threads_must_be_positive():
    with pytest.raises(ValueError, match="task_threads must be None or an integer >= 1"):
        MAML(Conv4(1, 3, hidden=4, image_size=16), "classification", task_threads=0)


def test_evaluation_is_the_same_in_either_layout():
    batch = _images()
    scores = {}
    for memory_format in ("channels_last", "contiguous"):
        torch.manual_seed(0)
        maml = MAML(Conv4(1, 3, hidden=4, image_size=16), "classification", inner_lr=0.4,
                    memory_format=memory_format)
        scores[memory_format] = maml.evaluate(batch, steps=2)
    for k, v in scores["contiguous"].items():
        torch.testing.assert_close(scores["channels_last"][k], v, rtol=1e-9, atol=1e-12)


def test_unknown_memory_format_is_refused():
    with pytest.raises(ValueError, match="unknown memory_format 'nhwc'"):
        MAML(Conv4(1, 3, hidden=4, image_size=16), "classification", memory_format="nhwc")  # type: ignore[arg-type]
