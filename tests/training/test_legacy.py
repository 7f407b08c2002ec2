"""innerloop 0.1.0's checkpoints: their identities (what a run must share with a checkpoint to resume
it) are reproduced exactly, so its runs resume, and ``innerloop eval`` rebuilds their algorithms.

``identities_0_1_0.json`` was written once by innerloop 0.1.0 (commit 1d7e620) for every supervised
config in ``configs/`` and eight extra tables (its ``config`` entries), by ``make_identities.py``
(``PYTHONPATH=<a 0.1.0 checkout> python tests/training/make_identities.py OUT.json``); the same
configs read by this version must give the same identity, key for key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from innerloop.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from innerloop.training.config import Config, config_from_dict, load_config
from innerloop.training.run import (
    build_algorithm,
    build_family,
    config_tables_from_identity,
    identity,
    load_for_eval,
)

HERE = Path(__file__).parent
CONFIGS = HERE.parents[1] / "configs"
LEGACY = json.loads((HERE / "identities_0_1_0.json").read_text())


@pytest.mark.parametrize("case", sorted(LEGACY))
def test_identities_are_those_of_0_1_0(case):
    entry = LEGACY[case]
    cfg = load_config(CONFIGS / entry["file"]) if "file" in entry else config_from_dict(entry["config"])
    assert identity(cfg, cfg.algorithm.name) == entry["identity"]


@pytest.mark.parametrize("case", sorted(LEGACY))
def test_their_algorithm_tables_rebuild_the_same_config(case):
    entry = LEGACY[case]
    cfg = load_config(CONFIGS / entry["file"]) if "file" in entry else config_from_dict(entry["config"])
    table, execution = config_tables_from_identity(entry["identity"])
    rebuilt = config_from_dict({**cfg.to_dict(), "algorithm": table, "execution": execution})
    assert rebuilt.algorithm == cfg.algorithm and rebuilt.execution.vectorize == cfg.execution.vectorize


def test_a_0_1_0_checkpoint_evaluates(tmp_path):
    ident = LEGACY["maml_wd"]["identity"]  # a 0.1.0 identity of MAML with a learned inner weight decay
    legacy_cfg = config_from_dict(LEGACY["maml_wd"]["config"])
    algorithm = build_algorithm(legacy_cfg, build_family(legacy_cfg))
    save_checkpoint(tmp_path / "best.pt", {"algorithm": "maml", "identity": ident, "step": 1,
                                           "state": algorithm.state_dict()})
    loaded_cfg, loaded = load_for_eval(tmp_path / "best.pt")
    assert loaded_cfg.algorithm.options.weight_decay == 0.1 and loaded_cfg.algorithm.options.wd_mode == "scalar"
    for (k, a), (_, b) in zip(algorithm.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_an_option_the_algorithm_lost_is_named():
    ident = json.loads(json.dumps(LEGACY["metasgd"]["identity"]))
    ident["algorithm_cfg"]["cg_steps"] = 9  # an iMAML option on MAML: 0.1.0's flat table allowed it
    with pytest.raises(CheckpointError, match=r"algorithm\.cg_steps = 9, which metasgd no longer has"):
        config_tables_from_identity(ident)


def test_resuming_another_config_names_the_difference(tmp_path):
    from innerloop.training.loop import meta_train

    cfg = Config().override({"model.hidden": [8], "train.validate_every": 2, "train.val_tasks": 4,
                             "train.meta_batch_size": 2, "train.iterations": 2})
    family = build_family(cfg)
    meta_train(build_algorithm(cfg, family), family, cfg.train, tmp_path, identity=identity(cfg, "maml"),
               progress=False)
    other = cfg.override({"algorithm.inner_lr": 0.5, "train.iterations": 4})
    with pytest.raises(CheckpointError, match=r"algorithm_cfg\.inner_lr: checkpoint 0\.01, this run 0\.5"):
        meta_train(build_algorithm(other, family), family, other.train, tmp_path, identity=identity(other, "maml"),
                   progress=False)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
