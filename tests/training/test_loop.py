"""The training loop: it learns, checkpoints atomically, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from innerloop.io import atomic_write_bytes
from innerloop.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from innerloop.training.config import Config
from innerloop.training.evaluate import meta_test
from innerloop.training.loop import meta_train
from innerloop.training.run import build_algorithm, build_family, identity, load_for_eval


def _cfg(tmp_path, **train) -> Config:
    return Config().override({"model.hidden": [16, 16], "train.meta_batch_size": 5, "train.validate_every": 5,
                              "train.val_tasks": 10, "train.log_every": 5, "out_dir": str(tmp_path),
                              **{f"train.{k}": v for k, v in train.items()}})


def _train(cfg, run_dir, iterations, name="maml"):
    family = build_family(cfg)
    alg = build_algorithm(cfg, family, name)
    cfg = cfg.override({"train.iterations": iterations})
    meta_train(alg, family, cfg.train, run_dir, identity=identity(cfg, name), progress=False)
    return alg


def _metrics(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tasks_per_s", "wall_s", "memory_mb")} for r in rows]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = _cfg(tmp_path)
    straight = _train(cfg, tmp_path / "a", 20)
    _train(cfg, tmp_path / "b", 10)
    # a crash after step 10's checkpoint leaves a stray log line behind: it must be dropped
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 12, "loss": 0.0, "mse": 0.0}) + "\n")
    resumed = _train(cfg, tmp_path / "b", 20)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert _metrics(tmp_path / "a" / "metrics.jsonl") == _metrics(tmp_path / "b" / "metrics.jsonl")
    last = load_checkpoint(tmp_path / "b" / "last.pt")
    assert last["step"] == 20
    best = load_checkpoint(tmp_path / "b" / "best.pt")
    assert best["step"] == best["best_step"] and best["best_step"] in (5, 10, 15, 20)


def test_maml_learns_linear_regression(tmp_path):
    cfg = _cfg(tmp_path, outer_lr=0.01)
    cfg = cfg.override({"task.family": "linear", "algorithm.inner_lr": 0.5})
    family = build_family(cfg)
    alg = build_algorithm(cfg, family)
    before = meta_test(alg, family, "val", 100, steps=1).per_step[1].mean
    meta_train(alg, family, cfg.override({"train.iterations": 200}).train, None, progress=False)
    after = meta_test(alg, family, "val", 100, steps=1).per_step[1].mean
    assert after < 0.5 * before


def test_resume_with_another_config_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    _train(cfg, tmp_path, 5)
    cfg = cfg.override({"model.hidden": [32]})
    with pytest.raises(CheckpointError, match="another configuration"):
        _train(cfg, tmp_path, 10)


def test_checkpoint_from_another_model_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    _train(cfg, tmp_path, 5)
    payload = load_checkpoint(tmp_path / "best.pt")
    payload["identity"]["model"]["hidden"] = [16]  # a checkpoint claiming another shape
    payload.pop("format")
    save_checkpoint(tmp_path / "forged.pt", payload)
    with pytest.raises(CheckpointError, match="saved for another model"):
        load_for_eval(tmp_path / "forged.pt")
    cfg2, alg = load_for_eval(tmp_path / "best.pt")
    assert cfg2.model.hidden == [16, 16] and alg.name == "maml"


def test_corrupt_checkpoint_is_named(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_write_leaves_nothing_behind(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    save_checkpoint(tmp_path / "c.pt", {"step": 1})
    with pytest.raises(TypeError, match="plain data only"):  # refused before the write begins
        save_checkpoint(tmp_path / "c.pt", {"step": 2, "bad": Boom()})
    with pytest.raises(RuntimeError, match="boom"):  # a write that fails midway
        atomic_write_bytes(tmp_path / "c.pt", lambda f: (f.write(b"half"), Boom().__reduce__()))
    assert load_checkpoint(tmp_path / "c.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
