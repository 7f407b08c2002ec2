"""Float64 proofs for OML and ANML (innerloop.continual): meta-gradients against finite differences,
the inner loop against a hand-written online SGD unroll, the ANML gate, the head reset, the
stream evaluation's determinism, exact resume, and that meta-training helps on a toy stream."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from innerloop.continual import (
    ANML,
    OML,
    ANMLNet,
    ContinualClasses,
    OMLNet,
    meta_train_continual,
    pretrain_continual,
    reset_rows,
    stream_eval,
    stream_split,
)
from innerloop.continual.learners import fresh_rows
from innerloop.data.images import ImageClassDataset
from innerloop.tasks import TaskBatch


def dataset(classes: int = 6, per_class: int = 20, side: int = 8, noise: float = 0.3, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> ImageClassDataset:
    """Random prototypes plus Gaussian noise, ``[classes * per_class, 1, side, side]``."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(classes, 1, 1, side, side, generator=g, dtype=dtype)
    x = protos + noise * torch.randn(classes, per_class, 1, side, side, generator=g, dtype=dtype)
    names = [f"c{i}" for i in range(classes)]
    return ImageClassDataset(x.reshape(-1, 1, side, side), [per_class] * classes, names)


def tiny_oml(classes: int = 6) -> OMLNet:
    torch.manual_seed(0)
    return OMLNet(classes, channels=(2, 3), hidden=4, image_size=8).double()


def tiny_anml(classes: int = 6, norm: bool = True) -> ANMLNet:
    """With norm, on 10 px images (``ANML_SIDE``: 10 -> 8 -> 4 -> 2, every normalised map holds
    several pixels); without, on 8 px ones (the first version's test network)."""
    torch.manual_seed(1)
    return ANMLNet(classes, channels=(2, 3), nm_channels=(2, 2), image_size=ANML_SIDE if norm else 8,
                   norm=norm).double()


ANML_SIDE = 10


def meta_loss(learner: OML | ANML, params: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
    fresh = learner._fresh()
    losses = [learner.task_loss(learner.model, params, tuple(t[i] for t in (batch.support_x, batch.support_y,
                                                                                batch.query_x, batch.query_y)),
                                fresh)[0] for i in range(len(batch))]
    return torch.stack(losses).mean()


def check_finite_differences(learner: OML | ANML, batch: TaskBatch, directions: int = 3) -> None:
    grads, _ = learner.meta_gradient(batch)
    params = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(directions):
        v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        with torch.no_grad():
            up = meta_loss(learner, {n: p + eps * v[n] for n, p in params.items()}, batch)
            down = meta_loss(learner, {n: p - eps * v[n] for n, p in params.items()}, batch)
        fd = float((up - down) / (2 * eps))
        analytic = float(sum((grads[f"model.{n}"] * v[n]).sum() for n in params))
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_oml_meta_gradient_matches_finite_differences_float64():
    ds = dataset()
    batch = ContinualClasses(ds, shots=4, remember=5, tasks=2, seed=3).batch(0).to("cpu", torch.float64)
    learner = OML(tiny_oml(), inner_lr=0.3, task_threads=1)
    learner.set_progress(7, 10)
    grads, _ = learner.meta_gradient(batch)
    assert grads["model.rln.0.weight"].abs().sum() > 0  # the RLN learns only through the inner loop's result
    check_finite_differences(learner, batch)


def test_oml_runs_the_pln_alone_on_features_captured_once_with_the_same_meta_gradient():
    ds = dataset()
    batch = ContinualClasses(ds, shots=4, remember=5, tasks=2, seed=3).batch(1).to("cpu", torch.float64)
    split = OML(tiny_oml(), inner_lr=0.3)
    full = OML(tiny_oml(), inner_lr=0.3, reuse_features=False)
    task = tuple(t[0] for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))
    params = dict(split.model.named_parameters())
    assert split._view(split.model, params, task[0], task[2]).reuses_features
    assert not full._view(full.model, params, task[0], task[2]).reuses_features
    got, want = split.meta_gradient(batch)[0], full.meta_gradient(batch)[0]
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)


def test_oml_first_order_drops_the_hessian_terms():
    ds = dataset()
    batch = ContinualClasses(ds, shots=4, remember=5, seed=3).batch(0)
    second, _ = OML(tiny_oml(), inner_lr=0.3).meta_gradient(batch)
    first, _ = OML(tiny_oml(), inner_lr=0.3, first_order=True).meta_gradient(batch)
    assert not torch.allclose(second["model.rln.0.weight"], first["model.rln.0.weight"])


