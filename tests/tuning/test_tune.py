"""The outer loop on the run skeleton: resume, the config, ``innerloop tune``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from innerloop.cli import main
from innerloop.training.config import ConfigError
from innerloop.training.loggers import LoggerBase
from innerloop.tuning.hypergradient import Hyper, TrainingRun
from innerloop.tuning.tune import ProblemConfig, TuneConfig, load_tune_config, make_problem, tune

ROOT = Path(__file__).resolve().parents[2]


class Stop(LoggerBase):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, step: int, scalars: Mapping[str, float]) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def groups_run() -> tuple[TrainingRun, torch.Tensor, torch.Tensor, Hyper]:
    problem = make_problem(ProblemConfig(name="groups", n_train=30, n_val=30, n_test=10, dim=3, groups=3))
    init = {n: torch.zeros_like(p) for n, p in problem.model.named_parameters()}
    run = TrainingRun(problem.model, init, *problem.train, steps=20, batch_size=10, seed=1)
    hyper = Hyper.create(init, lr=0.2, weight_decay=0.05, tune_weight_decay="tensor")
    return run, *problem.val, hyper


@pytest.mark.parametrize("method", ["implicit", "unrolled"])
def test_a_resumed_tuning_ends_as_the_uninterrupted_one(tmp_path: Path, method: str) -> None:
    run, xv, yv, hyper = groups_run()
    kw = {"method": method, "outer_steps": 6, "outer_lr": 0.1, "terms": 5, "progress": False,
          "checkpoint_every": 1}
    whole = tune(run, xv, yv, hyper, run_dir=tmp_path / "a", **kw)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        tune(run, xv, yv, hyper, run_dir=tmp_path / "b", loggers=["jsonl", Stop(4)], **kw)  # type: ignore[arg-type]
    resumed = tune(run, xv, yv, hyper, run_dir=tmp_path / "b", **kw)  # type: ignore[arg-type]
    for key in hyper.tensors:
        assert torch.equal(whole.hyper.tensors[key], resumed.hyper.tensors[key])
    assert whole.history == resumed.history and len(whole.history) == 6
    assert whole.history[-1] < whole.history[0]
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val_loss" in x] == [1, 2, 3, 4, 5, 6]
    hvps = 6 if method == "implicit" else 20
    assert whole.compute == 6 * (20 + 2 * hvps)


def test_config_refuses_bad_values_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"method\.truncate = 500 is invalid"):
        TuneConfig().override({"method.name": "unrolled", "method.truncate": 500})
    with pytest.raises(ConfigError, match=r"hyper\.weight_decay = 'layer' is invalid"):
        TuneConfig().override({"hyper.weight_decay": "layer"})
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.stepz'"):
        TuneConfig().override({"inner.stepz": 3})
    for path in sorted((ROOT / "configs").glob("tune_*.toml")):
        load_tune_config(path)  # every shipped config is valid


def test_the_command_tunes_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["tune", "--config", str(ROOT / "configs" / "tune_noisy_labels.toml"), "--set", "outer.steps=4",
                 "--set", "inner.steps=30", "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 4 and len(results["tuned"]["data_weights"]) == 80
    assert results["mean_weight_corrupted"] < results["mean_weight_clean"]
    assert "validation loss" in capsys.readouterr().out
    assert main(["tune", "--set", "hyper.lr=scalar", "--out", str(tmp_path / "x")]) == 2
    assert "cannot tune a learning rate" in capsys.readouterr().err


@pytest.mark.parametrize("truncate", [0, -3, 21])
def test_tune_refuses_a_truncation_outside_the_runs_steps_naming_them(truncate: int) -> None:
    run, xv, yv, _ = groups_run()
    hyper = Hyper.create(run.init, lr=0.2, tune_lr="scalar")
    with pytest.raises(ValueError, match=rf"truncate must be in 1\.\.20 \(the run's steps\), got {truncate}\."):
        tune(run, xv, yv, hyper, method="unrolled", truncate=truncate, outer_steps=1, progress=False, loggers=())
