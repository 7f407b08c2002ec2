"""BatchNorm policies (innerloop.norm) with stock torch.nn modules and innerloop's Conv4.

Proofs: a network of stock ``nn.Conv2d`` / ``nn.BatchNorm2d`` (running statistics on, as users build
them) has, under ``batch``, the float64 meta-gradient and the evaluation of the equivalent innerloop
``Conv4`` (batch statistics only) on any thread count, and never writes its buffers; under
``running`` the meta-gradient is the same and the running statistics are the hand-computed mean of
BatchNorm's momentum updates, whatever the thread count; evaluation then uses them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from innerloop.adapt import adapt, model_loss
from innerloop.algorithms import MAML, MAMLPlusPlus, ProtoNet, Reptile
from innerloop.models import Conv4
from innerloop.norm import NormState, running_stat_names
from innerloop.tasks import TaskBatch


class StockConv4(nn.Module):
    """Conv4's architecture from stock torch.nn layers (running statistics tracked, the default)."""

    def __init__(self, ways: int = 3, hidden: int = 4, size: int = 16) -> None:
        super().__init__()
        blocks = []
        for i in range(4):
            blocks.append(nn.Sequential(nn.Conv2d(1 if i == 0 else hidden, hidden, 3, padding=1),
                                        nn.BatchNorm2d(hidden), nn.MaxPool2d(2), nn.ReLU()))
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(hidden * (size // 16) ** 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _pair(dtype=torch.float64):
    torch.manual_seed(0)
    ours = Conv4(1, 3, hidden=4, image_size=16).to(dtype)
    stock = StockConv4().to(dtype)
    missing = stock.load_state_dict(ours.state_dict(), strict=False)
    assert not missing.unexpected_keys and all("running" in k or "num_batches" in k for k in missing.missing_keys)
    return ours, stock


def _batch(tasks=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, 6, 1, 16, 16, generator=g, dtype=dtype) + 2.0  # uncentred, as images are
    qx = torch.randn(tasks, 9, 1, 16, 16, generator=g, dtype=dtype) + 2.0
    sy = torch.arange(3).repeat(2).expand(tasks, -1).contiguous()
    qy = torch.arange(3).repeat(3).expand(tasks, -1).contiguous()
    return TaskBatch(sx, sy, qx, qy)


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
def test_stock_batchnorm_meta_gradient_equals_conv4(threads, first_order):
    ours, stock = _pair()
    before = _buffers(stock)
    kw = dict(inner_lr=0.1, inner_steps=2, first_order=first_order, task_threads=threads,
              memory_format="contiguous")
    want, want_m = MAML(ours, "classification", **kw).meta_gradient(_batch())
    got, got_m = MAML(stock, "classification", **kw).meta_gradient(_batch())
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11, msg=k)
    assert got_m == pytest.approx(want_m, rel=1e-9)
    for k, v in _buffers(stock).items():
        assert torch.equal(v, before[k]), f"batch_norm='batch' wrote the buffer {k}"


def test_stock_batchnorm_evaluation_equals_conv4_in_eval_mode():
    ours, stock = _pair()
    a, b = MAML(ours, "classification", inner_lr=0.1), MAML(stock, "classification", inner_lr=0.1)
    a.eval(), b.eval()
    want, got = a.evaluate(_batch(), steps=2), b.evaluate(_batch(), steps=2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-11)


def test_running_meta_gradient_is_batch_statistics_and_statistics_are_the_mean_momentum_update():
    _, stock = _pair()
    ref = copy.deepcopy(stock)
    batch = _batch()
    kw = dict(inner_lr=0.1, inner_steps=1, memory_format="contiguous")
    running = MAML(stock, "classification", batch_norm="running", task_threads=1, **kw)
    plain = MAML(copy.deepcopy(ref), "classification", **kw)
    got, _ = running.meta_gradient(batch)
    want, _ = plain.meta_gradient(batch)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=0, msg=k)
    # by hand: each task's adapted network forwards its query set in train mode from the old statistics
    names = running_stat_names(ref)
    params = dict(ref.named_parameters())
    nobn = {**dict(ref.named_buffers()), **{n: None for n in names}}
    copies = []
    for i in range(len(batch)):
        phi = adapt(model_loss(ref, torch.nn.functional.cross_entropy), params, nobn, batch.support_x[i],
                    batch.support_y[i], steps=1, lr=0.1)
        mine = copy.deepcopy(ref).train()
        with torch.no_grad():
            functional_call(mine, {k: v.detach() for k, v in phi.items()}, (batch.query_x[i],))
        copies.append(dict(mine.named_buffers()))
    new = dict(stock.named_buffers())
    for n in names:
        if n.endswith("num_batches_tracked"):
            assert int(new[n]) == 1
        else:
            torch.testing.assert_close(new[n], torch.stack([c[n] for c in copies]).mean(0), rtol=1e-12, atol=1e-14)


def test_running_statistics_are_reproducible_and_agree_across_thread_counts():
    """The same thread count gives the same bits (records are averaged in float64, so the order in
    which threads finish does not matter); thread counts agree to float32 rounding (as the
    meta-gradient does: one and two intra-op threads round convolutions differently)."""
    results = []
    for threads in (2, 2, 1):
        _, stock = _pair(torch.float32)
        alg = MAML(stock, "classification", batch_norm="running", task_threads=threads, inner_lr=0.1)
        alg.meta_gradient(_batch(tasks=6, dtype=torch.float32))
        results.append(_buffers(stock))
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k
        torch.testing.assert_close(results[2][k], results[0][k], rtol=1e-5, atol=1e-6, msg=k)


