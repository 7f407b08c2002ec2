"""One run skeleton for every kind of meta-training, and supervised meta-training on it.

:func:`run_loop` is written once and used by supervised meta-training (:func:`meta_train`) and by
meta-RL (:func:`innerloop.rl.train.meta_train_rl`). It owns everything around the outer steps:

* resume from ``last.pt``: the module's state, the optimiser's state, the step, the best
  validation value and its step, torch's RNG state and the wall time so far (summed across
  resumes); log lines written after the checkpoint's step are dropped;
* atomic checkpoints: ``last.pt`` every ``checkpoint_every`` steps, at every validation and at the
  end; ``best.pt`` at every new best validation value;
* the loggers (:mod:`innerloop.training.loggers`: by default the JSON-lines log ``metrics.jsonl``;
  CSV, TensorBoard, Weights & Biases or the caller's own): window means of the outer step's
  metrics, the outer and learned inner learning rates, tasks/s, peak memory, wall time and
  validation with its 95% CI; the progress bar with those metrics, and data-parallel ranks (one
  rank logs and writes, every rank starts from rank 0's parameters);
* an exclusive lock on the run folder (:func:`innerloop.training.lock.run_lock`, held by rank 0):
  a second run on the same folder is refused, naming the owner;
* the divergence policy: a non-finite metric of an outer step, non-finite parameters after it or
  a non-finite validation value stop the run with :class:`DivergenceError` (naming the step and
  the likely cause); ``last.pt`` keeps the last finite state and ``best.pt`` is never written
  with a non-finite value.

A caller supplies only what one outer step does: ``outer_step(step) -> metrics``, a pure function
of the step index and the current parameters (tasks of step ``t`` are fixed by the family seed,
so no sampler state needs saving) and, optionally, ``validate() -> value``. A resumed run then
continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from innerloop.adapt import loss_scale
from innerloop.algorithms.base import Algorithm
from innerloop.io import clean_partial_writes
from innerloop.tasks import Split, TaskBatch, TaskFamily
from innerloop.training.checkpoint import plain_data, resume_into, save_checkpoint
from innerloop.training.config import TrainConfig
from innerloop.training.device import LossScaler, all_finite, module_device, place, to_device
from innerloop.training.distributed import (
    barrier,
    broadcast_parameters,
    reduce_meta_gradient,
    reduce_statistics,
    shard,
    world_size,
)
from innerloop.training.distributed import rank as dist_rank
from innerloop.training.evaluate import StepStats, meta_test
from innerloop.training.lock import check_unlocked, run_lock
from innerloop.training.loggers import (
    Logger,
    build_loggers,
    check_loggers,
    clear_logs,
    inner_rates,
    peak_memory_mb,
)
from innerloop.training.prefetch import Prefetcher
from innerloop.training.schedule import set_outer_lr

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"
GradHook = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
OuterStep = Callable[[int], Mapping[str, float]]
"""``step -> metrics``: one outer step (0-based index ``step``), updating the parameters in place."""
Validate = Callable[[], "float | StepStats"]
"""``() -> value``: the validation score of the current parameters (a :class:`StepStats`: with its 95% CI)."""
Postfix = Callable[[Mapping[str, float]], dict[str, str]]
"""Window means of the outer step's metrics -> what the progress bar shows of them."""


class DivergenceError(RuntimeError):
    """Training diverged: a loss, meta-gradient, parameter or validation value is not finite."""


class MissingSplitError(ValueError):
    """The task family cannot produce a task of a split that training needs (``train``, ``val``)."""


def divergence(step: int, what: str, cause: str | None = None, run_dir: Path | None = None) -> DivergenceError:
    """The :class:`DivergenceError` of outer step ``step`` (1-based): ``what`` is not finite."""
    why = f" Likely cause: {cause}." if cause else " Likely cause: learning rates too large."
    kept = ""
    if run_dir is not None:
        kept = (f" {run_dir / LAST} keeps the last finite state" if (run_dir / LAST).exists()
                else " No checkpoint was written")
        kept += " (non-finite parameters are never saved, and best.pt never holds a non-finite value)."
    return DivergenceError(
        f"training diverged at step {step}: {what} is not finite.{why} Lower the learning rates (or clip the "
        "meta-gradient: train.grad_clip) and train again from the start (a new folder, --overwrite, or "
        f"resume=False).{kept}"
    )


