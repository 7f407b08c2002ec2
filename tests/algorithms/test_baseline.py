"""Baseline and Baseline++ (Chen et al. 2019) on a tiny synthetic image dataset.

1. Pre-training batches carry global class labels: every image is an image of its labelled class.
2. The pre-training gradient is that of the plain cross-entropy over all training classes (linear
   head) or of ``s * cos(w_c, z)`` (cosine head), by hand in float64.
3. Test time: the body is frozen and a new head is fitted on the support features; the query
   loss after each step equals hand-written gradient descent (for the linear head with the
   softmax-regression gradient ``(softmax - onehot)^T z / n`` written out).
4. Both learn through the command line on a generated image folder.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from innerloop.algorithms.baseline import Baseline, BaselinePP, GlobalLabelBatches, cosine_logits, train_classes
from innerloop.data.augment import Augment, AugmentedFamily
from innerloop.data.images import ImageClassDataset
from innerloop.data.sampling import FewShotClassification
from innerloop.tasks import TaskBatch
from innerloop.training.config import ConfigError, config_from_dict

TOL = {"rtol": 1e-12, "atol": 1e-12}


pytestmark = pytest.mark.usefixtures("float64")


def _dataset(classes=5, images=4, seed=0) -> ImageClassDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageClassDataset.from_dict(
        {f"c{c}": torch.rand(images, 1, 4, 4, generator=g, dtype=torch.float32) for c in range(classes)})


class TinyNet(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh())
        self.head = nn.Linear(5, classes)

    def forward(self, x):
        return self.head(self.features(x))


def test_pretraining_batches_have_global_labels():
    ds = _dataset()
    family = FewShotClassification({"train": ds, "val": _dataset(seed=1)}, ways=2, shots=1, queries=2, seed=3)
    algo = Baseline(TinyNet(5))
    batches = algo.training_family(family)
    assert isinstance(batches, GlobalLabelBatches) and batches.examples == 2 * (1 + 2)
    batch = batches.batch("train", range(3))
    assert batch.support_x.shape == (3, 3, 1, 4, 4) and batch.query_y.shape == (3, 3)
    x = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)
    y = torch.cat([batch.support_y, batch.query_y], 1).flatten(0, 1)
    for image, label in zip(x, y, strict=True):
        assert any(torch.equal(image, other) for other in ds.images(int(label)))
    for i in range(3):  # distinct images within a batch
        flat = torch.cat([batch.support_x[i], batch.query_x[i]]).flatten(1)
        assert len(torch.unique(flat, dim=0)) == len(flat)
    assert torch.equal(batches.batch("train", [1]).support_x[0], batch.support_x[1])  # deterministic
    assert batches.num_classes() == 5
    with pytest.raises(KeyError, match="no 'test' split"):
        batches.task("test", 0)


def test_augmented_batches_make_rotated_characters_new_classes():
    ds = _dataset()
    family = AugmentedFamily(FewShotClassification({"train": ds, "val": _dataset(seed=1)}, ways=2, shots=1,
                                                   queries=2, seed=3), Augment(class_rotations=True))
    algo = Baseline(TinyNet(20))
    batches = algo.training_family(family)
    assert isinstance(batches, GlobalLabelBatches) and batches.num_classes() == 20 == train_classes(family)
    assert batches.num_classes("val") == 5 and "rotation classes" in repr(batches)
    batch = batches.batch("train", range(8))
    x = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)
    y = torch.cat([batch.support_y, batch.query_y], 1).flatten(0, 1)
    assert len(torch.unique(y // 5)) > 1  # several turns drawn
    for image, label in zip(x, y, strict=True):  # image = an image of class label % 5, turned label // 5 times
        turned = [torch.rot90(other, int(label) // 5, dims=(-2, -1)) for other in ds.images(int(label) % 5)]
        assert any(torch.equal(image, other) for other in turned)
    assert torch.equal(batches.batch("train", [3]).query_x[0], batch.query_x[3])  # deterministic by index
    plain = GlobalLabelBatches({"train": ds}, examples=6, seed=3)
    assert torch.equal(plain.batch("train", range(8)).support_y % 5, batch.support_y % 5)  # the same draws


def test_augmented_batches_distort_the_images_deterministically():
    ds = _dataset(images=6)
    aug = Augment(rotation=20.0, shear=0.3, probability=1.0)
    batches = GlobalLabelBatches({"train": ds, "val": ds}, examples=6, seed=0, augment=aug)
    plain = GlobalLabelBatches({"train": ds, "val": ds}, examples=6, seed=0)
    a, b = batches.task("train", 2), plain.task("train", 2)
    assert torch.equal(a.support_y, b.support_y) and not torch.equal(a.support_x, b.support_x)
    assert torch.equal(batches.task("train", 2).support_x, a.support_x)
    assert torch.equal(batches.task("val", 2).support_x, plain.task("val", 2).support_x)  # train only
    assert batches.num_classes() == 5


@pytest.mark.parametrize("cls", [Baseline, BaselinePP])
def test_pretraining_gradient_by_hand(cls):
    torch.manual_seed(0)
    model = TinyNet(5)
    algo = cls(model, scale=3.0) if cls is BaselinePP else cls(model)
    batches = GlobalLabelBatches({"train": _dataset()}, examples=6, seed=0)
    batch = batches.batch("train", range(2)).to(dtype=torch.float64)
    grads, metrics = algo.meta_gradient(batch)
    x = torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)
    y = torch.cat([batch.support_y, batch.query_y], 1).flatten(0, 1)
    z = model.features(x)
    if cls is Baseline:
        logits = z @ model.head.weight.T + model.head.bias
    else:
        w = model.head.weight
        logits = 3.0 * (z / z.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    loss = -torch.log_softmax(logits, 1)[torch.arange(len(y)), y].mean()
    params = dict(model.named_parameters())
    expected = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for (n, p), e in zip(params.items(), expected, strict=True):
        torch.testing.assert_close(grads[f"model.{n}"], torch.zeros_like(p) if e is None else e, **TOL, msg=n)
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)


def test_cosine_logits_by_hand():
    z = torch.tensor([[3.0, 4.0]])  # normalised: (0.6, 0.8)
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised: (1, 0), (0, 1)
    torch.testing.assert_close(cosine_logits(z, w, 10.0), torch.tensor([[6.0, 8.0]]), rtol=1e-15, atol=1e-15)


def _episode(ways=3, shots=2, queries=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.rand(2, ways * shots, 1, 4, 4, generator=g),
                     torch.arange(ways).repeat_interleave(shots).expand(2, -1),
                     torch.rand(2, ways * queries, 1, 4, 4, generator=g),
                     torch.arange(ways).repeat_interleave(queries).expand(2, -1))


def test_linear_head_fitting_by_hand():
    """Softmax regression on frozen features, gradient written out: for ``p = softmax(z W^T + b)``
    and one-hot ``Y``, ``dCE/dW = (p - Y)^T z / n`` and ``dCE/db = mean(p - Y)``."""
    torch.manual_seed(1)
    model, lr, steps = TinyNet(7), 0.7, 4
    algo = Baseline(model, fit_lr=lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _episode()
    scores = algo.evaluate(batch, steps=steps)
    assert scores["loss"].shape == (2, steps + 1)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # the body (and the pre-training head) stay frozen
    for i in range(2):
        with torch.no_grad():
            zs, zq = model.features(batch.support_x[i]), model.features(batch.query_x[i])
        onehot = F.one_hot(batch.support_y[i], 3).double()
        head = algo.initial_head(3, 5, zs)
        w, b = head["weight"], head["bias"]
        assert w.shape == (3, 5) and float(w.abs().max()) <= 1 / 5**0.5
        for k in range(steps + 1):
            logits = zq @ w.T + b
            loss = -torch.log_softmax(logits, 1)[torch.arange(6), batch.query_y[i]].mean()
            acc = (logits.argmax(1) == batch.query_y[i]).double().mean()
            torch.testing.assert_close(scores["loss"][i, k], loss, **TOL)
            assert float(scores["accuracy"][i, k]) == float(acc)
            p = torch.softmax(zs @ w.T + b, 1)
            w, b = w - lr * (p - onehot).T @ zs / len(zs), b - lr * (p - onehot).mean(0)
    assert not torch.equal(scores["loss"][:, 0], scores["loss"][:, steps])


def test_cosine_head_fitting_by_hand():
    torch.manual_seed(2)
    model, lr, scale = TinyNet(7), 0.5, 4.0
    algo = BaselinePP(model, fit_lr=lr, scale=scale)
    batch = _episode(seed=6)
    scores = algo.evaluate(batch, steps=3)
    for i in range(2):
        with torch.no_grad():
            zs, zq = model.features(batch.support_x[i]), model.features(batch.query_x[i])
        w = algo.initial_head(3, 5, zs)["weight"]
        assert set(algo.initial_head(3, 5, zs)) == {"weight"}  # no bias in a cosine classifier

        def logits(z, w):
            return scale * (z / z.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T

        for k in range(4):
            loss = F.cross_entropy(logits(zq, w), batch.query_y[i])
            torch.testing.assert_close(scores["loss"][i, k], loss, **TOL)
            w = w.detach().requires_grad_()
            (g,) = torch.autograd.grad(F.cross_entropy(logits(zs, w), batch.support_y[i]), w)
            w = w - lr * g


def test_errors_name_the_way_out():
    from innerloop.data import Sinusoid

    with pytest.raises(ValueError, match=r"body `features` and a linear `head`.*\['0', '1'\]"):
        Baseline(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="exposes no `splits\\['train'\\]` dataset"):
        Baseline(TinyNet(3)).training_family(Sinusoid())
    with pytest.raises(ValueError,
                       match="baseline has no option 'head'; its options are: batch_norm, inner_lr, inner_steps"):
        Baseline(TinyNet(3), head="rbf")
    with pytest.raises(ConfigError, match="baseline needs a classification family"):
        config_from_dict({"algorithm": {"name": "baseline"}})
    with pytest.raises(ConfigError, match=r"algorithm.cosine_scale = 0\.0 is invalid"):
        config_from_dict({"algorithm": {"name": "baselinepp", "cosine_scale": 0.0},
                          "task": {"family": "omniglot"}, "model": {"name": "conv4"}, "eval": {"baseline": False}})


@pytest.fixture
def folder(fewshot_folder):
    return fewshot_folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["baseline", "baselinepp"])
def test_learns_through_the_command_line(tmp_path, folder, name):
    from innerloop.cli import main
    from innerloop.training.run import build_algorithm, build_family

    config = tmp_path / "cfg.toml"
    config.write_text(f"""
