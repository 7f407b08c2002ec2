"""Head-only adaptation through captured features (innerloop.split) is the same computation as full
forwards at every step: float64 meta-gradients and evaluations agree, the body runs once per split,
and models where the split would not be the same function fall back to full forwards."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from innerloop.algorithms import ANIL, BOIL, MAML, Reptile
from innerloop.data import Sinusoid
from innerloop.models import MLP, Conv4
from innerloop.split import head_split
from innerloop.tasks import TaskBatch

pytestmark = pytest.mark.usefixtures("float64")


def _images(tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, 6, 1, 16, 16, generator=g)
    qx = torch.randn(tasks, 9, 1, 16, 16, generator=g)
    sy = torch.arange(3).repeat(2).expand(tasks, -1).contiguous()
    qy = torch.arange(3).repeat(3).expand(tasks, -1).contiguous()
    return TaskBatch(sx, sy, qx, qy)


def _conv():
    torch.manual_seed(0)
    return Conv4(1, 3, hidden=4, image_size=16)


def _compare(make, batch, **kw):
    fast = make(reuse_features=True, **kw)
    slow = make(reuse_features=False, **kw)
    got, got_m = fast.meta_gradient(batch)
    want, want_m = slow.meta_gradient(batch)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)
    assert got_m == pytest.approx(want_m, rel=1e-10)
    fast.eval(), slow.eval()
    a, b = fast.evaluate(batch, steps=3), slow.evaluate(batch, steps=3)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    return fast


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("extra", [{}, {"first_order": True}, {"lr_mode": "per_element"}, {"inner_steps": 3}])
def test_anil_on_conv4_equals_full_forwards(threads, extra):
    model = _conv()
    fast = _compare(lambda **kw: ANIL(copy.deepcopy(model), "classification", inner_lr=0.3, task_threads=threads,
                                      **kw), _images(), **extra)
    assert fast.split is not None and fast.split.prefix == "head" and fast.split._ok is True


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_linear_probe_on_a_frozen_body_equals_full_forwards(vectorize):
    torch.manual_seed(0)
    model = MLP(1, 1, [16, 16])
    for p in model.features.parameters():
        p.requires_grad_(False)
    batch = Sinusoid(shots=5, queries=5).batch("train", range(3)).to(dtype=torch.float64)
    fast = _compare(lambda **kw: MAML(copy.deepcopy(model), "regression", inner_lr=0.1, inner_steps=2,
                                      vectorize=vectorize, **kw), batch)
    assert fast.adapt_names == ["head.weight", "head.bias"]


def test_reptile_head_only_equals_full_forwards():
    model = _conv()
    _compare(lambda **kw: Reptile(copy.deepcopy(model), "classification", adapt=["head.*"], inner_steps=2, **kw),
             _images())


def test_the_body_runs_once_per_split():
    model = _conv()
    calls = []
    model.features.register_forward_hook(lambda *a: calls.append(1))
    for reuse, expected in ((True, 2), (False, 5 + 1)):  # full: one forward per step, one for the query
        alg = ANIL(model, "classification", inner_steps=5, task_threads=1, reuse_features=reuse)
        alg.meta_gradient(_images(tasks=1))  # the first call also traces the model on the meta device
        calls.clear()
        alg.meta_gradient(_images(tasks=1))
        assert len(calls) == expected, (reuse, len(calls))


class Scaled(nn.Module):
    """The output is transformed after the head: head(features) is not the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(1, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return 2.0 * self.head(self.features(x))


class Twice(Scaled):
    """The head is called twice."""

    def forward(self, x):
        z = self.features(x)
        return self.head(z) + self.head(z * 0.5)


class InPlaceAfter(Scaled):
    """The head's output is written in place after the head: the same object, another value."""

    def forward(self, x):
        return self.head(self.features(x)).mul_(3.0)


class InPlaceReLU(nn.Module):
    """``nn.ReLU(inplace=True)`` after the head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 4), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.body(x)[:, :1]


class UsesHeadParameter(Scaled):
    """The body's output depends on an adapted parameter of the head."""

    def forward(self, x):
        return self.head(self.features(x) + self.head.bias)


class PreHooked(Scaled):
    """A forward pre-hook on the head changes its input (a later call of the head runs it again)."""

    def __init__(self) -> None:
        super().__init__()
        self.head.register_forward_pre_hook(lambda module, args: (args[0] * 2,))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("cls, adapt, split_kept", [
    (Scaled, "head.*", False), (Twice, "head.*", False), (InPlaceAfter, "head.*", False),
    (UsesHeadParameter, "head.*", False), (InPlaceReLU, "body.2.*", False),
    (PreHooked, "head.*", True),  # a pre-hook on the head runs again when the head is called alone
])
def test_the_split_is_kept_only_where_it_is_head_of_features(cls, adapt, split_kept):
    """Models that are not ``head(features)`` fall back to full forwards; either way the function is
    the full model's."""
    torch.manual_seed(0)
    model = cls()
    batch = Sinusoid(shots=5, queries=5).batch("train", range(2)).to(dtype=torch.float64)
    fast = _compare(lambda **kw: MAML(copy.deepcopy(model), "regression", adapt=[adapt], inner_lr=0.1, **kw),
                    batch)
    assert fast.split is not None and fast.split._ok is split_kept


def test_boil_adapts_the_body_and_falls_back():
    model = _conv()
    fast = _compare(lambda **kw: BOIL(copy.deepcopy(model), "classification", inner_lr=0.1, **kw), _images())
    assert fast.split is not None and fast.split.prefix == "features" and fast.split._ok is False


def test_head_split_is_derived_from_the_adapted_names():
    model = _conv()
    assert head_split(model, ["head.weight", "head.bias"]).prefix == "head"
    assert head_split(model, ["features.3.0.weight"]).prefix == "features.3.0"
    assert head_split(model, ["features.0.0.weight", "head.weight"]) is None  # spans the root
    assert head_split(model, []) is None
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[0].weight = tied[1].weight
    assert head_split(tied, ["1.weight", "1.bias"]) is None  # a head weight used by the body