def parameters_finite(module: nn.Module) -> bool:
    """Whether every floating-point parameter of ``module`` is finite (one synchronisation)."""
    checks = [torch.isfinite(p).all() for p in module.parameters() if p.is_floating_point()]
    return not checks or bool(torch.stack(checks).all())


class Stateful(Protocol):
    """State a run checkpoints beside the module's (e.g. the :class:`LossScaler` of fp16 training)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Schedule:
    """When the run skeleton logs, validates and checkpoints (all in outer steps)."""

    iterations: int
    log_every: int = 1
    """Log the means of the outer step's metrics over every window of this many steps."""
    validate_every: int | None = None
    """Validate (and keep the best-on-validation checkpoint) this often; ``None``: never."""
    checkpoint_every: int | None = None
    """Write ``last.pt`` this often (it is also written at every validation and at the end)."""

    def __post_init__(self) -> None:
        for key in ("log_every", "validate_every", "checkpoint_every"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 (or None), got {value}.")


@dataclass(frozen=True)
class TrainResult:
    """What a training run ended with."""

    steps: int
    best_step: int
    best_val: float
    """The best validation value (NaN when the run never validated)."""
    wall_time_s: float
    """Training wall time in total, summed over the runs a resumed run continued."""
    tasks_per_s: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    """The metrics of the last outer step this process ran (empty when it ran none)."""


def clear_run(run_dir: str | Path) -> None:
    """Delete what :func:`run_loop` writes into ``run_dir`` (``--overwrite``: start again); refused
    (:class:`~innerloop.training.lock.RunLockedError`) while another run holds the folder."""
    check_unlocked(run_dir)
    _clear(Path(run_dir))


def _clear(run_dir: Path) -> None:
    for file in (LAST, BEST):
        (Path(run_dir) / file).unlink(missing_ok=True)
    clear_logs(run_dir)  # metrics.jsonl, metrics.csv, TensorBoard events


def _better(a: float, b: float | None, higher: bool) -> bool:
    if not math.isfinite(a):  # a NaN is never "best"
        return False
    return b is None or (a > b if higher else a < b)


def run_loop(
    module: nn.Module,
    outer_step: OuterStep,
    schedule: Schedule,
    run_dir: str | Path | None = None,
    *,
    name: str,
    optimizer: torch.optim.Optimizer | None = None,
    identity: dict[str, Any] | None = None,
    validate: Validate | None = None,
    val_key: str = "val",
    higher_is_better: bool = True,
    tasks_per_step: int = 1,
    resume: bool = True,
    progress: bool = True,
    desc: str = "meta-train",
    postfix: Postfix | None = None,
    extra_state: Mapping[str, Stateful] | None = None,
    finite_metrics: Collection[str] | None = None,
    divergence_cause: str | None = None,
    loggers: Sequence[str | Logger] = ("jsonl",),
    run_config: Mapping[str, Any] | None = None,
    checkpoint_extras: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Run ``outer_step(step)`` for ``step`` in ``[start, schedule.iterations)``, with resume,
    checkpoints, logging, a progress bar and validation around it.

    Args:
        module: what is trained and checkpointed (``state_dict``); its parameters are the ones
            ``outer_step`` updates.
        outer_step: see :data:`OuterStep`; its metrics (floats) are logged as means over windows of
            ``schedule.log_every`` steps (a metric only some steps report, over those steps).
        schedule: iterations and the log, validation and checkpoint periods.
        run_dir: where ``last.pt``, ``best.pt`` and the logs go (None: nothing saved; the loggers
            named then write nothing, Logger objects are still called).
        name: the checkpoint's ``algorithm`` entry.
        optimizer: the outer optimiser whose state is checkpointed and resumed (None: one without
            state, as TRPO, or none).
        identity: what must match for a checkpoint to be resumed (e.g. the config); stored in
            every checkpoint, compared on resume.
        validate: see :data:`Validate`; called every ``schedule.validate_every`` steps and at the
            end; its value is logged as ``val_key`` (its CI half-width as ``{val_key}_ci95``) and
            picks ``best.pt``.
        higher_is_better: whether a higher validation value is better.
        tasks_per_step: tasks per outer step, for the tasks/s figure.
        resume: continue from ``run_dir/last.pt`` when it exists; ``False``: start again from step 0,
            deleting what an earlier run left in ``run_dir`` (``last.pt``, ``best.pt``, ``metrics.jsonl``).
        progress: show a progress bar.
        desc: the progress bar's label.
        postfix: see :data:`Postfix` (default: every metric with 3 decimals); the bar adds the last
            validation value and tasks/s.
        extra_state: more state to checkpoint and resume, by name (``state_dict`` /
            ``load_state_dict``), e.g. the loss scale of fp16 training.
        finite_metrics: the metrics of an outer step that must be finite (None: all of them); one
            that is not stops the run with :class:`DivergenceError`. ``outer_step`` may raise it
            itself (e.g. for a non-finite meta-gradient).
        divergence_cause: the likely cause a :class:`DivergenceError` names (e.g. the learning rates).
        loggers: names from :data:`~innerloop.training.loggers.LOGGER_NAMES` (files in ``run_dir``)
            and :class:`~innerloop.training.loggers.Logger` objects, called on the lead process only:
            ``on_step`` at every logging step, ``on_validation``, ``on_checkpoint`` after each
            checkpoint, ``on_end`` when the run completes, ``close`` always. An unknown name or a
            missing optional package is refused before any work.
        run_config: the run's whole resolved config as plain data (``Config.to_dict()``, what
            ``innerloop config show --format json`` prints), stored in every checkpoint under ``config``
            so ``innerloop eval`` can test as the run did (its ``[eval]`` section); the loggers get it
            as the run's config (default: ``identity``). Not part of the identity: a run resumed with
            another ``[eval]`` section still resumes, and its later checkpoints store its own config.
            Refused before any work (:class:`TypeError`) unless it is plain data.
        checkpoint_extras: more plain data stored in every checkpoint, by key, beside the identity and
            never compared on resume (:func:`innerloop.training.run.run` stores ``inputs``, what rebuilds
            the model without the data); a key the checkpoint already has, or data that is not plain,
            is refused before any work.

    Divergence: after every outer step the metrics in ``finite_metrics`` and the module's parameters
    are checked; a non-finite one (or a non-finite validation value) raises :class:`DivergenceError`
    before anything is written for that step, so ``last.pt`` keeps the last finite state and
    ``best.pt`` only ever holds a finite best.

    With a ``run_dir``, rank 0 holds the folder's lock (:func:`~innerloop.training.lock.run_lock`)
    from before the resume to the end: a second run on the folder fails with
    :class:`~innerloop.training.lock.RunLockedError` naming the owner.

    The module stays where it is (its device); checkpoints hold its tensors there and load on any
    device. The RNG states resumed are the CPU's and, for a module on a GPU, that GPU's.
    """
    check_loggers(loggers)
    if run_config is not None:  # refused here, not at the first checkpoint
        if not isinstance(run_config, Mapping):
            raise TypeError(f"run_config must be a mapping of settings (Config.to_dict()), got {run_config!r}.")
        run_config = plain_data(dict(run_config), "run_config")
    extras = plain_data(dict(checkpoint_extras or {}), "checkpoint_extras")
    taken = sorted(set(extras) & set(_PAYLOAD_KEYS))
    if taken:
        raise ValueError(f"checkpoint_extras may not set {taken}: a checkpoint holds those itself "
                         f"({', '.join(_PAYLOAD_KEYS)}); choose other keys.")
    run_dir = Path(run_dir) if run_dir is not None else None
    lead = dist_rank() == 0  # the one rank that writes checkpoints, logs and the progress bar
    with run_lock(run_dir) if run_dir is not None and lead else contextlib.nullcontext():
        if run_dir is not None and lead and not resume:
            _clear(run_dir)  # resume=False: start again, nothing of an earlier run stays behind
        return _run_locked(
            module, outer_step, schedule, run_dir, lead, name=name, optimizer=optimizer, identity=identity,
            validate=validate, val_key=val_key, higher_is_better=higher_is_better, tasks_per_step=tasks_per_step,
            resume=resume, progress=progress, desc=desc, postfix=postfix, extra_state=extra_state,
            finite_metrics=finite_metrics, divergence_cause=divergence_cause, loggers=loggers,
            run_config=run_config, extras=extras)


_PAYLOAD_KEYS = ("format", "algorithm", "identity", "step", "state", "optimizer", "best_val", "best_step",
                 "torch_rng", "wall_s", "config", "cuda_rng", "extra")
"""The keys a checkpoint of :func:`run_loop` holds itself (``checkpoint_extras`` adds others)."""


def _run_locked(
    module: nn.Module,
    outer_step: OuterStep,
    schedule: Schedule,
    run_dir: Path | None,
    lead: bool,
    *,
    name: str,
    optimizer: torch.optim.Optimizer | None,
    identity: dict[str, Any] | None,
    validate: Validate | None,
    val_key: str,
    higher_is_better: bool,
    tasks_per_step: int,
    resume: bool,
    progress: bool,
    desc: str,
    postfix: Postfix | None,
    extra_state: Mapping[str, Stateful] | None,
    finite_metrics: Collection[str] | None,
    divergence_cause: str | None,
    loggers: Sequence[str | Logger],
    run_config: Mapping[str, Any] | None,
    extras: Mapping[str, Any],
) -> TrainResult:
    start, best_val, best_step, elapsed_before = 0, None, 0, 0.0
    if run_dir is not None and lead and run_dir.exists():
        clean_partial_writes(run_dir)  # what an interrupted atomic write left behind (under the run's lock)
    if run_dir is not None and resume and (run_dir / LAST).exists():
        payload = resume_into(module, run_dir / LAST, identity)
        if optimizer is not None and payload.get("optimizer") is not None:
            optimizer.load_state_dict(payload["optimizer"])
        start = payload["step"]
        best_val, best_step = payload.get("best_val"), payload.get("best_step", 0)
        elapsed_before = payload.get("wall_s", 0.0)
        if payload.get("torch_rng") is not None:  # a CPU ByteTensor, whatever map_location gave
            torch.set_rng_state(payload["torch_rng"].to("cpu", torch.uint8))
        on = module_device(module)
        if payload.get("cuda_rng") is not None and on.type == "cuda":
            torch.cuda.set_rng_state(payload["cuda_rng"].to("cpu", torch.uint8), on)
        for key, obj in (extra_state or {}).items():
            if key in (payload.get("extra") or {}):
                obj.load_state_dict(payload["extra"][key])
    broadcast_parameters(module)
    t0 = time.perf_counter()

    def wall() -> float:
        return elapsed_before + time.perf_counter() - t0

    def checkpoint(file: str, step: int) -> None:
        assert run_dir is not None
        if not parameters_finite(module):  # never: checked after every step; a last guard
            raise divergence(step, "a parameter", divergence_cause, run_dir)
        payload = {
            "algorithm": name, "identity": identity, "step": step, "state": module.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "best_val": best_val, "best_step": best_step, "torch_rng": torch.get_rng_state(),
            "wall_s": wall(),
        }
        if run_config is not None:  # the whole config, beside (not in) the identity
            payload["config"] = run_config
        payload.update(extras)
        on = module_device(module)
        if on.type == "cuda":
            payload["cuda_rng"] = torch.cuda.get_rng_state(on)
        if extra_state:
            payload["extra"] = {key: obj.state_dict() for key, obj in extra_state.items()}
        save_checkpoint(run_dir / file, payload)
        for logger in active:
            logger.on_checkpoint(step, run_dir / file)

    def show(means: Mapping[str, float]) -> dict[str, str]:
        return {k: f"{v:.3f}" for k, v in means.items()}

    writes = run_dir is not None and lead
    active: list[Logger] = []
    if lead:
        names = [x for x in loggers if isinstance(x, str)]
        if run_dir is not None and names:  # the lines after the resumed step are dropped (start 0: all)
            shown_config = run_config if run_config is not None else identity or {}
            active = build_loggers(names, run_dir, run_config=shown_config, start=start)
        active += [x for x in loggers if not isinstance(x, str)]
    on = module_device(module)
    s = schedule
    bar = tqdm(total=s.iterations, initial=start, desc=desc, disable=not (progress and lead),
               dynamic_ncols=True, leave=True)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # per metric: a metric of only some steps (grad_norm of an fp16 step taken)
    window, val, last_means, speed_s, steps_run = 0, None, {}, "-", 0
    metrics: Mapping[str, float] = {}
    try:
        for step in range(start, s.iterations):
            metrics = outer_step(step)
            done, steps_run = step + 1, steps_run + 1
            for k in metrics if finite_metrics is None else finite_metrics:
                if k in metrics and not math.isfinite(float(metrics[k])):
                    raise divergence(done, f"the {k} ({float(metrics[k])})", divergence_cause, run_dir)
            if not parameters_finite(module):
                raise divergence(done, "a parameter after the outer step", divergence_cause, run_dir)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
            window += 1
            bar.update(1)
            final = done == s.iterations
            scalars: dict[str, float] | None = None
            if done % s.log_every == 0 or final:
                speed = steps_run * tasks_per_step / max(time.perf_counter() - t0, 1e-9)
                speed_s = f"{speed:.0f}"
                last_means = {k: v / counts[k] for k, v in sums.items()}  # over the steps that had it
                scalars = {**last_means, "tasks_per_s": speed}
                if active:
                    scalars.update(_monitor(module, optimizer, on))
                sums, counts, window = {}, {}, 0
            validated = validate is not None and (
                final or (s.validate_every is not None and done % s.validate_every == 0))
            val_scalars: dict[str, float] = {}
            if validated:
                assert validate is not None
                got = validate()
                val, ci = (got.mean, got.ci95) if isinstance(got, StepStats) else (float(got), math.nan)
                if not math.isfinite(val):
                    raise divergence(done, f"the validation value {val_key} ({val})", divergence_cause, run_dir)
                val_scalars = {val_key: val, **({f"{val_key}_ci95": ci} if math.isfinite(ci) else {})}
            if scalars is not None or validated:
                now = wall()
                for logger in active:  # the lines go in before the checkpoints that cover them
                    if scalars is not None:
                        logger.on_step(done, {**scalars, "wall_s": now})
                    if validated:
                        logger.on_validation(done, {**val_scalars, "wall_s": now})
                shown = (postfix or show)(last_means)
                if validate is not None:
                    shown["val"] = "-" if val is None else f"{val:.3f}"
                bar.set_postfix({**shown, "tasks_s": speed_s})
            if validated and val is not None and _better(val, best_val, higher_is_better):
                best_val, best_step = val, done
                if writes:
                    checkpoint(BEST, done)
            periodic = s.checkpoint_every is not None and done % s.checkpoint_every == 0
            if writes and (validated or periodic or final):
                checkpoint(LAST, done)
        elapsed = time.perf_counter() - t0
        result = TrainResult(s.iterations, best_step, float("nan") if best_val is None else best_val,
                             elapsed_before + elapsed, steps_run * tasks_per_step / max(elapsed, 1e-9),
                             {k: float(v) for k, v in metrics.items()})
        for logger in active:
            logger.on_end({"steps": result.steps, "best_step": result.best_step, "best_val": result.best_val,
                           "wall_time_s": result.wall_time_s, "tasks_per_s": result.tasks_per_s})
    finally:
        bar.close()
        for logger in active:
            logger.close()
    barrier("barrier at the end of training")  # the checkpoints are written before anyone reads them
    return result


def _monitor(module: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device) -> dict[str, float]:
    """What every logging step adds for the loggers: the outer learning rate ``lr``, the learned
    inner rates (:func:`~innerloop.training.loggers.inner_rates`) and the peak memory ``memory_mb``."""
    out: dict[str, float] = {}
    if optimizer is not None and optimizer.param_groups:
        out["lr"] = float(optimizer.param_groups[0]["lr"])
    out.update(inner_rates(module))
    memory = peak_memory_mb(device)
    if memory is not None:
        out["memory_mb"] = memory
    return out


def make_optimizer(algorithm: Algorithm, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(algorithm.trainable().values(), lr=cfg.outer_lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(algorithm.trainable().values(), lr=cfg.outer_lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose 'adam' or 'sgd'.")


def meta_train(
    algorithm: Algorithm,
    family: TaskFamily,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    identity: dict[str, Any] | None = None,
    val_steps: int = 1,
    resume: bool = True,
    progress: bool = True,
    desc: str = "meta-train",
    grad_hook: GradHook | None = None,
    val_family: TaskFamily | None = None,
    grad_clip: float | None = None,
    loggers: Sequence[str | Logger] = ("jsonl",),
    prefetch: int = 2,
    run_config: Mapping[str, Any] | None = None,
    checkpoint_extras: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Meta-train ``algorithm`` on ``family``'s train split (the :func:`run_loop` of meta-batches).

    Outer step ``t`` draws meta-batch ``t`` of the ``train`` split (tasks ``t*B .. t*B+B-1``),
    asks the algorithm for its meta-gradient (under ``torch.distributed``: of this rank's shard,
    then all-reduced) and takes an outer optimiser step. Every ``validate_every`` steps the
    algorithm is scored on fixed validation tasks and the best-on-validation checkpoint is kept.

    Device and precision are the algorithm's ``execution.device`` and ``execution.precision``: the
    device is resolved once, before any work (a device this machine lacks, or ``fp16`` on a CPU, is
    refused here), the algorithm is moved there before the optimiser is built, and every meta-batch
    follows it (pinned and copied asynchronously to a GPU). Meta-batches are built ``prefetch`` steps
    ahead on a background thread (:class:`~innerloop.training.prefetch.Prefetcher`, pinned there
    for a GPU), off the critical path; batch ``t`` is the one the inline path builds, so a run is the
    same bit for bit with or without it. With ``fp16`` a dynamic loss scale
    (:class:`~innerloop.training.device.LossScaler`, checkpointed) guards the meta-gradient: a step
    whose meta-gradient is not finite is skipped and the scale halved; ``loss_scale`` and
    ``skipped`` are logged with the metrics.

    Divergence (:class:`DivergenceError`, naming the step and the learning rates): a non-finite loss or
    meta-gradient (fp32, bf16), a non-finite loss of a step taken or a meta-gradient that stays non-finite
    at the smallest loss scale (fp16), non-finite parameters after a step, or a non-finite validation
    value stop the run; ``last.pt`` keeps the last finite state (see :func:`run_loop`).

    Before the first step, the family must produce a ``train`` task and ``val_family`` a ``val`` task
    (:class:`MissingSplitError` names the split otherwise).

    Args:
        algorithm: any :class:`Algorithm`; its parameters are the meta-parameters.
        family: the task family (train and val splits are used).
        cfg: iterations, meta-batch size, outer optimiser, validation schedule.
        run_dir: where ``last.pt``, ``best.pt`` and the logs (``metrics.jsonl``, ...) go (None:
            nothing saved).
        identity: what must match for a checkpoint to be resumed (e.g. the config); stored in
            every checkpoint, compared on resume. Default (:func:`default_identity`): the algorithm's
            name and options, the model's parameter names and shapes, the family's type and seed and
            ``cfg``'s meta-batch size, outer learning rate, optimiser and seed; a folder whose
            ``last.pt`` was written with another one is refused, naming the keys that differ.
        val_steps: adaptation steps before scoring validation tasks.
        resume: continue from ``run_dir/last.pt`` when it exists (and its identity matches);
            ``False``: start again from step 0, deleting ``last.pt``, ``best.pt`` and
            ``metrics.jsonl`` of an earlier run in ``run_dir``.
        progress: show a progress bar with loss, metric, validation metric and tasks/s.
        grad_hook: applied to the meta-gradient before the outer step (e.g. an all-reduce).
        val_family: the family whose ``val`` split validates (default: ``family``), e.g. with the
            test protocol's ways when training uses more.
        grad_clip: clip the meta-gradient's global L2 norm to this (``None``: no clipping); the norm
            before clipping is logged as ``grad_norm`` (with or without clipping).
        loggers: where the metrics go (see :func:`run_loop`): names from
            :data:`~innerloop.training.loggers.LOGGER_NAMES` (``"jsonl"``, ``"csv"``, ``"tensorboard"``,
            ``"wandb"``) and :class:`~innerloop.training.loggers.Logger` objects.
        prefetch: meta-batches built ahead on a background thread (0: built inline, in the training thread).
        run_config: the run's whole config as plain data, stored in every checkpoint beside the identity
            (see :func:`run_loop`); :func:`innerloop.training.run.run` passes ``Config.to_dict()``.
        checkpoint_extras: more plain data stored in every checkpoint (see :func:`run_loop`).
    """
    if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
        raise ValueError(f"grad_clip must be a finite number > 0 (or None), got {grad_clip!r}.")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0 (meta-batches built ahead; 0: inline), got {prefetch!r}.")
    check_loggers(loggers)
    if identity is None:
        identity = default_identity(algorithm, family, cfg)
    val_family = val_family or family
    family = algorithm.training_family(family)  # the Baseline pre-trains on global-label batches
    check_splits(family, val_family)
    b = cfg.meta_batch_size
    if b < world_size():
        raise ValueError(f"meta_batch_size {b} is smaller than the {world_size()} ranks; "
                         "every rank needs at least one task per meta-batch.")
    execution = algorithm.execution
    device = place(algorithm, execution.device, execution.precision)  # before the optimiser holds the parameters
    scaler = LossScaler() if execution.precision == "fp16" else None
    optimizer = make_optimizer(algorithm, cfg)
    params = algorithm.trainable()  # frozen parameters (requires_grad=False) get no gradient
    metric = algorithm.metric_name
    cause = learning_rates(algorithm, cfg)

    def mine_of(step: int) -> list[int]:
        return shard(range(step * b, (step + 1) * b))  # all of it in one process

    prefetcher = Prefetcher(lambda step: load_batch(family, mine_of(step), device), prefetch, cfg.iterations,
                            name="innerloop-meta-batches") if prefetch > 0 else None

    def outer_step(step: int) -> dict[str, float]:
        algorithm.set_progress(step, cfg.iterations)  # MAML++'s annealing; a no-op for most
        set_outer_lr(optimizer, cfg, step)  # lr_schedule; nothing for "constant"
        mine = mine_of(step)
        raw = prefetcher.get(step) if prefetcher is not None else family.batch("train", mine)
        batch = to_device(raw, device)
        if scaler is None:
            grads, metrics = algorithm.meta_gradient(batch)
        else:
            scale = scaler.scale
            with loss_scale(scale):  # the gradients come back unscaled
                grads, metrics = algorithm.meta_gradient(batch)
        grads, metrics = reduce_meta_gradient(grads, metrics, len(mine), b, step + 1)
        if algorithm.norm.keeps_statistics:  # each rank's running statistics saw its shard only
            reduce_statistics(algorithm, len(mine), b, step + 1)
        out = {"loss": metrics["loss"], metric: metrics[metric]}
        if scaler is not None:
            take = scaler.update(all_finite(grads))  # the same on every rank: after the all-reduce
            out.update(loss_scale=scale, skipped=0.0 if take else 1.0)
            if not take:  # a skipped step, not divergence, until the scale can go no lower
                if scale <= MIN_LOSS_SCALE:
                    raise divergence(step + 1, f"the meta-gradient (at the smallest loss scale, {scale})", cause,
                                     run_path)
                return out
            if not math.isfinite(float(out["loss"])):
                raise divergence(step + 1, f"the loss ({float(out['loss'])})", cause, run_path)
        elif not all_finite(grads):  # fp32 / bf16: no loss scale to blame
            raise divergence(step + 1, "the meta-gradient", cause, run_path)
        if grad_hook is not None:
            grads = grad_hook(grads)
        for n, p in params.items():
            p.grad = grads[n]
        if grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])
                                            ) if grads else torch.zeros(())
        out["grad_norm"] = float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    def validate() -> StepStats:
        return meta_test(algorithm, val_family, "val", cfg.val_tasks, steps=val_steps, device=device,
                         progress=False).per_step[val_steps]

    run_path = Path(run_dir) if run_dir is not None else None
    schedule = Schedule(cfg.iterations, log_every=cfg.log_every, validate_every=cfg.validate_every)
    try:
        return run_loop(algorithm, outer_step, schedule, run_dir, name=algorithm.name, optimizer=optimizer,
                        identity=identity, validate=validate, val_key=f"val_{metric}",
                        higher_is_better=algorithm.higher_is_better, tasks_per_step=b, resume=resume,
                        progress=progress, desc=desc,
                        extra_state=None if scaler is None else {"loss_scale": scaler},
                        # fp16: a skipped step's loss may be inf; outer_step checks the loss of steps taken
                        finite_metrics=() if scaler is not None else ("loss", metric), divergence_cause=cause,
                        loggers=loggers, run_config=run_config, checkpoint_extras=checkpoint_extras)
    finally:
        if prefetcher is not None:
            prefetcher.close()  # also on an error or KeyboardInterrupt: no thread outlives the run


