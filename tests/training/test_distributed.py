"""Data-parallel meta-training on torch.distributed (gloo on loopback, 2 processes).

Two ranks sharing each meta-batch must give the same meta-gradient and the same parameters
after several steps as one process with the whole meta-batch; a run resumes on another number
of ranks; a rank that dies or hangs stops the others with a clear error in bounded time.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from innerloop.training.config import Config
from innerloop.training.distributed import DistributedError, reduce_meta_gradient, shard
from innerloop.training.loop import meta_train
from innerloop.training.run import build_algorithm, build_family, identity

pytestmark = pytest.mark.slow  # several processes, real data or whole runs: skipped by `make test-quick`


def _cfg(meta_batch: int, iterations: int) -> Config:
    return Config().override({"model.hidden": [16, 16], "train.meta_batch_size": meta_batch,
                              "train.iterations": iterations, "train.validate_every": 2, "train.val_tasks": 7})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: dict, results) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=job.get("timeout", 60)))
        state, extra = _JOBS[job["kind"]](rank, job)
        # numpy, not tensors: torch would share tensors through memory that dies with this process
        results.put((rank, "ok", ({k: v.numpy() for k, v in state.items()}, extra)))
    except BaseException as err:  # report, so the parent can assert on it
        results.put((rank, type(err).__name__, f"{err}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _first_gradient(rank: int, job: dict):
    cfg = _cfg(job["meta_batch"], 1)
    family = build_family(cfg)
    alg = build_algorithm(cfg, family)
    mine = shard(range(job["meta_batch"]))
    grads, metrics = alg.meta_gradient(family.batch("train", mine))
    grads, metrics = reduce_meta_gradient(grads, metrics, len(mine), job["meta_batch"], 1)
    return {k: v.clone() for k, v in grads.items()}, metrics


def _train(rank: int, job: dict):
    cfg = _cfg(job["meta_batch"], job["iterations"])
    family = build_family(cfg)
    alg = build_algorithm(cfg, family)
    hook = None
    if job.get("fault") and rank == 1:
        def hook(grads, step=[0]):  # noqa: B006 - a counter across calls
            step[0] += 1
            if step[0] == 3:
                if job["fault"] == "die":
                    os._exit(3)
                time.sleep(120)  # hang
            return grads
    t0 = time.perf_counter()
    meta_train(alg, family, cfg.train, job.get("run_dir"), identity=identity(cfg, "maml"), progress=False,
               grad_hook=hook)
    return {k: v.detach().clone() for k, v in alg.state_dict().items()}, time.perf_counter() - t0


def _bn_algorithm():
    from innerloop.algorithms import MAML

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    return MAML(model, "regression", inner_lr=0.01, batch_norm="running", task_threads=1)


def _train_bn(rank: int, job: dict):
    cfg = _cfg(job["meta_batch"], job["iterations"])
    alg = _bn_algorithm()
    meta_train(alg, build_family(cfg), cfg.train, progress=False)
    return {k: v.detach().clone() for k, v in alg.state_dict().items()}, None


_JOBS = {"first_gradient": _first_gradient, "train": _train, "train_bn": _train_bn}


def _launch(world: int, job: dict, wait_s: float = 120, need: int | None = None):
    """Run ``job`` on ``world`` spawned ranks; return once ``need`` ranks (default all) reported."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, job, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    deadline = time.time() + wait_s
    try:
        while len(out) < (need or world) and time.time() < deadline:
            try:
                rank, status, value = results.get(timeout=1)
                out[rank] = (status, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return out, procs


def _single(meta_batch: int, iterations: int, run_dir=None):
    cfg = _cfg(meta_batch, iterations)
    family = build_family(cfg)
    alg = build_algorithm(cfg, family)
    meta_train(alg, family, cfg.train, run_dir, identity=identity(cfg, "maml"), progress=False)
    return alg


@pytest.mark.parametrize("meta_batch", [6, 5])  # even and uneven shards
def test_two_ranks_give_the_single_process_meta_gradient(meta_batch):
    out, _ = _launch(2, {"kind": "first_gradient", "meta_batch": meta_batch})
    assert {r: s for r, (s, _) in out.items()} == {0: "ok", 1: "ok"}, out
    cfg = _cfg(meta_batch, 1)
    family = build_family(cfg)
    grads, metrics = build_algorithm(cfg, family).meta_gradient(family.batch("train", range(meta_batch)))
    for rank in (0, 1):
        g, m = out[rank][1]
        for k in grads:
            torch.testing.assert_close(torch.from_numpy(g[k]), grads[k], rtol=1e-5, atol=1e-7)
        assert abs(m["loss"] - metrics["loss"]) < 1e-5


def test_two_ranks_train_like_one_and_resume_on_one(tmp_path):
    out, _ = _launch(2, {"kind": "train", "meta_batch": 6, "iterations": 4, "run_dir": str(tmp_path / "two")})
    assert all(s == "ok" for s, _ in out.values()), out
    straight = _single(6, 4)
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(out[0][1][0][k]), v, rtol=1e-5, atol=1e-6)
        assert (out[1][1][0][k] == out[0][1][0][k]).all()  # every rank holds the same parameters
    # the two-rank checkpoint resumes in one process and continues as one process would
    resumed = _single(6, 8, tmp_path / "two")
    longer = _single(6, 8)
    for k, v in longer.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]


def test_running_batchnorm_statistics_are_those_of_one_process():
    out, _ = _launch(2, {"kind": "train_bn", "meta_batch": 6, "iterations": 3})
    assert all(st == "ok" for st, _ in out.values()), out
    cfg = _cfg(6, 3)
    alg = _bn_algorithm()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: Adam's first steps amplify rounding of near-zero gradients
    try:
        meta_train(alg, build_family(cfg), cfg.train, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert int(alg.model[1].num_batches_tracked) == 3
    for k, v in alg.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(out[0][1][0][k]), v, rtol=1e-5, atol=1e-6, msg=k)
        assert (out[1][1][0][k] == out[0][1][0][k]).all(), k


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_a_dead_or_hung_rank_stops_the_others(tmp_path, fault):
    t0 = time.time()
    out, _ = _launch(2, {"kind": "train", "meta_batch": 4, "iterations": 50, "fault": fault, "timeout": 5,
                         "run_dir": str(tmp_path)}, wait_s=60, need=1)
    assert time.time() - t0 < 60
    status, message = out[0]
    assert status == DistributedError.__name__, out
    assert "Another rank died or hangs" in message and "resume from the last checkpoint" in message
    assert (tmp_path / "last.pt").exists()  # step 2's checkpoint survives; the run can resume


def test_shard_covers_the_batch_once():
    assert shard(range(7)) == list(range(7))  # one process: everything
    assert Path(__file__).exists()


def test_torchrun_runs_the_cli_unchanged(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f'out_dir = "{tmp_path / "run"}"\n[model]\nhidden = [16]\n'
                   "[train]\niterations = 8\nmeta_batch_size = 4\nvalidate_every = 4\nval_tasks = 8\n"
                   "[eval]\ntest_tasks = 12\nsteps = 2\nreport_steps = [0, 2]\nplot_tasks = 1\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "innerloop",
                           "train", "--config", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| maml |") == 1  # one rank reports
    assert (tmp_path / "run" / "results.json").exists() and (tmp_path / "run" / "best.pt").exists()