@pytest.mark.parametrize("norm", [True, False])
def test_anml_meta_gradient_matches_finite_differences_float64(norm):
    ds = dataset(side=ANML_SIDE if norm else 8)
    batch = ContinualClasses(ds, shots=3, remember=4, tasks=2, seed=4).batch(2).to("cpu", torch.float64)
    learner = ANML(tiny_anml(norm=norm), inner_lr=0.3, task_threads=1)
    assert not any(n.startswith("nm.") for n in learner.adapt_names)  # the NM net is meta-learned only
    assert {n.split(".")[0] for n in learner.adapt_names} == {"features", "head"}
    assert any(isinstance(m, nn.GroupNorm) for m in learner.model.modules()) == norm
    grads, _ = learner.meta_gradient(batch)
    assert grads["model.nm.0.weight"].abs().sum() > 0
    if norm:  # the normalisation's scale and shift are adapted in the inner loop and meta-learned
        assert "features.1.weight" in learner.adapt_names and grads["model.features.1.weight"].abs().sum() > 0
    check_finite_differences(learner, batch)


def test_anml_normalisation_is_per_image_and_right_under_vmap_second_order_float64():
    """The per-image normalisation (GroupNorm, a group per channel) uses no batch statistics: an
    image's logits do not depend on the other images of its batch. ``native_group_norm`` has the
    right second-order gradient under ``vmap`` (unlike BatchNorm and LayerNorm in torch 2.13), so
    ``vectorize="vmap"`` is allowed and gives the loop's meta-gradient."""
    net = tiny_anml()
    x = dataset(side=ANML_SIDE).gather([0, 1, 2, 3], [0, 1, 2, 3]).double()
    torch.testing.assert_close(net(x)[:1], net(x[:1]), rtol=0, atol=1e-12)
    torch.testing.assert_close(net(x)[2:], net(x[2:]), rtol=0, atol=1e-12)
    gn = net.features[1]  # after the first conv: each image's channel standardised over its own pixels
    conv = net.features[0](x).detach()
    mean, var = conv.mean((2, 3), keepdim=True), conv.var((2, 3), unbiased=False, keepdim=True)
    by_hand = (conv - mean) / torch.sqrt(var + gn.eps) * gn.weight[:, None, None] + gn.bias[:, None, None]
    torch.testing.assert_close(gn(conv), by_hand, rtol=0, atol=1e-12)
    batch = ContinualClasses(dataset(side=ANML_SIDE), shots=3, remember=4, tasks=3, seed=6).batch(1)
    batch = batch.to("cpu", torch.float64)
    loop, _ = ANML(tiny_anml(), inner_lr=0.3, vectorize="loop").meta_gradient(batch)
    vmapped, _ = ANML(tiny_anml(), inner_lr=0.3, vectorize="vmap").meta_gradient(batch)
    for n in loop:
        torch.testing.assert_close(vmapped[n], loop[n], rtol=1e-9, atol=1e-12)


def test_anml_gate_is_open_and_not_saturated_at_initialisation():
    """The gate starts mid-range (a sigmoid near 0 or 1 would pass almost no gradient to the NM
    network), and the NM network's output layer gets a meta-gradient from the first step."""
    net = tiny_anml()
    x = dataset(side=ANML_SIDE).gather(list(range(6)), [0] * 6).double()
    gate = net.gate(x).detach()
    assert 0.2 < float(gate.mean()) < 0.8 and float((gate * (1 - gate)).min()) > 0.05
    batch = ContinualClasses(dataset(side=ANML_SIDE), shots=3, remember=4, seed=6).batch(0)
    grads, _ = ANML(net, inner_lr=0.3).meta_gradient(batch.to("cpu", torch.float64))
    g = grads[f"model.nm.{len(net.nm) - 1}.weight"]  # the NM network's output layer
    assert float(g.abs().max()) > 1e-6 * float(grads["model.head.weight"].abs().max())


def test_per_image_normalisation_refuses_one_pixel_maps():
    with pytest.raises(ValueError, match=r"conv layer 2 of 2 outputs 1 x 1 maps on 8 px images.*norm=False"):
        ANMLNet(6, channels=(2, 3), nm_channels=(2, 2), image_size=8)
    assert ANMLNet(6, channels=(2, 3), nm_channels=(2, 2), image_size=8, norm=False).width == 3