def test_running_evaluation_uses_the_running_statistics():
    _, stock = _pair()
    alg = MAML(stock, "classification", batch_norm="running", inner_lr=0.1)
    alg.meta_gradient(_batch())
    alg.eval()
    batch = _batch(seed=3)
    got = alg.evaluate(batch, steps=0)["loss"][:, 0]
    stock.eval()
    with torch.no_grad():
        want = torch.stack([torch.nn.functional.cross_entropy(stock(batch.query_x[i]), batch.query_y[i])
                            for i in range(len(batch))])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # ... and batch_norm="batch" of the same weights does not
    batch_alg = MAML(stock, "classification", inner_lr=0.1)
    batch_alg.eval()
    assert not torch.allclose(batch_alg.evaluate(batch, steps=0)["loss"][:, 0], want)


@pytest.mark.parametrize("cls", [Reptile, ProtoNet])
def test_other_algorithms_follow_the_policy(cls):
    _, stock = _pair()
    if cls is ProtoNet:
        stock.head = nn.Identity()
    before = _buffers(stock)
    alg = cls(stock, "classification", task_threads=1)
    alg.meta_gradient(_batch())
    for k, v in _buffers(stock).items():
        assert torch.equal(v, before[k]), k
    alg_running = cls(stock, "classification", batch_norm="running", task_threads=1)
    alg_running.meta_gradient(_batch())
    assert int(stock.features[0][1].num_batches_tracked) == 1
    assert not torch.equal(stock.features[0][1].running_mean, before["features.0.1.running_mean"])


def test_mamlpp_per_step_statistics():
    _, stock = _pair()
    alg = MAMLPlusPlus(stock, "classification", batch_norm="per_step", inner_steps=3, task_threads=1)
    assert len(alg.step_stats) == 3
    before = [_buffers(h) for h in alg.step_stats]
    model_before = _buffers(stock)
    alg.meta_gradient(_batch())
    after = [_buffers(h) for h in alg.step_stats]
    for j in range(3):
        assert any(not torch.equal(after[j][k], before[j][k]) for k in after[j]), f"set {j} did not move"
    assert not torch.equal(after[0]["features__0__1__running_mean"], after[2]["features__0__1__running_mean"])
    for k, v in _buffers(stock).items():  # the model's own statistics are not the per-step ones
        assert torch.equal(v, model_before[k])
    assert any(k.startswith("step_stats.") for k in alg.state_dict())  # checkpointed
    alg.eval()
    scores = alg.evaluate(_batch(seed=5), steps=3)
    assert torch.isfinite(scores["loss"]).all()


def test_policy_errors_name_the_way_out():
    with pytest.raises(ValueError, match=r"no BatchNorm layer that tracks.*track_running_stats=True"):
        MAML(Conv4(1, 3, hidden=4, image_size=16), "classification", batch_norm="running")
    with pytest.raises(ValueError, match=r"per_step.*mamlpp"):
        MAML(StockConv4(), "classification", batch_norm="per_step")
    with pytest.raises(ValueError, match=r"batch_norm = 'sometimes' is not allowed: choose one of"):
        MAML(StockConv4(), "classification", batch_norm="sometimes")
    alg = MAML(StockConv4().double(), "classification", batch_norm="running", vectorize="vmap", first_order=True)
    with pytest.raises(ValueError, match=r"vmap.*cannot accumulate BatchNorm running statistics"):
        alg.meta_gradient(_batch())


def test_conv4_with_running_statistics_follows_running():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16, track_running_stats=True).double()
    alg = MAML(model, "classification", batch_norm="running", inner_lr=0.1)
    alg.meta_gradient(_batch())
    assert int(model.features[0][1].num_batches_tracked) == 1


def test_norm_state_copies_start_empty():
    state = NormState(StockConv4(), "running")
    twin = copy.deepcopy(state)
    assert not twin.pending() and twin.names == state.names


def test_the_baseline_follows_the_policy():
    from innerloop.algorithms import Baseline

    _, stock = _pair()
    before = _buffers(stock)
    labels = TaskBatch(_batch().support_x, _batch().support_y, _batch().query_x, _batch().query_y)
    Baseline(stock, "classification").meta_gradient(labels)
    for k, v in _buffers(stock).items():
        assert torch.equal(v, before[k]), k
    Baseline(stock, "classification", batch_norm="running").meta_gradient(labels)
    assert int(stock.features[0][1].num_batches_tracked) == 1


def test_non_finite_records_do_not_reach_the_statistics():
    """An overflowing fp16 step (skipped by the loop) must not write NaN running statistics."""
    from innerloop.adapt import loss_scale

    _, stock = _pair(torch.float32)
    before = _buffers(stock)
    alg = MAML(stock, "classification", batch_norm="running", inner_lr=0.4, task_threads=1)
    with loss_scale(2.0**140):  # inf in float32: the inner gradients overflow
        grads, _ = alg.meta_gradient(_batch(dtype=torch.float32))
    assert not all(bool(torch.isfinite(g).all()) for g in grads.values())
    for k, v in _buffers(stock).items():
        assert torch.isfinite(v.float()).all(), k
        assert torch.equal(v, before[k]), k


def test_evaluation_in_training_mode_records_nothing():
    _, stock = _pair()
    for alg in (MAMLPlusPlus(stock, "classification", batch_norm="per_step", inner_steps=2),
                MAMLPlusPlus(stock, "classification", batch_norm="running", inner_steps=2),
                ProtoNet(copy.deepcopy(stock), "classification", batch_norm="running")):
        alg.train()
        alg.evaluate(_batch(seed=7), steps=2)
        assert not alg.norm.pending(), type(alg).__name__


def test_instance_norm_with_running_statistics_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True), nn.Flatten())
    with pytest.raises(ValueError,
                       match=r"instance normalisation with track_running_stats=True.*track_running_stats=False"):
        MAML(model, "classification")
