"""The LoRA example (``examples/lora_meta_learning.py``): meta-learning low-rank adapters of a frozen
transformer. The frozen base never changes and gets no gradient; the meta-gradient of the adapters and
the head is exactly (float64) that of the same model with nothing frozen and only they adapting."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from innerloop import MAML, TrainConfig, meta_test, meta_train

_PATH = Path(__file__).resolve().parents[1] / "examples" / "lora_meta_learning.py"
_spec = importlib.util.spec_from_file_location("lora_meta_learning", _PATH)
assert _spec is not None and _spec.loader is not None
lora = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("lora_meta_learning", lora)
_spec.loader.exec_module(lora)

VOCAB, LENGTH, WAYS = 24, 6, 3


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's ops are too small to split, and on a busy machine the
    idle wait of a second OpenMP thread makes them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(frozen: bool = True, seed: int = 0, random: bool = True) -> torch.nn.Module:
    """A 2-block transformer, d_model 16, 2 heads, rank-2 adapters on q, k and v. ``random``: random
    (not zero) ``B`` factors and head, so that every term is exercised from the first step."""
    model = lora.lora_transformer(VOCAB, LENGTH, WAYS, d_model=16, layers=2, heads=2, rank=2, frozen=frozen,
                                  seed=seed)
    if random:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_b") or name.startswith("head."):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def family(seed: int = 0):
    return lora.PatternTokens(WAYS, 2, 2, vocab=VOCAB, length=LENGTH, informative=12, pattern=2, signal=0.5,
                              seed=seed)


def is_trainable(name: str) -> bool:
    return ".lora_" in name or name.startswith("head.")


def test_layout_and_counts():
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [n for n in names if is_trainable(n)]
    assert "blocks.0.attn.q.lora_a" in trainable and "blocks.1.attn.v.lora_b" in trainable
    assert "blocks.0.attn.q.base.weight" in names and "blocks.0.attn.o.weight" in names
    maml = MAML(model, "classification", inner_lr=0.1, adapt=list(lora.LORA_ADAPT))
    assert maml.adapt_names == trainable
    assert list(maml.trainable()) == [f"model.{n}" for n in trainable]
    # the example's default: a few million parameters, under 2% of them trainable
    default = lora.lora_transformer(256, 16, 5)
    assert 3_000_000 < lora.count(default) < 5_000_000
    assert lora.count(default, trainable_only=True) < 0.02 * lora.count(default)


def test_lora_starts_as_the_base_layer():
    base = torch.nn.Linear(5, 3)
    layer = lora.LoRALinear(copy.deepcopy(base), rank=2)
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert not layer.base.weight.requires_grad and layer.lora_a.requires_grad
    assert tuple(layer.lora_a.shape) == (2, 5) and tuple(layer.lora_b.shape) == (3, 2)


def test_family_is_deterministic():
    fam = family()
    a, b = fam.task("train", 3), fam.task("train", 3)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(fam.task("test", 3).support_x, a.support_x)
    batch = fam.batch("val", [0, 1])
    assert tuple(batch.support_x.shape) == (2, WAYS * 2, LENGTH) and batch.support_x.dtype == torch.int64
    assert int(batch.support_x.max()) < VOCAB


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_has_only_trainable_keys(first_order):
    maml = MAML(tiny(), "classification", inner_lr=0.1, first_order=first_order, adapt=list(lora.LORA_ADAPT),
                task_threads=1)
    grads, metrics = maml.meta_gradient(family().batch("train", range(2)))
    assert set(grads) == set(maml.trainable())
    assert all(is_trainable(k.removeprefix("model.")) for k in grads)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert set(metrics) == {"loss", "accuracy"}


def test_meta_train_changes_only_the_adapters_and_head():
    model = tiny(random=False)  # zero B and head, as the example starts
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    maml = MAML(model, "classification", inner_lr=0.3, inner_steps=1, adapt=list(lora.LORA_ADAPT))
    cfg = TrainConfig(iterations=3, meta_batch_size=2, outer_lr=1e-2, validate_every=10, val_tasks=2, log_every=1)
    meta_train(maml, family(), cfg, progress=False)
    for n, p in model.named_parameters():
        if is_trainable(n):
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"the frozen {n} changed"
            assert p.grad is None
    res = meta_test(maml, family(), "test", tasks=4, steps=2)
    assert len(res.per_step) == 3 and all(0.0 <= s.mean <= 1.0 for s in res.per_step)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("first_order, execution", [
    (False, {"task_threads": 1}), (False, {"task_threads": 2}),
    (True, {"task_threads": 1}), (True, {"task_threads": 2}),
    (True, {"vectorize": "vmap"}),  # LayerNorm: vmap only in first order (auto runs the loop)
])
def test_frozen_base_equals_adapting_only_the_adapters(first_order, execution):
    """Freezing the base gives exactly the meta-gradient of the unfrozen model whose ``adapt`` is the
    adapters and the head, restricted to those (the base's share of the reference is what freezing drops)."""
    frozen = tiny(frozen=True)
    reference = tiny(frozen=False)
    assert all(p.dtype == torch.float64 for p in frozen.parameters())
    for (n, a), (m, b) in zip(frozen.named_parameters(), reference.named_parameters(), strict=True):
        assert n == m and torch.equal(a, b)
    kwargs = {"inner_lr": 0.2, "inner_steps": 2, "first_order": first_order, "adapt": list(lora.LORA_ADAPT),
              **execution}
    batch = family().batch("train", range(3))
    got, got_metrics = MAML(frozen, "classification", **kwargs).meta_gradient(batch)
    want, want_metrics = MAML(reference, "classification", **kwargs).meta_gradient(batch)
    assert len(want) == len(list(reference.parameters())) > len(got)
    assert set(got) == {k for k in want if is_trainable(k.removeprefix("model."))}
    for k, g in got.items():
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, want[k], rtol=1e-10, atol=1e-12, msg=k)
    assert got_metrics == pytest.approx(want_metrics, rel=1e-12)