def test_inner_loop_is_one_example_at_a_time_sgd():
    for learner, side in ((OML(tiny_oml(), inner_lr=0.2), 8), (ANML(tiny_anml(), inner_lr=0.2), ANML_SIDE)):
        batch = ContinualClasses(dataset(side=side), shots=5, remember=3, seed=1).batch(0).to("cpu", torch.float64)
        learner.set_progress(2, 5)
        model = learner.model
        sx, sy = batch.support_x[0], batch.support_y[0]
        fresh = learner._fresh()
        params = {n: p.detach() for n, p in model.named_parameters()}
        got, _ = learner._inner(model, params, sx, sy, fresh, len(sx), False)
        # by hand: reset the trajectory's rows, then p <- p - lr * grad CE(model(x_j), y_j), j = 1..T
        p = reset_rows(params, learner.out_name, sy, fresh)
        assert all(torch.equal(p[n], got[0][n]) for n in p)
        for j in range(len(sx)):
            adapted = {n: p[n].clone().requires_grad_() for n in learner.adapt_names}
            loss = F.cross_entropy(functional_call(model, {**p, **adapted}, (sx[j : j + 1],)), sy[j : j + 1])
            gs = torch.autograd.grad(loss, list(adapted.values()))
            p = {**p, **{n: (adapted[n] - 0.2 * g).detach() for n, g in zip(adapted, gs, strict=True)}}
            for n in p:
                torch.testing.assert_close(got[j + 1][n].detach(), p[n], rtol=1e-12, atol=1e-12)
        frozen = [n for n in p if n not in learner.adapt_names]
        assert frozen and all(torch.equal(got[-1][n], got[0][n]) for n in frozen)


def test_anml_gate_multiplies_the_features_it_feeds_the_head():
    net = tiny_anml()
    x = dataset(side=ANML_SIDE).gather([0, 1, 2], [0, 1, 2]).double()
    gate = torch.sigmoid(net.nm(x))
    assert gate.shape == (3, net.width) and bool(((gate >= 0) & (gate <= 1)).all())
    expected = F.linear(net.features(x) * gate, net.head.weight, net.head.bias)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    with torch.no_grad():  # a closed gate: the head sees nothing, the logits are its bias
        net.nm[-1].bias.fill_(-1e4)
    torch.testing.assert_close(net(x), net.head.bias.expand(3, -1), rtol=0, atol=1e-12)


def test_head_reset_touches_only_the_trajectory_classes():
    net = tiny_oml(classes=6)
    params = dict(net.named_parameters())
    w, b = params["pln.out.weight"], params["pln.out.bias"]
    fresh = fresh_rows(6, w.shape[1], w, torch.Generator().manual_seed(0))
    labels = torch.tensor([4, 4, 1, 1])
    out = reset_rows(params, "pln.out", labels, fresh)
    hit = [1, 4]
    rest = [0, 2, 3, 5]
    torch.testing.assert_close(out["pln.out.weight"][hit], fresh[hit], rtol=0, atol=0)
    assert torch.equal(out["pln.out.bias"][hit], torch.zeros(2, dtype=b.dtype))
    assert torch.equal(out["pln.out.weight"][rest], w[rest]) and torch.equal(out["pln.out.bias"][rest], b[rest])
    assert all(out[n] is params[n] for n in params if not n.startswith("pln.out"))
    # the reset rows no longer depend on the meta-learned ones; the kept rows pass their gradient through
    (gw,) = torch.autograd.grad(out["pln.out.weight"].sum(), [w])
    assert torch.equal(gw[hit], torch.zeros_like(gw[hit])) and torch.equal(gw[rest], torch.ones_like(gw[rest]))


