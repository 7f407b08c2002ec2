"""The loggers: JSONL / CSV / TensorBoard / W&B files of a run, a custom Logger's calls, missing extras."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest
import torch

from innerloop.training.config import Config
from innerloop.training.loggers import (
    LOGGER_NAMES,
    CSVLogger,
    JSONLLogger,
    LoggerBase,
    MissingExtraError,
    TensorBoardLogger,
    build_loggers,
    check_loggers,
    inner_rates,
)
from innerloop.training.loop import meta_train
from innerloop.training.run import build_algorithm, build_family


def _setup(tmp_path, iterations=6, **algorithm):
    cfg = Config().override({"model.hidden": [8], "train.meta_batch_size": 3, "train.validate_every": 3,
                             "train.val_tasks": 4, "train.log_every": 2, "train.iterations": iterations,
                             "out_dir": str(tmp_path), **{f"algorithm.{k}": v for k, v in algorithm.items()}})
    family = build_family(cfg)
    return cfg, family, build_algorithm(cfg, family)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_csv_and_jsonl_of_a_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, family, alg = _setup(tmp_path, lr_mode="scalar")
    meta_train(alg, family, cfg.train, tmp_path, progress=False, loggers=("jsonl", "csv", "tensorboard"))

    rows = _jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 3, 4, 6]  # validation at 3 has its own line, at 6 merged
    assert set(rows[-1]) >= {"step", "loss", "mse", "grad_norm", "lr", "inner_lr", "tasks_per_s", "memory_mb",
                             "val_mse", "val_mse_ci95", "wall_s"}
    assert list(rows[-1])[-1] == "wall_s" and set(rows[1]) == {"step", "val_mse", "val_mse_ci95", "wall_s"}

    with (tmp_path / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [2, 3, 4, 6]
    for row, line in zip(table, rows, strict=True):
        for k, v in line.items():
            assert float(row[k]) == pytest.approx(v, rel=1e-12), k

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/mse", "train/grad_norm", "train/lr", "train/inner_lr", "train/tasks_per_s",
            "train/memory_mb", "val/mse", "val/mse_ci95"} <= tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows if "loss" in r], rel=1e-6)
    assert [e.step for e in events.Scalars("val/mse")] == [3, 6]


def test_a_resumed_run_drops_what_was_logged_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = ("jsonl", "csv", "tensorboard")

    def run(folder, iterations):
        cfg, family, alg = _setup(tmp_path / folder, iterations=iterations)
        cfg = cfg.override({"train.log_every": 1})
        meta_train(alg, family, cfg.train, tmp_path / folder, progress=False, loggers=names)

    run("a", 6)
    run("b", 3)
    for logger in build_loggers(["jsonl", "csv"], tmp_path / "b", run_config={}, start=3):  # a crash after 3
        logger.on_step(4, {"loss": 9.0, "wall_s": 1.0})
        logger.close()
    stray = TensorBoardLogger(tmp_path / "b" / "tensorboard")  # its events at step 4 go too
    stray.on_step(4, {"loss": 9.0})
    stray.close()
    run("b", 6)

    def drop(rows):
        return [{k: v for k, v in r.items() if k not in ("tasks_per_s", "wall_s", "memory_mb")} for r in rows]

    assert drop(_jsonl(tmp_path / "a" / "metrics.jsonl")) == drop(_jsonl(tmp_path / "b" / "metrics.jsonl"))
    with (tmp_path / "b" / "metrics.csv").open(newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(tmp_path / "b" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6] and 9.0 not in [e.value for e in loss]


def test_rows_merge_validation_into_the_step_and_widen_the_csv(tmp_path):
    loggers = [JSONLLogger(tmp_path / "m.jsonl"), CSVLogger(tmp_path / "m.csv")]
    for lg in loggers:
        lg.on_step(1, {"loss": 1.0, "wall_s": 0.1})
        lg.on_validation(1, {"val_acc": 0.5, "wall_s": 0.2})
        lg.on_validation(2, {"val_acc": 0.75, "val_acc_ci95": 0.1, "wall_s": 0.3})
        lg.on_step(3, {"loss": 0.5, "extra": 2.0, "wall_s": 0.4})
        lg.close()
    assert _jsonl(tmp_path / "m.jsonl") == [
        {"step": 1, "loss": 1.0, "val_acc": 0.5, "wall_s": 0.2},
        {"step": 2, "val_acc": 0.75, "val_acc_ci95": 0.1, "wall_s": 0.3},
        {"step": 3, "loss": 0.5, "extra": 2.0, "wall_s": 0.4},
    ]
    text = (tmp_path / "m.csv").read_text().splitlines()
    assert text[0] == "step,loss,wall_s,val_acc,val_acc_ci95,extra"
    assert text[1:] == ["1,1.0,0.2,0.5,,", "2,,0.3,0.75,0.1,", "3,0.5,0.4,,,2.0"]


class Recorder(LoggerBase):
    def __init__(self):
        self.calls = []

    def on_step(self, step, scalars):
        self.calls.append(("step", step, sorted(scalars)))

    def on_validation(self, step, scalars):
        self.calls.append(("validation", step, sorted(scalars)))

    def on_checkpoint(self, step, path):
        self.calls.append(("checkpoint", step, path.name))

    def on_end(self, summary):
        self.calls.append(("end", summary["steps"], summary["best_step"]))

    def close(self):
        self.calls.append(("close",))


def test_a_custom_logger_receives_the_calls_in_order(tmp_path):
    cfg, family, alg = _setup(tmp_path, iterations=4)
    cfg = cfg.override({"train.log_every": 2, "train.validate_every": 2})
    rec = Recorder()
    res = meta_train(alg, family, cfg.train, tmp_path, progress=False, loggers=("jsonl", rec))
    best = res.best_step
    got = [c if c[0] in ("checkpoint", "end", "close") else c[:2] for c in rec.calls]
    assert got == [("step", 2), ("validation", 2), ("checkpoint", 2, "best.pt"), ("checkpoint", 2, "last.pt"),
                   ("step", 4), ("validation", 4), *([("checkpoint", 4, "best.pt")] if best == 4 else []),
                   ("checkpoint", 4, "last.pt"), ("end", 4, best), ("close",)]
    step_scalars = rec.calls[0][2]
    assert {"loss", "mse", "grad_norm", "lr", "tasks_per_s", "wall_s"} <= set(step_scalars)
    assert "inner_lr" not in step_scalars  # fixed inner rate: nothing learned to log
    assert rec.calls[1][2] == ["val_mse", "val_mse_ci95", "wall_s"]
    # without a folder the named loggers write nothing, an object is still called
    rec2 = Recorder()
    meta_train(alg, family, cfg.train, None, progress=False, loggers=("jsonl", rec2))
    assert [c[0] for c in rec2.calls][-2:] == ["end", "close"]


def test_a_logger_is_closed_when_the_run_fails(tmp_path):
    cfg, family, alg = _setup(tmp_path, iterations=4)

    class Fails(Recorder):
        def on_validation(self, step, scalars):
            raise RuntimeError("no space left")

    rec = Fails()
    with pytest.raises(RuntimeError, match="no space left"):
        meta_train(alg, family, cfg.train, tmp_path, progress=False, loggers=(rec,))
    assert rec.calls[-1] == ("close",) and "end" not in [c[0] for c in rec.calls]


def test_inner_rates_are_read_from_the_parameters(tmp_path):
    _, _, scalar = _setup(tmp_path, lr_mode="scalar", inner_lr=0.25)
    assert inner_rates(scalar) == {"inner_lr": pytest.approx(0.25)}
    _, _, per_tensor = _setup(tmp_path, lr_mode="per_element", inner_lr=0.5)
    rates = inner_rates(per_tensor)
    with torch.no_grad():
        next(iter(per_tensor.inner_lr.rates.values())).mul_(2.0)
    changed = inner_rates(per_tensor)
    names = [k for k in rates if k != "inner_lr"]
    assert len(names) == len(per_tensor.inner_lr.rates) > 1
    assert changed[names[0]] == pytest.approx(1.0) and changed["inner_lr"] > rates["inner_lr"]
    _, _, fixed = _setup(tmp_path)
    assert inner_rates(fixed) == {}


def test_bad_logger_names_and_objects_are_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match=r"unknown logger 'tb'.*jsonl, csv, tensorboard, wandb"):
        check_loggers(["tb"])
    with pytest.raises(TypeError, match="lacks on_step"):
        check_loggers([object()])
    with pytest.raises(TypeError, match=r"write \('csv',\)"):
        check_loggers("csv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="named twice"):
        build_loggers(["csv", "csv"], tmp_path, run_config={})
    cfg, family, alg = _setup(tmp_path)
    with pytest.raises(ValueError, match="unknown logger"):
        meta_train(alg, family, cfg.train, tmp_path, progress=False, loggers=("nope",))
    assert not (tmp_path / "metrics.jsonl").exists()
    assert LOGGER_NAMES == ("jsonl", "csv", "tensorboard", "wandb")


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_extra_names_its_install_command(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import of it fails as if it were not installed
    cfg, family, alg = _setup(tmp_path)
    with pytest.raises(MissingExtraError, match=rf"pip install 'innerloop\[{name}\]'"):
        meta_train(alg, family, cfg.train, tmp_path, progress=False, loggers=("jsonl", name))
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any work


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    cfg, family, alg = _setup(tmp_path, iterations=2)
    cfg = cfg.override({"train.validate_every": 2})
    meta_train(alg, family, cfg.train, tmp_path, progress=False, loggers=("wandb",))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the run's records, for `wandb sync`


def test_a_metric_of_some_steps_is_averaged_over_those_steps(tmp_path):
    from innerloop.training.loop import Schedule, run_loop

    def outer_step(step):  # grad_norm only on the steps taken, as an fp16 run's skipped steps lack it
        return {"loss": float(step), **({"grad_norm": 4.0} if step % 2 == 0 else {})}

    run_loop(torch.nn.Linear(1, 1), outer_step, Schedule(4, log_every=4), tmp_path, name="t", progress=False)
    (row,) = _jsonl(tmp_path / "metrics.jsonl")
    assert row["loss"] == pytest.approx(1.5) and row["grad_norm"] == pytest.approx(4.0)


def test_a_run_from_step_zero_keeps_no_tensorboard_events_of_an_earlier_one(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stray = TensorBoardLogger(tmp_path / "tensorboard")  # a run that stopped before its first checkpoint
    stray.on_step(1, {"loss": 9.0})
    stray.close()
    cfg, family, alg = _setup(tmp_path, iterations=2)
    meta_train(alg, family, cfg.train, tmp_path, progress=False, loggers=("tensorboard",))  # no last.pt: step 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert 9.0 not in [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == [2]


@pytest.mark.parametrize(("version", "reinit"), [("0.16.6", True), ("0.19.9", True), ("0.19.10", "create_new"),
                                                 ("0.31.0", "create_new")])
def test_wandb_reinit_is_what_the_installed_version_takes(tmp_path, monkeypatch, version, reinit):
    import types

    calls = []
    fake = types.ModuleType("wandb")
    fake.__version__ = version
    fake.init = lambda **kw: calls.append(kw) or types.SimpleNamespace(finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from innerloop.training.loggers import WandbLogger

    WandbLogger(tmp_path).close()
    assert calls[0]["reinit"] == reinit


def test_run_without_progress_shows_no_meta_test_bar(tmp_path, monkeypatch):
    run_module = importlib.import_module("innerloop.training.run")  # the package's `run` is the function

    seen = []
    real = run_module.meta_test

    def spy(*args, **kwargs):
        seen.append((kwargs.get("progress"), kwargs.get("desc")))
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "meta_test", spy)
    cfg = Config().override({"model.hidden": [8], "train.iterations": 2, "train.meta_batch_size": 2,
                             "train.val_tasks": 4, "eval.test_tasks": 4, "eval.steps": 1,
                             "eval.report_steps": [0, 1], "eval.baseline": False, "out_dir": str(tmp_path)})
    run_module.run(cfg, progress=False)
    assert seen == [(False, "meta-test maml")]


def test_csv_resume_drops_a_row_a_crash_cut_short(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss,wall_s\n1,0.5,0.1\n2,0.4,0.2\n1")  # the crash came while writing step 12
    CSVLogger(path, start=10).close()
    assert path.read_text() == "step,loss,wall_s\n1,0.5,0.1\n2,0.4,0.2\n"
    path.write_text("step,loss,wall_s\n1,0.5,0.1\n\n,,\n3,0.3,0.3,9\n")
    CSVLogger(path, start=10).close()
    assert path.read_text() == "step,loss,wall_s\n1,0.5,0.1\n"
