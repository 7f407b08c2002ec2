"""Where a run's numbers go: one small callback protocol, called by the run skeleton.

:func:`~innerloop.training.loop.run_loop` (so :func:`~innerloop.training.loop.meta_train` and meta-RL's
``meta_train_rl``) calls every :class:`Logger` of a run, on the lead process only, in this order
for each outer step that logs: :meth:`Logger.on_step` (the window means of the outer step's
metrics, learning rates, gradient norm, tasks/s, memory), :meth:`Logger.on_validation` (when the
step validated: the value and its 95% CI half-width), :meth:`Logger.on_checkpoint` (after each
checkpoint written); :meth:`Logger.on_end` once a run completes, and :meth:`Logger.close` always.

Built in, by name (:data:`LOGGER_NAMES`, chosen with ``train.loggers`` or ``--logger``):

* ``jsonl``: ``metrics.jsonl``, one JSON object a line (the step, its scalars, the validation
  value merged into the same line); a resumed run drops the lines after its checkpoint's step.
* ``csv``: ``metrics.csv``, the same rows as columns (a column appears when its scalar first does).
* ``tensorboard``: event files under ``tensorboard/`` (``torch.utils.tensorboard``; the extra
  ``innerloop[tensorboard]``); tags ``train/<name>`` and ``val/<name>``; a resumed run purges the
  events after its checkpoint's step.
* ``wandb``: a Weights & Biases run under ``wandb/`` (the extra ``innerloop[wandb]``), offline
  unless ``WANDB_MODE`` says otherwise, so it never needs a network by default.

A Python user passes their own object (anything with the five methods; :class:`LoggerBase` gives
no-op defaults) beside or instead of the names.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from innerloop.io import atomic_write_text, truncate_jsonl

LOGGER_NAMES: tuple[str, ...] = ("jsonl", "csv", "tensorboard", "wandb")
"""The built-in loggers a config (``train.loggers``) or the command line (``--logger``) can name."""

EXTRAS: dict[str, tuple[str, str]] = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
"""Logger name -> (the module it imports, the ``innerloop[...]`` extra that installs it)."""

JSONL_FILE, CSV_FILE, TENSORBOARD_DIR = "metrics.jsonl", "metrics.csv", "tensorboard"


class MissingExtraError(ImportError):
    """A logger was asked for whose optional package is not installed (the message names the install command)."""


@runtime_checkable
class Logger(Protocol):
    """What the run skeleton calls; ``step`` is the number of outer steps done (1-based, as in
    ``metrics.jsonl``)."""

    def on_step(self, step: int, scalars: Mapping[str, float]) -> None:
        """The scalars of a logging step: window means of the outer step's metrics (``loss``, the
        metric, ``grad_norm``, ...), ``lr``, ``inner_lr`` (and ``inner_lr/<tensor>``) when learned,
        ``tasks_per_s``, ``memory_mb`` and ``wall_s``."""
        ...

    def on_validation(self, step: int, scalars: Mapping[str, float]) -> None:
        """The validation of step ``step``: ``val_<metric>``, ``val_<metric>_ci95`` (when finite), ``wall_s``."""
        ...

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint of step ``step`` was written to ``path`` (``last.pt`` or ``best.pt``)."""
        ...

    def on_end(self, summary: Mapping[str, float]) -> None:
        """The run completed: ``steps``, ``best_step``, ``best_val``, ``wall_time_s``, ``tasks_per_s``."""
        ...

    def close(self) -> None:
        """Release files and handles (called once, also when the run stops with an error)."""
        ...


