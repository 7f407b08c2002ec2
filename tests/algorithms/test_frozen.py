"""Frozen parameters (``requires_grad=False``) are neither adapted nor meta-learned, in every algorithm.

The proof for the MAML family: freezing a set of parameters gives exactly the meta-gradient (float64)
of the unfrozen model whose ``adapt`` patterns leave those parameters out, restricted to the
trainable ones; and the frozen ones get no gradient entry at all.
"""

from __future__ import annotations

import copy

import pytest
import torch

from innerloop.algorithms import ALGORITHMS, IMAML, MAML, MAMLPlusPlus, Reptile
from innerloop.data import Sinusoid
from innerloop.models import MLP

pytestmark = pytest.mark.usefixtures("float64")


def _model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(1, 1, [16, 16])


def _frozen(model: MLP) -> MLP:
    m = copy.deepcopy(model)
    for n, p in m.named_parameters():
        if n.startswith("features.0."):  # the first layer: a frozen "backbone" part
            p.requires_grad_(False)
    return m


def _batch():
    return Sinusoid(shots=5, queries=5).batch("train", range(3)).to(dtype=torch.float64)


TRAINABLE = ["features.2.weight", "features.2.bias", "head.weight", "head.bias"]


def test_model_layout():
    assert [n for n, _ in _model().named_parameters()] == ["features.0.weight", "features.0.bias", *TRAINABLE]


@pytest.mark.parametrize("cls, extra", [
    (MAML, {}), (MAML, {"first_order": True}), (MAML, {"lr_mode": "per_element"}),
    (MAMLPlusPlus, {"inner_steps": 2}), (Reptile, {"inner_steps": 2})])
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_frozen_equals_adapting_the_rest(cls, extra, vectorize):
    base = _model()
    frozen = cls(_frozen(base), "regression", inner_lr=0.1, vectorize=vectorize, task_threads=1, **extra)
    reference = cls(copy.deepcopy(base), "regression", inner_lr=0.1, vectorize=vectorize, task_threads=1,
                    adapt=[f"{n}" for n in TRAINABLE], **extra)
    got, _ = frozen.meta_gradient(_batch())
    want, _ = reference.meta_gradient(_batch())
    assert not any(k.startswith("model.features.0.") for k in got), "a frozen parameter got a gradient"
    assert set(got) == {k for k in want if not k.startswith("model.features.0.")}
    for k, g in got.items():
        torch.testing.assert_close(g, want[k], rtol=1e-10, atol=1e-12, msg=k)


def test_frozen_imaml_takes_no_gradient_and_does_not_adapt():
    alg = IMAML(_frozen(_model()), "regression", inner_lr=0.1, inner_steps=3)
    grads, _ = alg.meta_gradient(_batch())
    assert not any(k.startswith("model.features.0.") for k in grads)
    assert alg.adapt_names == TRAINABLE
    # the inner solution leaves the frozen layer where it is
    params = alg.params()
    b = _batch()
    phi = alg.inner_solve(params, {}, b.support_x[0], b.support_y[0])
    assert torch.equal(phi["features.0.weight"], params["features.0.weight"])
    assert not torch.equal(phi["head.weight"], params["head.weight"])


@pytest.mark.parametrize("name", [n for n, e in ALGORITHMS.items() if "regression" in e.capabilities.objectives])
def test_every_regression_algorithm_trains_with_a_frozen_layer(name):
    from innerloop.training import TrainConfig, meta_train

    model = _frozen(_model())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    alg = ALGORITHMS[name].build(model, "regression")
    meta_train(alg, Sinusoid(shots=5, queries=5), TrainConfig(iterations=2, meta_batch_size=2, validate_every=10,
                                                               val_tasks=2, log_every=1), progress=False)
    after = dict(model.named_parameters())
    for n in ("features.0.weight", "features.0.bias"):
        assert torch.equal(after[n], before[n]), f"{name} changed the frozen {n}"
    assert not torch.equal(after["head.weight"], before["head.weight"]), f"{name} did not train the head"


def test_adapt_matching_only_frozen_parameters_is_refused():
    with pytest.raises(ValueError, match=r"matches only frozen parameters.*features\.0\.weight.*requires_grad"):
        MAML(_frozen(_model()), "regression", adapt=["features.0.*"])
