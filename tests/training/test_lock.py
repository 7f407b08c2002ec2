"""One run at a time in a run folder: a second is refused naming the owner, a stale lock is taken over."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from innerloop.training import RunLockedError, run_lock
from innerloop.training.config import Config
from innerloop.training.lock import LOCK, check_unlocked
from innerloop.training.loop import Schedule, clear_run, meta_train, run_loop
from innerloop.training.run import build_algorithm, build_family


def _hold(run_dir: str, started, stop) -> None:
    """A run (in another process) that holds ``run_dir`` until told to stop."""
    model = torch.nn.Linear(2, 1)

    def step(s: int) -> dict[str, float]:
        started.set()
        stop.wait(60)
        return {"loss": 1.0}

    run_loop(model, step, Schedule(1), run_dir, name="holder", progress=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_second_run_on_a_folder_is_refused_naming_the_owner(tmp_path):
    ctx = mp.get_context("spawn")
    started, stop = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), started, stop))
    holder.start()
    try:
        assert started.wait(120), "the first run did not start"
        cfg = Config().override({"model.hidden": [8], "train.meta_batch_size": 2, "train.iterations": 2,
                                 "train.val_tasks": 2})
        family = build_family(cfg)
        alg = build_algorithm(cfg, family)
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError) as info:
            meta_train(alg, family, cfg.train, tmp_path, progress=False)
        assert time.perf_counter() - t0 < 10  # fails fast, trains nothing
        msg = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()!r}" in msg and "in use by another run" in msg
        with pytest.raises(RunLockedError):  # --overwrite must not delete a live run's files
            clear_run(tmp_path)
        assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()
    finally:
        stop.set()
        holder.join(60)
    assert holder.exitcode == 0
    assert not (tmp_path / LOCK).exists()  # released at the end
    check_unlocked(tmp_path)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    pid = _dead_pid()
    (tmp_path / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    check_unlocked(tmp_path)  # stale: not a live owner
    with pytest.warns(UserWarning, match=f"stale lock .* pid {pid} on this host"):
        result = run_loop(torch.nn.Linear(2, 1), lambda s: {"loss": 1.0}, Schedule(2), tmp_path, name="x",
                          progress=False)
    assert result.steps == 2
    assert not (tmp_path / LOCK).exists()


def test_live_lock_is_refused_and_released_on_exceptions(tmp_path):
    with run_lock(tmp_path) as me:
        assert json.loads((tmp_path / LOCK).read_text()) == me
        assert me["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"):
            run_loop(torch.nn.Linear(2, 1), lambda s: {"loss": 1.0}, Schedule(1), tmp_path, name="x",
                     progress=False)
    assert not (tmp_path / LOCK).exists()

    def boom(step: int) -> dict[str, float]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_loop(torch.nn.Linear(2, 1), boom, Schedule(1), tmp_path, name="x", progress=False)
    assert not (tmp_path / LOCK).exists()


def test_lock_of_another_host_or_unreadable_is_never_taken(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "started": "then"}))
    with pytest.raises(RunLockedError, match=r"host 'elsewhere'.*delete"):
        run_lock(tmp_path).__enter__()
    (tmp_path / LOCK).write_text("")
    with pytest.raises(RunLockedError, match="unknown owner"):
        run_lock(tmp_path).__enter__()