out_dir = "{tmp_path / 'run'}"
[task]
family = "image-folder"
data_root = "{folder}"
image_size = 16
ways = 3
shots = 1
queries = 3
[model]
name = "conv4"
filters = 8
[algorithm]
name = "{name}"
inner_lr = 0.5
inner_steps = 20
[train]
iterations = 15
meta_batch_size = 4
validate_every = 15
val_tasks = 10
[eval]
baseline = false
test_tasks = 40
ways = 2
shots = 1
queries = 3
steps = 20
report_steps = [0, 20]
""")
    torch.set_default_dtype(torch.float32)  # the image pipeline is float32
    from innerloop.training.config import load_config

    cfg = load_config(config)
    algo = build_algorithm(cfg, build_family(cfg))
    assert type(algo) is {"baseline": Baseline, "baselinepp": BaselinePP}[name]
    assert algo.model.head.out_features == 6  # one output per training class, not per way
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    per_step = report["runs"][name]["test"]["per_step"]
    assert per_step[-1]["mean"] > 0.75  # 2-way test tasks: chance is 1/2 (measured: 0.996 and 0.946)
    # the checkpoint is rebuilt (head sized from the family) and meta-tested by `innerloop eval`
    assert main(["eval", str(tmp_path / "run" / "best.pt"), "--tasks", "5", "--shots", "1", "--queries", "2",
                 "--steps", "3"]) == 0
