"""One training loop for every algorithm.

Each iteration draws meta-batch ``t`` of the ``train`` split (tasks ``t*B .. t*B+B-1``: fixed by
the family seed, so no sampler state needs saving), asks the algorithm for its meta-gradient,
and takes an outer optimiser step. Every ``validate_every`` iterations the algorithm is scored
on fixed validation tasks, the best-on-validation checkpoint is kept, and the last checkpoint is
written (atomically). A resumed run continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from innerloop.algorithms.base import Algorithm
from innerloop.runtime import tune_malloc
from innerloop.tasks import TaskFamily
from innerloop.training.checkpoint import (
    atomic_write_bytes,
    resume_into,
    save_checkpoint,
)
from innerloop.training.config import TrainConfig
from innerloop.training.distributed import (
    barrier,
    broadcast_parameters,
    reduce_meta_gradient,
    shard,
    world_size,
)
from innerloop.training.distributed import rank as dist_rank
from innerloop.training.evaluate import meta_test
from innerloop.training.schedule import set_outer_lr

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"
GradHook = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TrainResult:
    """What a training run ended with."""

    steps: int
    best_step: int
    best_val: float
    wall_time_s: float
    """Training wall time in total, summed over the runs a resumed run continued."""
    tasks_per_s: float


def make_optimizer(algorithm: Algorithm, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(algorithm.parameters(), lr=cfg.outer_lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(algorithm.parameters(), lr=cfg.outer_lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose 'adam' or 'sgd'.")


def _better(a: float, b: float | None, higher: bool) -> bool:
    return b is None or (a > b if higher else a < b)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` (by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    atomic_write_bytes(path, lambda f: f.write("".join(ln + "\n" for ln in kept).encode()))


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
) -> TrainResult:
    """Meta-train ``algorithm`` on ``family``'s train split.

    Args:
        algorithm: any :class:`Algorithm`; its parameters are the meta-parameters.
        family: the task family (train and val splits are used).
        cfg: iterations, meta-batch size, outer optimiser, validation schedule.
        run_dir: where ``last.pt``, ``best.pt`` and ``metrics.jsonl`` go (None: nothing saved).
        identity: what must match for a checkpoint to be resumed (e.g. the config); stored in
            every checkpoint, compared on resume.
        val_steps: adaptation steps before scoring validation tasks.
        resume: continue from ``run_dir/last.pt`` when it exists.
        progress: show a progress bar with loss, metric, validation metric and tasks/s.
        grad_hook: applied to the meta-gradient before the outer step (e.g. an all-reduce).
        val_family: the family whose ``val`` split validates (default: ``family``), e.g. with the
            test protocol's ways when training uses more.
    """
    tune_malloc()  # glibc: reuse freed activation memory instead of faulting in new pages
    run_dir = Path(run_dir) if run_dir is not None else None
    val_family = val_family or family
    family = algorithm.training_family(family)  # the Baseline pre-trains on global-label batches
    lead = dist_rank() == 0  # the one rank that writes checkpoints, logs and the progress bar
    if cfg.meta_batch_size < world_size():
        raise ValueError(f"meta_batch_size {cfg.meta_batch_size} is smaller than the {world_size()} ranks; "
                         "every rank needs at least one task per meta-batch.")
    optimizer = make_optimizer(algorithm, cfg)
    start, best_val, best_step, elapsed_before = 0, None, 0, 0.0
    if run_dir is not None and resume and (run_dir / LAST).exists():
        payload = resume_into(algorithm, run_dir / LAST, identity)
        optimizer.load_state_dict(payload["optimizer"])
        start, best_val, best_step = payload["step"], payload["best_val"], payload["best_step"]
        elapsed_before = payload.get("wall_s", 0.0)
        torch.set_rng_state(payload["torch_rng"])
        if lead:
            _truncate_metrics(run_dir / METRICS, start)
    broadcast_parameters(algorithm)

    def checkpoint(name: str, step: int) -> None:
        assert run_dir is not None
        save_checkpoint(run_dir / name, {
            "algorithm": algorithm.name, "identity": identity, "step": step,
            "state": algorithm.state_dict(), "optimizer": optimizer.state_dict(),
            "best_val": best_val, "best_step": best_step, "torch_rng": torch.get_rng_state(),
            "wall_s": elapsed_before + time.perf_counter() - t0,
        })

    log = None
    if run_dir is not None and lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = (run_dir / METRICS).open("a")
    params = dict(algorithm.named_parameters())
    bar = tqdm(total=cfg.iterations, initial=start, desc=desc, disable=not (progress and lead),
               dynamic_ncols=True, leave=True)
    t0, tasks_done = time.perf_counter(), 0
    window_loss = window_metric = 0.0
    window = 0
    val = None
    try:
        for step in range(start, cfg.iterations):
            b = cfg.meta_batch_size
            algorithm.set_progress(step, cfg.iterations)  # MAML++'s annealing; a no-op for most
            set_outer_lr(optimizer, cfg, step)  # lr_schedule; nothing for "constant"
            mine = shard(range(step * b, (step + 1) * b))  # all of it in one process
            grads, metrics = algorithm.meta_gradient(family.batch("train", mine))
            grads, metrics = reduce_meta_gradient(grads, metrics, len(mine), b, step + 1)
            if grad_hook is not None:
                grads = grad_hook(grads)
            for name, p in params.items():
                p.grad = grads[name]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            tasks_done += b
            window_loss += metrics["loss"]
            window_metric += metrics[algorithm.metric_name]
            window += 1
            bar.update(1)
            record: dict[str, Any] | None = None
            if done % cfg.log_every == 0 or done == cfg.iterations:
                speed = tasks_done / max(time.perf_counter() - t0, 1e-9)
                record = {"step": done, "loss": window_loss / window,
                          algorithm.metric_name: window_metric / window, "tasks_per_s": speed}
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                **{algorithm.metric_name: f"{record[algorithm.metric_name]:.3f}"},
                                val="-" if val is None else f"{val:.3f}", tasks_s=f"{speed:.0f}")
                window_loss = window_metric = 0.0
                window = 0
            if done % cfg.validate_every == 0 or done == cfg.iterations:
                res = meta_test(algorithm, val_family or family, "val", cfg.val_tasks, steps=val_steps)
                val = res.per_step[val_steps].mean
                record = {**(record or {"step": done}), f"val_{algorithm.metric_name}": val,
                          "wall_s": elapsed_before + time.perf_counter() - t0}
                if _better(val, best_val, algorithm.higher_is_better):
                    best_val, best_step = val, done
                    if run_dir is not None and lead:
                        checkpoint(BEST, done)
                if run_dir is not None and lead:
                    checkpoint(LAST, done)
            if record is not None and log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
    finally:
        bar.close()
        if log is not None:
            log.close()
    barrier("barrier at the end of training")  # the checkpoints are written before anyone reads them
    wall = time.perf_counter() - t0
    return TrainResult(cfg.iterations, best_step, float("nan") if best_val is None else best_val,
                       elapsed_before + wall, tasks_done / max(wall, 1e-9))