def test_stream_eval_is_deterministic_and_a_pure_function_of_its_seed():
    ds = dataset(classes=8)
    net = tiny_oml(classes=8)
    before = {n: p.clone() for n, p in net.state_dict().items()}
    a = stream_eval(net, ds, classes=5, lr=0.1, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    torch.rand(10)
    b = stream_eval(net, ds, classes=5, lr=0.1, seed=3)
    assert a == b
    assert all(torch.equal(before[n], p) for n, p in net.state_dict().items())  # the model is left as it was
    s3, s3b, s4 = stream_split(ds, 5, 3), stream_split(ds, 5, 3), stream_split(ds, 5, 4)
    assert all(torch.equal(x, y) for x, y in zip(s3, s3b, strict=True))
    assert not torch.equal(s3[0], s4[0])
    train_x, train_y, test_x, _ = s3
    assert train_x.shape == (75, 1, 8, 8) and test_x.shape == (25, 1, 8, 8)
    assert train_y.tolist() == [c for c in range(5) for _ in range(15)]  # class by class
    # no held-out image is a training image
    flat_train = {tuple(r.tolist()) for r in train_x.flatten(1)}
    assert not any(tuple(r.tolist()) in flat_train for r in test_x.flatten(1))
    assert 0 <= a.train_accuracy <= 1 and 0 <= a.test_accuracy <= 1


def test_bad_inputs_are_refused_before_work():
    ds = dataset()
    with pytest.raises(ValueError, match="shots=30"):
        ContinualClasses(ds, shots=30)
    with pytest.raises(ValueError, match="stream of 9 classes"):
        stream_eval(tiny_oml(), ds, classes=9, lr=0.1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        stream_eval(tiny_oml(), ds, classes=2, lr=0.0)
    with pytest.raises(TypeError, match="oml meta-learns a OMLNet"):
        OML(tiny_anml())
    with pytest.raises(ValueError, match="inner_lr"):
        OML(tiny_oml(), inner_lr=-1.0)
    small = ContinualClasses(ds, shots=3, remember=4, tasks=2).batch(0)
    scores = OML(tiny_oml()).evaluate(small, 3)
    assert scores["loss"].shape == scores["accuracy"].shape == (2, 4)
    with pytest.raises(ValueError, match="steps=4 but the trajectories hold 3"):
        OML(tiny_oml()).evaluate(small, 4)
    batch = ContinualClasses(dataset(classes=10), shots=2, remember=2).batch(0)
    with pytest.raises(ValueError, match=r"outside 0\.\.5"):
        OML(tiny_oml(classes=6)).meta_gradient(batch)


def test_meta_training_resumes_exactly(tmp_path):
    ds = dataset(dtype=torch.float32)
    fam = ContinualClasses(ds, shots=3, remember=4, tasks=1, seed=2)

    def learner() -> OML:
        torch.manual_seed(0)
        return OML(OMLNet(6, channels=(2, 3), hidden=4, image_size=8), inner_lr=0.1)

    straight = learner()
    meta_train_continual(straight, fam, iterations=4, run_dir=tmp_path / "a", progress=False)
    resumed = learner()
    meta_train_continual(resumed, fam, iterations=2, run_dir=tmp_path / "b", progress=False)
    resumed = learner()
    meta_train_continual(resumed, fam, iterations=4, run_dir=tmp_path / "b", progress=False)
    for (n, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    torch.manual_seed(0)
    net = OMLNet(6, channels=(2, 3), hidden=4, image_size=8)
    result = pretrain_continual(net, ds, iterations=3, batch_size=8, run_dir=tmp_path / "p", progress=False)
    assert result.steps == 3 and (tmp_path / "p" / "last.pt").exists()


def test_meta_training_beats_the_unmeta_trained_representation_on_its_stream():
    torch.set_num_threads(1)
    train = dataset(classes=30, per_class=20, side=12, noise=0.3, seed=0, dtype=torch.float32)
    test = dataset(classes=12, per_class=20, side=12, noise=0.3, seed=1, dtype=torch.float32)  # held-out classes
    fam = ContinualClasses(train, shots=10, remember=20, tasks=1, seed=0)
    torch.manual_seed(0)
    learner = OML(OMLNet(30, channels=(16, 16), hidden=0, image_size=12), inner_lr=0.1)

    def score() -> float:
        got = [stream_eval(learner.model, test, classes=10, lr=0.01, seed=s).test_accuracy for s in range(4)]
        return sum(got) / len(got)

    before = score()
    meta_train_continual(learner, fam, iterations=300, meta_lr=1e-3, progress=False)
    after = score()
    assert math.isfinite(after) and after > before + 0.2, (before, after)


def test_shipped_continual_configs_load_and_bad_ones_are_refused(tmp_path):
    from pathlib import Path

    from innerloop.continual.config import load_continual_config

    root = Path(__file__).parents[2] / "configs"
    methods = {load_continual_config(p).method for p in root.glob("continual_*.toml")}
    assert methods == {"oml", "anml", "pretrain"}
    cfg = load_continual_config(root / "continual_oml.toml")
    assert cfg.override({"classes": [10, 20]}).classes == (10, 20)
    with pytest.raises(ValueError, match="unknown continual config key"):
        cfg.override({"chanels": 3})
    with pytest.raises(ValueError, match="classes"):
        cfg.override({"classes": [700]})
    bad = tmp_path / "continual_bad.toml"
    bad.write_text('method = "maml"\n')
    with pytest.raises(ValueError, match=r"continual_bad\.toml: method"):
        load_continual_config(bad)