def load_batch(family: TaskFamily, indices: Sequence[int], device: torch.device) -> TaskBatch:
    """Tasks ``indices`` of ``family``'s ``train`` split as one batch, in pinned memory when it goes to a
    GPU (the part of loading a meta-batch that :class:`~innerloop.training.prefetch.Prefetcher` moves
    off the critical path; :func:`~innerloop.training.device.to_device` then copies it asynchronously)."""
    batch = family.batch("train", indices)
    return batch.pin_memory() if device.type == "cuda" else batch


MIN_LOSS_SCALE = 2.0**-24
"""The floor of :class:`~innerloop.training.device.LossScaler`: a meta-gradient still non-finite there
is divergence, not an overflow of float16."""


def learning_rates(algorithm: Algorithm, cfg: TrainConfig) -> str:
    """``"learning rates too large: train.outer_lr = ..., algorithm.inner_lr = ..."`` (the inner one
    when the algorithm has it), the likely cause a :class:`DivergenceError` names."""
    rates = [f"train.outer_lr = {cfg.outer_lr!r}"]
    inner = getattr(algorithm.options, "inner_lr", None)
    if inner is not None:
        rates.append(f"algorithm.inner_lr = {inner!r}")
    return "learning rates too large: " + ", ".join(rates)


def plain_json(value: Any) -> Any:
    """``value`` as JSON data (tuples become lists, anything else its ``repr``): what a checkpoint
    loaded with ``weights_only=True`` gives back unchanged, so identities compare equal after a resume."""
    return json.loads(json.dumps(value, default=repr))


