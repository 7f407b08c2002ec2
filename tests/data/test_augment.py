"""Task augmentation (innerloop.data.augment): deterministic by task index, the identity at zero strength,
Koch et al.'s ranges respected, rotation classes labelled consistently, test-time copies shape-correct."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from innerloop.algorithms.base import ObjectiveFns
from innerloop.data.augment import (
    AFFINE_KEYS,
    KOCH,
    Augment,
    AugmentedFamily,
    TTAFamily,
    affine_theta,
    augment_batch,
    distort,
    sample_affine,
    tta_batch,
)
from innerloop.data.images import ImageClassDataset
from innerloop.data.sampling import FewShotClassification
from innerloop.tasks import TaskBatch
from innerloop.training.config import AugmentConfig, Config, ConfigError
from innerloop.training.evaluate import tta_note, tta_objective
from innerloop.training.prefetch import Prefetcher


def _family(ways: int = 3, shots: int = 2, queries: int = 3, side: int = 12) -> FewShotClassification:
    g = torch.Generator().manual_seed(0)
    images = {f"c{i}": (torch.rand(6, 1, side, side, generator=g) > 0.7).float() for i in range(8)}
    ds = ImageClassDataset.from_dict(images)
    return FewShotClassification({"train": ds, "test": ds}, ways=ways, shots=shots, queries=queries, seed=3)


def _identity(n: int) -> dict[str, torch.Tensor]:
    p = {k: torch.zeros(n, dtype=torch.float64) for k in AFFINE_KEYS}
    p["scale_x"], p["scale_y"] = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    return p


def _equal(a: TaskBatch, b: TaskBatch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y"))


def test_deterministic_by_task_index_whatever_the_batch_and_the_prefetch():
    aug = dataclasses.replace(KOCH, class_rotations=True)
    fam = AugmentedFamily(_family(), aug)
    one = fam.batch("train", [4, 7])
    assert _equal(one, fam.batch("train", [4, 7]))  # the same index: the same augmented task
    for row, i in enumerate((4, 7)):  # inside any batch, or alone
        t = fam.task("train", i)
        assert torch.allclose(one.support_x[row], t.support_x, atol=1e-6)
        assert torch.allclose(one.query_x[row], t.query_x, atol=1e-6)
    alone = fam.batch("train", [7])
    assert torch.allclose(alone.query_x[0], one.query_x[1], atol=1e-6)
    assert not torch.equal(one.support_x[0], _family().batch("train", [4]).support_x[0])  # it did change
    # built on a background thread (training's prefetch) or inline: the same batches, bit for bit
    with Prefetcher(lambda step: fam.batch("train", [2 * step, 2 * step + 1]), depth=2, stop=3) as pre:
        for step in range(3):
            assert _equal(pre.get(step), fam.batch("train", [2 * step, 2 * step + 1]))
    # only the meta-training split is augmented; the wrapper passes the rest through
    assert _equal(fam.batch("test", [1]), _family().batch("test", [1]))
    assert fam.ways == 3 and fam.seed == 3 and fam.objective == "classification"


def test_identity_at_zero_strength_or_probability():
    plain = _family().batch("train", [0, 1])
    for aug in (dataclasses.replace(KOCH, strength=0.0), dataclasses.replace(KOCH, probability=0.0), Augment()):
        assert not aug.active
        assert _equal(augment_batch(plain, aug, [5, 6]), plain)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(distort(x, affine_theta(_identity(3))), x)  # identity rows are copied, not resampled


def test_koch_ranges_are_respected_and_each_component_half_the_time():
    p = sample_affine(KOCH, 4000, torch.Generator().manual_seed(1))
    assert set(p) == set(AFFINE_KEYS)
    assert float(p["rotation"].abs().max()) <= 10.0
    for k in ("shear_x", "shear_y"):
        assert float(p[k].abs().max()) <= 0.3
    for k in ("scale_x", "scale_y"):
        assert float(p[k].min()) >= 0.8 and float(p[k].max()) <= 1.2
    for k in ("shift_x", "shift_y"):
        assert float(p[k].abs().max()) <= 2 / 105 + 1e-12
    for k, off in (("rotation", 0.0), ("shear_x", 0.0), ("scale_x", 1.0), ("shift_x", 0.0)):
        used = float((p[k] != off).double().mean())
        assert abs(used - 0.5) < 0.04, (k, used)  # each component with probability 0.5
    assert torch.equal(p["shear_x"] != 0, p["shear_y"] != 0)  # a component is kept or left out as a whole
    half = sample_affine(dataclasses.replace(KOCH, strength=0.5), 4000, torch.Generator().manual_seed(1))
    assert torch.allclose(half["rotation"], p["rotation"] / 2)  # strength scales the ranges


def test_the_geometry_of_the_affine_matrices():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 3] = 1
    p = _identity(1)
    p["rotation"] = torch.tensor([90.0], dtype=torch.float64)
    assert torch.allclose(distort(x, affine_theta(p)), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5)
    p = _identity(1)
    p["shift_x"], p["shift_y"] = torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64)
    moved = distort(x, affine_theta(p))
    assert torch.allclose(moved[0, 0, 2, 4], torch.tensor(1.0), atol=1e-5)  # 0.2 * 5 = 1 right, 0.4 * 5 = 2 down
    p = _identity(1)
    p["scale_x"] = torch.tensor([2.0], dtype=torch.float64)
    wide = torch.zeros(1, 1, 8, 8)
    wide[0, 0, :, 3:5] = 1  # a bar two pixels wide around the centre ...
    assert int((distort(wide, affine_theta(p))[0, 0, 4] > 0.5).sum()) == 4  # ... twice as wide


def test_rotation_classes_are_labelled_consistently():
    fam = _family(ways=4, shots=2, queries=3)
    aug = Augment(class_rotations=True)
    plain = fam.batch("train", range(6))
    out = augment_batch(plain, aug, list(range(10, 16)))
    assert torch.equal(out.support_y, plain.support_y) and torch.equal(out.query_y, plain.query_y)
    turns_seen = set()
    for t in range(6):
        for label in range(4):
            s, q = plain.support_y[t] == label, plain.query_y[t] == label
            orig = torch.cat([plain.support_x[t][s], plain.query_x[t][q]])
            now = torch.cat([out.support_x[t][s], out.query_x[t][q]])
            ks = [k for k in range(4) if torch.equal(torch.rot90(orig, k, dims=(-2, -1)), now)]
            assert ks, (t, label)  # every image of the class turned by one and the same quarter turn
            turns_seen.add(ks[0])
    assert len(turns_seen) > 1
    with pytest.raises(ValueError, match="square images"):
        augment_batch(TaskBatch(torch.zeros(1, 2, 1, 4, 6), torch.tensor([[0, 1]]), torch.zeros(1, 2, 1, 4, 6),
                                torch.tensor([[0, 1]])), aug, [0])


def test_tta_copies_and_prediction_averaging_are_shape_correct():
    fam = _family(ways=3, shots=2, queries=3)
    plain = fam.batch("test", [0, 1])
    out = tta_batch(plain, KOCH, 4, [8, 9])
    assert out.support_x.shape == (2, 4 * 6, 1, 12, 12) and out.query_x.shape == (2, 4 * 9, 1, 12, 12)
    assert torch.equal(out.support_x[:, :6], plain.support_x) and torch.equal(out.query_x[:, :9], plain.query_x)
    assert torch.equal(out.query_y, plain.query_y.repeat(1, 4))
    assert torch.equal(tta_batch(plain, KOCH, 4, [8, 9]).query_x, out.query_x)  # fixed by the seeds
    assert tta_batch(plain, KOCH, 1, [8, 9]) is plain
    wrapped = TTAFamily(fam, KOCH, 3)
    assert wrapped.tta_copies == 3 and wrapped.batch("test", [0]).query_x.shape[1] == 27
    with pytest.raises(ValueError, match="needs affine distortions"):
        TTAFamily(fam, Augment(class_rotations=True), 2)
    with pytest.raises(ValueError, match="integer >= 1"):
        tta_batch(plain, KOCH, 0, [8, 9])

    def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred.argmax(-1) == target).double().mean()

    fns = ObjectiveFns(torch.nn.functional.cross_entropy, accuracy, "accuracy", True, "classification", "labels")
    tta = tta_objective(fns, 2)
    target = torch.tensor([0, 1, 0, 1])  # two queries, two copies (copy-major)
    # query 0: copy 0 says class 1 weakly, copy 1 says class 0 strongly: the average says 0
    pred = torch.tensor([[0.0, 0.5], [0.0, 3.0], [4.0, 0.0], [0.0, 2.0]])
    assert float(tta.metric(pred, target)) == 1.0 and float(fns.metric(pred, target)) == 0.75
    assert math.isclose(float(tta.loss(pred, target)), float(fns.loss(pred, target)))  # the loss: per copy
    assert torch.equal(tta_objective(fns, 1).metric(pred, target), fns.metric(pred, target))
    with pytest.raises(ValueError, match="not 3 copies"):
        tta_objective(fns, 3).metric(pred, target)
    assert tta_note(1, KOCH) == "none" and "4 copies per task" in tta_note(4, KOCH)


def test_augment_ranges_are_checked():
    with pytest.raises(ValueError, match=r"shear = 1.5 is invalid: give a number in \[0, 1\)"):
        Augment(shear=1.5)
    with pytest.raises(ValueError, match=r"rotation = -1 is invalid"):
        Augment(rotation=-1)
    with pytest.raises(ValueError, match="probability = 2"):
        Augment(probability=2)
    with pytest.raises(ValueError, match="strength"):
        Augment(scale=0.5, strength=2.0)


def test_the_config_section_and_eval_tta():
    assert AugmentConfig(preset="koch").build() == KOCH
    assert not AugmentConfig().build().active
    with pytest.raises(ConfigError, match=r"task\.augment\.rotation = 5\.0 is set with preset = 'koch'"):
        Config().override({"task.augment.preset": "koch", "task.augment.rotation": 5})
    with pytest.raises(ConfigError, match=r"augment shear = 2\.0 is invalid"):
        Config().override({"task.augment.shear": 2})
    with pytest.raises(ConfigError, match=r"task\.augment = .* distorts images; task\.family 'sinusoid'"):
        Config().override({"task.augment.preset": "koch"})
    with pytest.raises(ConfigError, match=r"eval\.tta = 2 is invalid: test-time augmentation distorts images"):
        Config().override({"eval.tta": 2})
    with pytest.raises(ConfigError, match=r"eval\.tta = 0 is invalid"):
        Config().override({"eval.tta": 0})


def test_augmentation_reaches_the_baselines_batches_and_is_refused_for_other_own_batches(monkeypatch):
    from innerloop.algorithms.protonet import ProtoNet
    from innerloop.algorithms.registry import ALGORITHMS, Entry

    omniglot = {"task.family": "omniglot", "model.name": "conv4", "task.augment.preset": "koch",
                "eval.baseline": False}
    Config().override({**omniglot, "algorithm.name": "protonet"})  # episodes: augmented
    for name in ("baseline", "baselinepp"):  # global-label batches, augmented alike (see test_baseline.py)
        Config().override({**omniglot, "algorithm.name": name})

    class OwnBatches(ProtoNet):
        name = "ownbatches"

        def training_family(self, family):
            return family

    monkeypatch.setitem(ALGORITHMS, "ownbatches", Entry(OwnBatches))
    with pytest.raises(ConfigError, match=r"algorithm 'ownbatches' pre-trains on batches of its own"):
        Config().override({**omniglot, "algorithm.name": "ownbatches"})


def test_meta_test_scores_tta_families_on_averaged_predictions():
    from innerloop.algorithms.protonet import ProtoNet
    from innerloop.models.conv4 import Conv4
    from innerloop.training.evaluate import meta_test

    torch.manual_seed(0)
    alg = ProtoNet(Conv4(1, 3, 4, 16))
    fam = TTAFamily(_family(ways=3, shots=2, queries=3, side=16), KOCH, 3)
    fns = alg.fns
    res = meta_test(alg, fam, "test", 4, 0, progress=False)
    assert alg.fns is fns  # the algorithm's own objective is back
    alg.eval()
    with torch.no_grad():
        alg.fns = tta_objective(fns, 3)
        by_hand = alg.evaluate(fam.batch("test", range(4)), 0)["accuracy"][:, 0]
        alg.fns = fns
        plain = alg.evaluate(fam.batch("test", range(4)), 0)["accuracy"][:, 0]
    assert math.isclose(res.per_step[0].mean, float(by_hand.double().mean()), rel_tol=1e-12)
    assert by_hand.shape == plain.shape == (4,)


def test_meta_test_leaves_the_objective_as_it_was_when_it_fails_early(monkeypatch):
    from innerloop.algorithms.protonet import ProtoNet
    from innerloop.models.conv4 import Conv4
    from innerloop.training import evaluate

    alg = ProtoNet(Conv4(1, 3, 4, 16))
    fns = alg.fns

    def broken_bar(*args, **kwargs):
        raise RuntimeError("no terminal")

    monkeypatch.setattr(evaluate, "tqdm", broken_bar)
    with pytest.raises(RuntimeError, match="no terminal"):
        evaluate.meta_test(alg, TTAFamily(_family(ways=3, shots=2, queries=3, side=16), KOCH, 3), "test", 2, 0,
                           progress=False)
    assert alg.fns is fns and alg.training  # not left scoring TTA averages, nor in eval mode
