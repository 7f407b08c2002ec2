"""Lake et al. (2015)'s one-shot protocol on a fake Omniglot archive with drawer ids: 20-way tasks within one
evaluation alphabet, the support by one drawer and the queries by another, fixed by index; meta-training on
the background alphabets only; the whole protocol from a config, test-time augmentation stated in the table."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from fewshot_fakes import omniglot_png

from innerloop.data.factory import task_family
from innerloop.data.images import ImageClassDataset
from innerloop.data.omniglot import Omniglot
from innerloop.data.sampling import FewShotClassification
from innerloop.training.config import Config
from innerloop.training.run import build_family, dataset_title, identity, run

BACKGROUND = {"Alpha": 21, "Beta": 20, "Gamma": 22}
EVALUATION = {"Delta": 20, "Epsilon": 21, "Zeta": 3}
DRAWERS = [1, 4, 7, 9, 12]  # not 1..n: the ids come from the file names, not the order


def _write(path: Path, top: str, alphabets: dict[str, int], first_id: int) -> int:
    cid = first_id
    with zipfile.ZipFile(path, "w") as zf:
        for alphabet, n in alphabets.items():
            for c in range(1, n + 1):
                for d in DRAWERS:
                    zf.writestr(f"{top}/{alphabet}/character{c:02d}/{cid:04d}_{d:02d}.png",
                                omniglot_png(cid * 31 + d, size=32))
                cid += 1
    return cid


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("omniglot")
    nxt = _write(folder / "images_background.zip", "images_background", BACKGROUND, 1)
    _write(folder / "images_evaluation.zip", "images_evaluation", EVALUATION, nxt)
    return folder


@pytest.fixture(scope="module")
def omniglot(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Omniglot:
    return Omniglot(root, split="lake", image_size=16, lake_val_alphabets=1,
                    cache_dir=tmp_path_factory.mktemp("cache"))


def test_drawer_ids_come_from_the_file_names(omniglot):
    assert len(omniglot.drawers) == len(omniglot.characters.data)
    for split, ds in omniglot.items():
        for c in range(ds.num_classes):
            start, count = int(ds.starts[c]), int(ds.counts[c])
            assert omniglot.drawers[start : start + count].tolist() == DRAWERS, (split, ds.names[c])
    assert set(omniglot.drawer_ids()) == set(omniglot)


def _protocol(omniglot: Omniglot, **kw) -> FewShotClassification:
    return FewShotClassification({"test": omniglot["test"]}, ways=20, shots=1, queries=1, seed=0,
                                 within_alphabet={"test": True}, distinct_drawers={"test": True},
                                 drawers=omniglot.drawer_ids(), **kw)


def test_twenty_way_one_shot_within_an_evaluation_alphabet_by_two_drawers(omniglot):
    fam = _protocol(omniglot)
    test = omniglot["test"]
    evaluation = set(EVALUATION)
    alphabets = set()
    for i in range(40):
        t = fam.task("test", i)
        classes = fam.classes_of("test", i)
        assert len(set(classes)) == 20 and t.support_x.shape == (20, 1, 16, 16) and t.query_x.shape[0] == 20
        groups = {test.groups[c] for c in classes}
        assert len(groups) == 1 and groups <= evaluation  # one alphabet, of the evaluation set
        alphabets |= groups
        (ds,), (dq,) = fam.drawers_of("test", i)
        assert ds != dq and {ds, dq} <= set(DRAWERS)  # the support by one drawer, the queries by another
        for label, c in enumerate(classes):
            js, jq = DRAWERS.index(ds), DRAWERS.index(dq)
            assert torch.equal(t.support_x[label], test.images(c, [js])[0])
            assert torch.equal(t.query_x[label], test.images(c, [jq])[0])
        assert torch.equal(t.support_y, torch.arange(20)) and torch.equal(t.query_y, torch.arange(20))
    assert alphabets == {"Delta", "Epsilon"}  # Zeta has fewer than 20 characters
    again = _protocol(omniglot)  # fixed by index: a new family, the same 600 tasks
    for i in (0, 17, 599):
        a, b = fam.task("test", i), again.task("test", i)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
        assert fam.drawers_of("test", i) == again.drawers_of("test", i)
    batch = fam.batch("test", [3, 4])
    assert torch.equal(batch.query_x[1], fam.task("test", 4).query_x)


def test_meta_training_on_the_background_alphabets_only(omniglot):
    train, val = omniglot["train"], omniglot["val"]
    assert set(train.groups) | set(val.groups) == set(BACKGROUND) and not set(train.groups) & set(val.groups)
    assert set(omniglot["test"].groups) == set(EVALUATION)
    fam = FewShotClassification(omniglot, ways=3, shots=1, queries=2, seed=0, distinct_drawers={"train": True},
                                drawers=omniglot.drawer_ids())
    for i in range(10):
        assert {train.groups[c] for c in fam.classes_of("train", i)} <= set(BACKGROUND)
        s, q = fam.drawers_of("train", i)
        assert len(s) == 1 and len(q) == 2 and not set(s) & set(q)


def test_the_protocol_refuses_what_it_cannot_serve(omniglot):
    with pytest.raises(ValueError, match="needs the drawer of every image"):
        FewShotClassification(omniglot, ways=2, shots=1, queries=1, distinct_drawers=True)
    twice = ImageClassDataset.from_dict({f"c{i}": torch.rand(6, 1, 4, 4) for i in range(2)})
    with pytest.raises(ValueError, match="drawn by only 3; use shots \\+ queries <= 3"):  # each drew two
        FewShotClassification({"train": twice}, ways=2, shots=2, queries=2, distinct_drawers=True,
                              drawers={"train": torch.tensor([1, 1, 2, 2, 3, 3] * 2)})
    with pytest.raises(ValueError, match="holds 3 ids but the test split stores"):
        FewShotClassification(omniglot, ways=2, shots=1, queries=1, distinct_drawers={"test": True},
                              drawers={"test": torch.tensor([1, 2, 3])})
    plain = FewShotClassification(omniglot, ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="does not draw by drawer"):
        plain.drawers_of("test", 0)


def _cfg(root: Path, out: Path, **changes) -> Config:
    return Config().override({
        "task.family": "omniglot", "task.data_root": str(root), "task.split": "lake", "task.image_size": 16,
        "task.ways": 3, "task.shots": 1, "task.queries": 1, "task.split_options.lake_val_alphabets": 1,
        "task.sampling.test.within_alphabet": True, "task.sampling.test.distinct_drawers": True,
        "model.name": "conv4", "model.filters": 4, "algorithm.name": "protonet", "eval.baseline": False,
        "eval.ways": 20, "eval.shots": 1, "eval.queries": 1, "eval.test_tasks": 6, "eval.steps": 0,
        "eval.report_steps": [0], "train.iterations": 2, "train.meta_batch_size": 2, "train.validate_every": 2,
        "train.val_tasks": 2, "out_dir": str(out), **changes})


def test_the_protocol_from_a_config(root, tmp_path, monkeypatch):
    monkeypatch.setenv("INNERLOOP_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(root, tmp_path / "run", **{"eval.tta": 2, "task.augment.preset": "koch"})
    test = build_family(cfg, 1, 1, 20, splits=("test",))
    assert test.drawers_of("test", 0)[0] != test.drawers_of("test", 0)[1]
    assert dataset_title(cfg) == ("Omniglot (lake split, 1 validation alphabets, within one alphabet, "
                                  "support and query by different drawers)")
    assert identity(cfg, "protonet")["task"]["sampling"]["test"] == {"within_alphabet": True,
                                                                      "distinct_drawers": True}
    assert "augment" in identity(cfg, "protonet")["task"]
    plain = identity(_cfg(root, tmp_path / "other"), "protonet")["task"]
    assert "augment" not in plain and plain["sampling"]["val"] == {"within_alphabet": None}
    result = run(cfg, progress=False)
    table = (tmp_path / "run" / "results.md").read_text()
    assert "20-way 1-shot accuracy" in table and "6 fixed test tasks" in table
    assert "test-time augmentation: 2 copies per task" in table
    assert result["runs"]["protonet"]["test"]["tasks"] == 6
    off = _cfg(root, tmp_path / "run2")
    assert "test-time augmentation: none" in run(off, progress=False).table
    with pytest.raises(ValueError, match="only Omniglot records"):
        task_family("image-folder", shots=1, queries=1, data_root=str(tmp_path), distinct_drawers=True)