class LoggerBase:
    """A :class:`Logger` that ignores every call: subclass it and override what you need."""

    def on_step(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def on_validation(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_end(self, summary: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _merge(line: Mapping[str, Any], more: Mapping[str, float]) -> dict[str, Any]:
    """``line`` with ``more`` added, ``wall_s`` (the latest) last."""
    out = {k: v for k, v in line.items() if k != "wall_s"}
    out.update({k: v for k, v in more.items() if k != "wall_s"})
    wall = more.get("wall_s", line.get("wall_s"))
    if wall is not None:
        out["wall_s"] = wall
    return out


class _Rows:
    """One row per step, the validation of a step merged into its row: the current row is rewritten
    in place (the file cut back to where it began), so every row is on disk before the checkpoint
    that covers it."""

    def __init__(self) -> None:
        self.last: dict[str, Any] | None = None

    def add(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.last is not None and self.last["step"] == step:
            self.last = _merge(self.last, scalars)
            self.rewrite(self.last)
        else:
            self.last = _merge({"step": step}, scalars)
            self.append(self.last)

    def on_step(self, step: int, scalars: Mapping[str, float]) -> None:
        self.add(step, scalars)

    def on_validation(self, step: int, scalars: Mapping[str, float]) -> None:
        self.add(step, scalars)

    def append(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def rewrite(self, row: dict[str, Any]) -> None:
        raise NotImplementedError


class JSONLLogger(_Rows, LoggerBase):
    """``metrics.jsonl``: ``{"step": ..., "loss": ..., <metric>: ..., ..., "tasks_per_s": ...,
    "val_<metric>": ..., "wall_s": ...}`` a line; the lines after step ``start`` (what a run wrote
    after the checkpoint it resumes from) are dropped when it opens."""

    def __init__(self, path: str | Path, start: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, start)
        self.file = self.path.open("a")
        self.begin = self.file.tell()

    def append(self, row: dict[str, Any]) -> None:
        self.begin = self.file.tell()
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def rewrite(self, row: dict[str, Any]) -> None:
        self.file.truncate(self.begin)
        self.file.seek(self.begin)
        self.append(row)

    def close(self) -> None:
        self.file.close()


def _step_of(row: Mapping[str, Any]) -> float:
    """The step of a row read back from ``metrics.csv``; ``inf`` (dropped) for a row a crash cut short:
    fewer cells than the header (``csv`` gives the missing ones as ``None``; a complete row has ``""``),
    more, or no step."""
    try:
        return math.inf if None in row or None in row.values() else int(row["step"])
    except ValueError:
        return math.inf


class CSVLogger(_Rows, LoggerBase):
    """``metrics.csv``: a ``step`` column and one column per scalar (empty where a row lacks it); a
    new scalar adds its column (the file rewritten once, atomically); rows after step ``start`` are
    dropped when it opens."""

    def __init__(self, path: str | Path, start: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns: list[str] = ["step"]
        rows: list[dict[str, str]] = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                rows = [r for r in reader if _step_of(r) <= start]
        self._write_all(rows)

    def _write_all(self, rows: Sequence[Mapping[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buf.getvalue())
        self.file = self.path.open("a", newline="")
        self.begin = self.file.tell()

    def _line(self, row: Mapping[str, Any]) -> str:
        buf = io.StringIO()
        csv.DictWriter(buf, self.columns, lineterminator="\n").writerow(row)
        return buf.getvalue()

    def _widen(self, row: Mapping[str, Any], replace_last: bool) -> bool:
        new = [k for k in row if k not in self.columns]
        if not new:
            return False
        self.file.close()
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if replace_last:
            rows = rows[:-1]
        self.columns += new
        self._write_all([*rows, row])
        return True

    def append(self, row: dict[str, Any]) -> None:
        if self._widen(row, replace_last=False):
            return
        self.begin = self.file.tell()
        self.file.write(self._line(row))
        self.file.flush()

    def rewrite(self, row: dict[str, Any]) -> None:
        if self._widen(row, replace_last=True):
            return
        self.file.truncate(self.begin)
        self.file.seek(self.begin)
        self.append(row)

    def close(self) -> None:
        self.file.close()


def _tag(section: str, key: str) -> str:
    return f"{section}/{key.removeprefix('val_') if section == 'val' else key}"


class TensorBoardLogger(LoggerBase):
    """Event files under ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``): ``train/<name>`` for
    :meth:`on_step`'s scalars, ``val/<metric>`` and ``val/<metric>_ci95`` for validation, the run's
    config as the text ``config``; a resumed run (``start > 0``) purges the events after step ``start``."""

    def __init__(self, log_dir: str | Path, start: int = 0, run_config: Mapping[str, Any] | None = None) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start + 1 if start > 0 else None)
        if run_config and start == 0:
            self.writer.add_text("config", "```\n" + json.dumps(run_config, indent=2, default=repr) + "\n```", 0)

    def on_step(self, step: int, scalars: Mapping[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(_tag("train", k), float(v), step)

    def on_validation(self, step: int, scalars: Mapping[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(_tag("val", k), float(v), step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.writer.flush()

    def on_end(self, summary: Mapping[str, float]) -> None:
        self.writer.add_text("summary", json.dumps(dict(summary)), int(summary.get("steps", 0)))

    def close(self) -> None:
        self.writer.close()


class WandbLogger(LoggerBase):
    """A Weights & Biases run in ``out_dir/wandb`` with the run's config: offline (``mode="offline"``,
    synced later with ``wandb sync``) unless the environment sets ``WANDB_MODE``; the project is
    ``WANDB_PROJECT`` or ``innerloop``. A resumed run is a new W&B run starting at step ``start + 1``."""

    def __init__(self, out_dir: str | Path, start: int = 0, run_config: Mapping[str, Any] | None = None) -> None:
        wandb = _require("wandb")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(out), mode=os.environ.get("WANDB_MODE", "offline"),
                              project=os.environ.get("WANDB_PROJECT", "innerloop"), name=out.name,
                              config=json.loads(json.dumps(dict(run_config or {}), default=repr)),
                              reinit=_reinit(wandb))

    def on_step(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({_tag("train", k): float(v) for k, v in scalars.items()}, step=step)

    def on_validation(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({_tag("val", k): float(v) for k, v in scalars.items()}, step=step)

    def on_end(self, summary: Mapping[str, float]) -> None:
        self.run.summary.update(dict(summary))

    def close(self) -> None:
        self.run.finish()


def _reinit(wandb: ModuleType) -> str | bool:
    """``wandb.init``'s ``reinit``: ``"create_new"`` (a new run beside any the caller has open) where the
    installed wandb knows it (0.19.10 and later), else ``True`` (a new run; older versions take a bool only)."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", str(getattr(wandb, "__version__", "")))
    return "create_new" if found and tuple(int(x) for x in found.groups()) >= (0, 19, 10) else True


def _require(name: str) -> ModuleType:
    """The optional package of logger ``name``, imported; else :class:`MissingExtraError` naming the install."""
    module, extra = EXTRAS[name]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"the {name!r} logger needs the {module!r} package, which is not installed: "
            f"pip install 'innerloop[{extra}]' (or pip install {module}), or leave {name!r} out of "
            f"train.loggers / --logger (available without extras: jsonl, csv)."
        ) from err


def check_loggers(loggers: Sequence[str | Logger]) -> None:
    """Refuse, before any work, an unknown logger name (``ValueError`` naming :data:`LOGGER_NAMES`),
    a logger object lacking a method (``TypeError``), or a name whose package is missing
    (:class:`MissingExtraError`)."""
    if isinstance(loggers, str):
        raise TypeError(f"loggers must be a sequence of names or Logger objects, got the string {loggers!r}; "
                        f"write ({loggers!r},).")
    for item in loggers:
        if isinstance(item, str):
            if item not in LOGGER_NAMES:
                raise ValueError(f"unknown logger {item!r}; choose from {', '.join(LOGGER_NAMES)} "
                                 "(or pass a Logger object).")
            if item in EXTRAS:
                _require(item)
        elif not isinstance(item, Logger):
            missing = [m for m in ("on_step", "on_validation", "on_checkpoint", "on_end", "close")
                       if not callable(getattr(item, m, None))]
            raise TypeError(f"the logger {item!r} lacks {', '.join(missing)}; give a name from "
                            f"{', '.join(LOGGER_NAMES)} or an object with the Logger methods "
                            "(subclass innerloop.training.loggers.LoggerBase).")


def build_loggers(names: Sequence[str], out_dir: str | Path, *, run_config: Mapping[str, Any],
                  start: int = 0) -> list[Logger]:
    """The built-in loggers ``names`` (from :data:`LOGGER_NAMES`, each at most once) writing into
    ``out_dir``; ``start``: the step a resumed run continues from (what was logged after it is
    dropped; ``0``: everything, TensorBoard's event files in ``out_dir/tensorboard`` too).
    ``run_config``: the run's settings (TensorBoard's ``config`` text, W&B's config).

    Raises before anything is created: ``ValueError`` for an unknown name, :class:`MissingExtraError`
    (naming the ``pip install`` command) for ``tensorboard`` / ``wandb`` without their package."""
    check_loggers(names)
    if len(set(names)) != len(names):
        raise ValueError(f"a logger is named twice in {list(names)}; name each at most once.")
    out = Path(out_dir)
    made: list[Logger] = []
    try:
        for name in names:
            if name == "jsonl":
                made.append(JSONLLogger(out / JSONL_FILE, start))
            elif name == "csv":
                made.append(CSVLogger(out / CSV_FILE, start))
            elif name == "tensorboard":
                if start == 0:  # a run from step 0 keeps no events of an earlier one (as metrics.jsonl)
                    _clear_events(out / TENSORBOARD_DIR)
                made.append(TensorBoardLogger(out / TENSORBOARD_DIR, start, run_config))
            else:
                made.append(WandbLogger(out, start, run_config))
    except BaseException:
        for logger in made:
            logger.close()
        raise
    return made


def clear_logs(out_dir: str | Path) -> None:
    """Delete what the file loggers wrote into ``out_dir`` (``metrics.jsonl``, ``metrics.csv``, the
    TensorBoard event files): a run that starts again from step 0 keeps nothing of an earlier one.
    (W&B runs are separate runs; they stay.)"""
    out = Path(out_dir)
    for file in (JSONL_FILE, CSV_FILE):
        (out / file).unlink(missing_ok=True)
    _clear_events(out / TENSORBOARD_DIR)


def _clear_events(log_dir: Path) -> None:
    """Delete the TensorBoard event files in ``log_dir`` (nothing else)."""
    if log_dir.is_dir():
        for event in log_dir.glob("events.out.tfevents.*"):
            event.unlink()


RATE_CONTAINERS = ("inner_lr", "step_lr")
"""Attribute names under which algorithms keep learned inner learning rates
(:class:`~innerloop.algorithms.rates.InnerLR` of MAML / Meta-SGD, MAML++'s per-step rates)."""


def inner_rates(module: nn.Module) -> dict[str, float]:
    """The learned inner learning rates of ``module`` (empty when they are fixed): ``inner_lr``, the
    mean of the per-tensor means, and ``inner_lr/<tensor>`` per tensor when there is more than one
    (its mean: per element for Meta-SGD, over the steps for MAML++). One synchronisation."""
    found = [(n, p) for n, p in module.named_parameters()
             if p.requires_grad and p.is_floating_point() and set(n.split(".")) & set(RATE_CONTAINERS)]
    if not found:
        return {}
    means = torch.stack([p.detach().float().mean() for _, p in found]).tolist()
    out = {"inner_lr": sum(means) / len(means)}
    if len(found) > 1:
        for (n, _), m in zip(found, means, strict=True):
            out[f"inner_lr/{n.split('.')[-1].replace('__', '.')}"] = m
    return out


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on a CUDA ``device``, else the process's
    peak resident set size (``None`` where the platform does not report it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