def default_identity(algorithm: Algorithm, family: TaskFamily, cfg: TrainConfig) -> dict[str, Any]:
    """What a run of the Python API without an ``identity`` must share with the checkpoint it resumes:
    the algorithm's name and options, the model's parameter names and shapes, the family's type and
    seed, and ``cfg``'s meta-batch size, outer learning rate, optimiser and seed."""
    opts = algorithm.options
    options = dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else repr(opts)  # type: ignore[arg-type]
    return plain_json({
        "algorithm": algorithm.name,
        "options": options,
        "parameters": {n: list(p.shape) for n, p in algorithm.named_parameters()},
        "family": {"type": type(family).__name__, "seed": getattr(family, "seed", None)},
        "train": {k: getattr(cfg, k) for k in ("meta_batch_size", "outer_lr", "optimizer", "seed")},
    })


def check_splits(family: TaskFamily, val_family: TaskFamily) -> None:
    """Draw one ``train`` task of ``family`` and one ``val`` task of ``val_family`` before any training:
    :class:`MissingSplitError` names a split that cannot be produced."""
    checks: tuple[tuple[TaskFamily, Split, str], ...] = (
        (family, "train", "training"), (val_family, "val", "validation"))
    for fam, split, role in checks:
        try:
            fam.task(split, 0)
        except Exception as err:
            raise MissingSplitError(
                f"the task family {type(fam).__name__} cannot produce a {split!r} task, which {role} needs: "
                f"{err}. Give a family with a {split!r} split"
                + (" (or pass val_family=).)" if split == "val" else ").")
            ) from err
