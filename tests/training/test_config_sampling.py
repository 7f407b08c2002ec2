"""Per-split sampling options and the Omniglot split's options in the config; the loggers; old configs and
checkpoint identities unchanged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from innerloop.data.factory import image_splits
from innerloop.data.images import deferred_cache_writes
from innerloop.training.config import Config, ConfigError, config_from_dict, load_config, within_alphabet
from innerloop.training.run import build_family, dataset_title, identity

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from fewshot_fakes import write_fake_omniglot

LEGACY = json.loads((Path(__file__).parent / "identities_0_1_0.json").read_text())


def test_one_flag_still_sets_every_split(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text("[task]\nwithin_alphabet = true\n")  # a config of before the per-split options
    assert within_alphabet(load_config(path).task) == {"train": True, "val": True, "test": True}


def test_each_split_its_own():
    cfg = config_from_dict({"task": {"within_alphabet": True, "sampling": {"test": {"within_alphabet": False},
                                                                         "val": {"within_alphabet": True}}}})
    assert within_alphabet(cfg.task) == {"train": True, "val": True, "test": False}
    cfg = Config().override({"task.sampling.test.within_alphabet": True})
    assert within_alphabet(cfg.task) == {"train": False, "val": False, "test": True}
    with pytest.raises(ConfigError, match=r"task.sampling.test.within_alphabet = 'yes' has the wrong type"):
        Config().override({"task.sampling.test.within_alphabet": "yes"})
    with pytest.raises(ConfigError, match=r"key 'task.sampling.tests'.*Did you mean 'task.sampling.test'"):
        config_from_dict({"task": {"sampling": {"tests": {}}}})


@pytest.mark.parametrize(("changes", "message"), [
    ({"task.split_options.lake_val_alphabets": 3}, "task.family 'sinusoid' takes none"),
    ({"task.family": "omniglot", "model.name": "conv4", "eval.baseline": False,
      "task.split_options.maml_val": 1200}, r"maml_val = 1200 is invalid: must lie in 0\.\.maml_train - 1"),
    ({"task.family": "omniglot", "model.name": "conv4", "eval.baseline": False,
      "task.split_options.lake_val_alphabets": -1}, "lake_val_alphabets = -1 is invalid"),
    ({"train.loggers": ["jsonl", "nope"]}, r"train.loggers = \['jsonl', 'nope'\] is invalid: choose among"),
    ({"train.loggers": ["csv", "csv"]}, "name each logger once"),
])
def test_bad_split_options_and_loggers(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config().override(changes)


def test_defaults_keep_the_identities_of_old_checkpoints():
    for entry in LEGACY.values():
        if "config" in entry:
            cfg = config_from_dict(entry["config"])
            assert identity(cfg, cfg.algorithm.name) == entry["identity"]
    cfg = Config().override({"train.loggers": ["csv"]})  # where the metrics go is no part of a run's identity
    assert identity(cfg, "maml") == identity(Config(), "maml")
    changed = identity(Config().override({"task.sampling.train.within_alphabet": True}), "maml")
    assert changed["task"]["sampling"]["train"] == {"within_alphabet": True}
    proto = Config().override({"task.family": "omniglot", "model.name": "conv4", "eval.baseline": False,
                               "algorithm.name": "protonet"})  # evaluation only: never part of the identity
    assert "transductive_steps" not in identity(proto, "protonet")["algorithm_cfg"]
    assert identity(proto.override({"algorithm.transductive_steps": 3}), "protonet") == identity(proto, "protonet")


@pytest.fixture
def omniglot_root(tmp_path):
    root = tmp_path / "omniglot"
    write_fake_omniglot(root)
    return root


def _omniglot(root, **changes):
    return Config().override({"task.family": "omniglot", "task.data_root": str(root), "task.split": "lake",
                              "task.ways": 2, "task.shots": 1, "task.queries": 1, "task.image_size": 16,
                              "model.name": "conv4", "eval.baseline": False, **changes})


def test_the_family_gets_each_splits_sampling_and_the_split_options(omniglot_root):
    cfg = _omniglot(omniglot_root, **{"task.sampling.test.within_alphabet": True,
                                      "task.split_options.lake_val_alphabets": 2})
    family = build_family(cfg)
    assert [family.within(s) for s in ("train", "val", "test")] == [False, False, True]
    assert len({a.split("/")[0] for a in family.splits["val"].names}) == 2  # two held-out alphabets
    classes = family.classes_of("test", 0)
    assert len({family.splits["test"].groups[c] for c in classes}) == 1
    assert dataset_title(cfg) == "Omniglot (lake split, 2 validation alphabets, within one alphabet)"
    only = build_family(cfg, 1, 3, 2, splits=("test",))  # 1 + 3 of 4 drawings: the test split alone is checked
    assert list(only.splits) == ["test"]


def test_titles_name_the_dataset_and_split(tmp_path):
    assert dataset_title(Config()) == "sinusoid"
    folder = Config().override({"task.family": "image-folder", "task.data_root": str(tmp_path / "birds"),
                                "model.name": "conv4", "eval.baseline": False})
    assert dataset_title(folder) == "image folder 'birds'"
    mini = Config().override({"task.family": "miniimagenet", "model.name": "conv4", "eval.baseline": False})
    assert dataset_title(mini, "val") == "miniImageNet (Ravi & Larochelle split, val tasks)"


def test_a_failed_run_leaves_no_cache(tmp_path, monkeypatch, fewshot_folder):
    from innerloop.training.run import run

    cache = tmp_path / "cache"
    monkeypatch.setenv("INNERLOOP_CACHE", str(cache))
    cfg = Config().override({"task.family": "image-folder", "task.data_root": str(fewshot_folder),
                             "task.image_size": 16, "task.ways": 3, "task.shots": 1, "task.queries": 1,
                             "model.name": "conv4", "model.filters": 4, "algorithm.name": "protonet",
                             "eval.baseline": False, "eval.ways": 7, "out_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="7-way tasks need 7 classes"):  # after the train split was read
        run(cfg, progress=False)
    assert not cache.exists() or not any(cache.rglob("*.npz"))
    image_splits.cache_clear()  # (this process keeps what it read in memory)
    with deferred_cache_writes():  # the same families built without the failure: the caches are written
        build_family(cfg.override({"eval.ways": 3}), ways=3)
    assert len(list(cache.rglob("*.npz"))) == 3


def test_training_ways_beyond_a_test_alphabet_with_within_alphabet_tests(omniglot_root, tmp_path):
    from innerloop.training.run import run

    # 4-way training tasks across alphabets; the test alphabets have 2 characters each: each family is
    # checked against its own split only, so the 2-way within-alphabet test tasks are served
    cfg = _omniglot(omniglot_root, **{
        "task.train_ways": 4, "task.split_options.lake_val_alphabets": 1,
        "task.sampling.test.within_alphabet": True, "task.sampling.test.distinct_drawers": True,
        "algorithm.name": "protonet", "model.filters": 4,
        "train.iterations": 2, "train.validate_every": 1, "train.val_tasks": 2, "eval.test_tasks": 3,
        "eval.ways": 2, "eval.shots": 1, "eval.queries": 1, "eval.steps": 0, "eval.report_steps": [0],
        "out_dir": str(tmp_path / "run")})
    report = run(cfg, progress=False)
    assert report["runs"]["protonet"]["test"]["tasks"] == 3


def test_data_without_a_val_split_names_the_split(tmp_path, fewshot_folder):
    import shutil

    from innerloop.training.run import run

    root = tmp_path / "noval"
    for split in ("train", "test"):
        shutil.copytree(fewshot_folder / split, root / split)
    cfg = Config().override({"task.family": "image-folder", "task.data_root": str(root), "task.image_size": 16,
                             "task.ways": 3, "task.shots": 1, "task.queries": 1, "model.name": "conv4",
                             "algorithm.name": "protonet", "eval.baseline": False, "out_dir": str(tmp_path / "r")})
    with pytest.raises(ConfigError, match=r"has no val split \(it has train, test\), which validation needs"):
        run(cfg, progress=False)
