"""Environments stepped in worker processes (``innerloop.rl.workers``): episodes bit for bit those of the
family in process (2D navigation, HalfCheetah, whole meta-batches, any number of workers), the lifecycle
(close, context manager, garbage collection, a worker that raises, dies or hangs), and ``execution.workers``
in a run (outside the checkpoint identity: a run resumed with other workers equals the uninterrupted one)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from innerloop.cli import main
from innerloop.rl.config import RLConfig, rl_config_from_dict
from innerloop.rl.envs import EnvFamily, Navigation2D
from innerloop.rl.episodes import rollout, rollout_noise
from innerloop.rl.families import make_env_family
from innerloop.rl.maml import PolicyMAML
from innerloop.rl.policy import GaussianMLP
from innerloop.rl.train import rl_identity, run_rl
from innerloop.rl.workers import ParallelFamily, WorkerError, chunk_bounds, merge_info, pack, unpack
from innerloop.training.checkpoint import load_checkpoint
from innerloop.training.config import ConfigError

ROOT = Path(__file__).parents[2]
slow = pytest.mark.slow  # worker processes: skipped by `make test-quick`


def cheetah_family(horizon: int = 10) -> EnvFamily:
    pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    return make_env_family("cheetah-vel", seed=0, horizon=horizon)


def policy_for(family: EnvFamily) -> tuple[GaussianMLP, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    policy = GaussianMLP(family.obs_dim, family.act_dim, (8,))
    return policy, {k: v.detach() for k, v in policy.named_parameters()}


def episodes_of(family: EnvFamily, tasks: int, rollouts: int, tag: str = "t"):
    policy, params = policy_for(family)
    indices = list(range(3, 3 + tasks))
    noise = rollout_noise(family.seed, "train", indices, tag, rollouts, family.horizon, family.act_dim)
    return rollout(family, policy, params, family.tasks("train", indices), noise)


def assert_same_episodes(a, b):
    for k in ("obs", "actions", "rewards", "mask"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def assert_stopped(processes):
    for p in processes:
        p.join(5)
        assert not p.is_alive() and p.exitcode is not None


# -- pieces without processes -------------------------------------------------------------------------


def test_chunks_are_contiguous_and_differ_by_at_most_one():
    assert chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]  # more workers than environments
    assert chunk_bounds(0, 2) == [(0, 0), (0, 0)]
    with pytest.raises(ValueError, match="workers >= 1"):
        chunk_bounds(3, 0)


def test_packing_keeps_values_and_dtypes_and_info_is_concatenated_per_key():
    value = (torch.randn(3, 2), torch.tensor([True, False]), {"v": torch.arange(3, dtype=torch.float64)}, 7)
    back = unpack(pack(value))
    for x, y in zip(value[:2], back[:2], strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert back[2]["v"].dtype == torch.float64 and torch.equal(back[2]["v"], value[2]["v"]) and back[3] == 7
    merged = merge_info([{"success": torch.tensor([1.0, 0.0]), "n": 2}, {"success": torch.tensor([1.0]), "n": 1}])
    assert torch.equal(merged["success"], torch.tensor([1.0, 0.0, 1.0])) and merged["n"] == [2, 1]


def test_bad_settings_are_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="workers = 0 is invalid"):
        ParallelFamily(Navigation2D(), 0)
    with pytest.raises(ValueError, match="context = 'fork' is invalid"):
        ParallelFamily(Navigation2D(), 1, context="fork")
    family = Navigation2D()
    family.unpicklable = lambda: None  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"Navigation2D does not pickle.*execution\.workers = 0"):
        ParallelFamily(family, 2)


def test_execution_workers_is_validated_and_outside_the_identity():
    assert RLConfig().execution.workers == 0
    cfg = RLConfig().override({"execution.workers": 3})
    assert rl_identity(cfg, "maml") == rl_identity(RLConfig(), "maml")
    with pytest.raises(ConfigError, match=r"execution.workers = -1 is invalid: must be >= 0"):
        RLConfig().override({"execution.workers": -1})
    with pytest.raises(ConfigError, match=r"execution\.workers = 1\.5 has the wrong type"):
        rl_config_from_dict({"execution": {"workers": 1.5}})


# -- episodes equal the family's in process -------------------------------------------------------------


@slow
@pytest.mark.parametrize(("workers", "tasks", "rollouts"), [(1, 3, 3), (2, 3, 3), (3, 3, 3), (3, 1, 2)])
def test_navigation_in_workers_equals_in_process(workers, tasks, rollouts):
    family = Navigation2D(seed=1, horizon=12)
    expected = episodes_of(family, tasks, rollouts)  # 9 copies: chunks 9 / 5+4 / 3+3+3; 2 copies in 3 workers
    with ParallelFamily(family, workers) as parallel:
        assert isinstance(parallel, EnvFamily)
        assert (parallel.name, parallel.obs_dim, parallel.act_dim, parallel.task_dim, parallel.horizon,
                parallel.seed) == ("nav2d", 2, 2, 2, 12, 1)
        assert parallel.goal_radius == family.goal_radius  # other attributes pass through
        assert torch.equal(parallel.tasks("test", range(5)), family.tasks("test", range(5)))
        assert_same_episodes(episodes_of(parallel, tasks, rollouts), expected)
        assert_same_episodes(episodes_of(parallel, tasks, rollouts), expected)  # again, the same workers
        processes = parallel.processes
    assert_stopped(processes)


@slow
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_halfcheetah_in_workers_equals_in_process(workers):
    family = cheetah_family()
    expected = episodes_of(family, 2, 2)  # 4 copies: 4 / 2+2 / 2+1+1
    with ParallelFamily(family, workers) as parallel:
        env = parallel.make(family.tasks("train", [0, 1]))
        env.reset(seed=[1, 2])
        _, _, _, _, info = env.step(torch.zeros(2, 6))
        assert info["x_velocity"].shape == (2,) and info["x_velocity"].dtype == torch.float64
        assert_same_episodes(episodes_of(parallel, 2, 2), expected)
        assert_same_episodes(episodes_of(parallel, 2, 2, "other"), episodes_of(family, 2, 2, "other"))


@slow
@pytest.mark.parametrize("env", ["nav2d", "cheetah-vel"])
def test_a_whole_meta_batch_is_the_same_in_workers(env):
    family = Navigation2D(horizon=10) if env == "nav2d" else cheetah_family()
    policy, _ = policy_for(family)
    maml = PolicyMAML(policy, inner_lr=0.1, inner_steps=2)  # per-task adapted policies sample too
    expected = maml.sample(family, "train", range(3), rollouts=3)
    with ParallelFamily(family, 2) as parallel:
        got = maml.sample(parallel, "train", range(3), rollouts=3)
    for a, b in zip([*expected.adapt, expected.valid], [*got.adapt, got.valid], strict=True):
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            assert torch.equal(x, y)
    assert torch.equal(expected.returns, got.returns) and torch.equal(expected.old_mean, got.old_mean)


@slow
def test_float64_default_dtype_reaches_the_workers(float64):
    family = Navigation2D(horizon=6)
    expected = episodes_of(family, 2, 2)
    with ParallelFamily(family, 2) as parallel:
        got = episodes_of(parallel, 2, 2)
    assert got.obs.dtype == torch.float64
    assert_same_episodes(got, expected)


# -- lifecycle ----------------------------------------------------------------------------------------------


@slow
def test_close_context_manager_and_garbage_collection_stop_the_workers():
    parallel = ParallelFamily(Navigation2D(), 2)
    processes = parallel.processes
    assert all(p.is_alive() for p in processes)
    parallel.close()
    parallel.close()  # idempotent
    assert_stopped(processes)
    with pytest.raises(RuntimeError, match="is closed"):
        parallel.make(torch.zeros(2, 2))
    parallel = ParallelFamily(Navigation2D(), 1)
    processes = parallel.processes
    del parallel
    gc.collect()
    assert_stopped(processes)


@slow
def test_an_env_superseded_by_a_later_make_refuses_to_step():
    family = Navigation2D(horizon=4)
    with ParallelFamily(family, 2) as parallel:
        first = parallel.make(family.tasks("train", range(3)))
        first.reset()
        second = parallel.make(family.tasks("train", range(4)))
        with pytest.raises(RuntimeError, match="earlier make"):
            first.step(torch.zeros(3, 2))
        second.reset()
        obs, *_ = second.step(torch.zeros(4, 2))
        assert obs.shape == (4, 2)
        with pytest.raises(ValueError, match="one row per environment"):
            second.step(torch.zeros(3, 2))


@slow
def test_a_worker_that_raises_is_named_with_its_message_and_the_pool_goes_on():
    family = Navigation2D(horizon=4)
    with ParallelFamily(family, 2) as parallel:
        with pytest.raises(WorkerError, match=r"environment worker 0 of 2 \(pid \d+, nav2d\) raised in make: "
                                              r"ValueError: goals must be \[n, 2\]"):
            parallel.make(torch.zeros(4, 3))
        env = parallel.make(family.tasks("train", range(4)))
        env.reset()
        with pytest.raises(WorkerError,
                           match=r"worker 0 of 2 .* raised in step: ValueError: action must be \[2, 2\]"):
            env.step(torch.zeros(4, 3))
        assert_same_episodes(episodes_of(parallel, 2, 2), episodes_of(family, 2, 2))  # still usable


@slow
def test_ctrl_c_is_left_to_the_main_process():
    """SIGINT (a terminal sends it to the whole process group) does not kill a worker mid-command: the
    main process handles it and closes the pool."""
    family = Navigation2D(horizon=4)
    with ParallelFamily(family, 1) as parallel:
        os.kill(parallel.processes[0].pid, signal.SIGINT)
        time.sleep(0.3)
        assert parallel.processes[0].is_alive()
        assert_same_episodes(episodes_of(parallel, 1, 2), episodes_of(family, 1, 2))


@slow
def test_a_worker_that_dies_is_detected_and_the_pool_closed():
    family = Navigation2D(horizon=4)
    parallel = ParallelFamily(family, 2)
    processes = parallel.processes
    env = parallel.make(family.tasks("train", range(4)))
    env.reset()
    os.kill(processes[1].pid, signal.SIGKILL)
    processes[1].join(5)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"environment worker 1 of 2 \(pid \d+, nav2d\) .*"
                                          r"(died|cannot be reached).*pool is closed"):
        env.step(torch.zeros(4, 2))
    assert time.monotonic() - t0 < 30 and parallel.closed
    assert_stopped(processes)


@slow
def test_a_worker_that_hangs_times_out_and_is_stopped():
    family = Navigation2D(horizon=4)
    parallel = ParallelFamily(family, 2, timeout=2.0)
    processes = parallel.processes
    env = parallel.make(family.tasks("train", range(4)))
    os.kill(processes[0].pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"environment worker 0 of 2 .* did not answer 'reset' within 2 s"):
            env.reset()
        assert time.monotonic() - t0 < 30
    finally:
        with contextlib.suppress(ProcessLookupError):  # the pool has killed it
            os.kill(processes[0].pid, signal.SIGCONT)
    assert_stopped(processes)


@slow
def test_no_worker_outlives_the_main_process(tmp_path):
    """A script that starts a pool and exits without closing it (the atexit finalizer) or is killed (the
    workers see their pipe break) leaves no worker behind."""
    script = tmp_path / "pool.py"
    script.write_text(
        "import sys, time\n"
        "from innerloop.rl.envs import Navigation2D\n"
        "from innerloop.rl.workers import ParallelFamily\n"
        "if __name__ == '__main__':\n"
        "    pool = ParallelFamily(Navigation2D(), 2)\n"
        "    print(' '.join(str(p.pid) for p in pool.processes), flush=True)\n"
        "    if sys.argv[1] == 'wait':\n"
        "        time.sleep(600)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for how in ("exit", "wait"):
        proc = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE, text=True, env=env,
                                cwd=ROOT)
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        if how == "wait":
            proc.kill()
        proc.wait(60)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in pids), how


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped by its parent, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- execution.workers in a run ----------------------------------------------------------------------------

TINY = {
    "env": {"horizon": 8}, "policy": {"hidden": [8]}, "algorithm": {"rollouts": 3},
    "train": {"iterations": 3, "meta_batch_size": 3, "checkpoint_every": 1, "fisher_subsample": 0.5},
    "eval": {"test_tasks": 3, "rollouts": 3, "steps": 1, "pretrain": False, "random_init": False, "plot_tasks": 0},
}


@slow
def test_a_run_resumed_with_other_workers_equals_the_uninterrupted_run(tmp_path):
    def cfg(name, iterations, workers):
        return rl_config_from_dict({**TINY, "out_dir": str(tmp_path / name)}).override(
            {"train.iterations": iterations, "execution.workers": workers})

    straight = run_rl(cfg("straight", 3, 0), progress=False)
    run_rl(cfg("resumed", 2, 2), progress=False)
    resumed = run_rl(cfg("resumed", 3, 3), progress=False)  # continues last.pt with 3 workers
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 3
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
    assert straight["runs"]["maml"]["test"] == resumed["runs"]["maml"]["test"]
    assert resumed["execution"]["workers"] == 3


@slow
def test_cli_sets_execution_workers(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["rl", "train", "--help"])
    assert "execution.workers" in capsys.readouterr().out
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY, "out_dir": str(tmp_path / "run")}))
    assert main(["rl", "train", "--config", str(config), "--set", "execution.workers=2", "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["execution"]["workers"] == 2 and report["config"]["execution"]["workers"] == 2
    assert main(["rl", "train", "--config", str(config), "--set", "execution.workers=-2", "--no-progress"]) == 2
    assert "execution.workers = -2 is invalid" in capsys.readouterr().err


@slow
def test_the_sampler_benchmark_runs_at_a_tiny_size(tmp_path):
    pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rl_sampler.py"), "--tasks", "2", "--rollouts", "2",
           "--horizon", "10", "--repeats", "1", "--max-workers", "2", "--meta-batch", "2", "--meta-rollouts", "2",
           "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                   text=True, timeout=300)
    report = json.loads((tmp_path / "rl_sampler.json").read_text())
    assert [r["sampler"] for r in report["samplers"]] == ["fresh, in process", "reuse, in process", "1 worker",
                                                          "2 workers"]
    assert all(r["identical_episodes"] and r["steps_per_s"] > 0 for r in report["samplers"])
    assert report["rollout"]["env_steps"] == 40 and len(report["load_before"]) == 3
    assert set(report["meta_iteration"]["by_sampler"]) == {"reuse, in process", report["best_workers"]}
    table = (tmp_path / "rl_sampler.md").read_text()
    assert "| 2 workers |" in table and "share sampling" in table and "benchmarks/rl_sampler.py" in table



class RefusesToUnpickle(Navigation2D):
    """A family that pickles but cannot be rebuilt from its pickle (in a worker)."""

    def __setstate__(self, state):
        raise RuntimeError("this family cannot be rebuilt here")


@slow
def test_a_family_the_workers_cannot_unpickle_is_reported_not_hung():
    with pytest.raises(WorkerError, match=r"worker 0 of 1 .* raised in family: RuntimeError while reading the "
                                          r"message: this family cannot be rebuilt here"):
        ParallelFamily(RefusesToUnpickle(), 1)


@slow
def test_the_python_api_resumes_a_run_in_workers_as_in_process(tmp_path):
    """``meta_train_rl`` without an explicit identity: the family it records is the wrapped one, so a run
    started in process resumes in workers (and ends where the uninterrupted run does)."""
    from innerloop.rl.config import RLTrainConfig
    from innerloop.rl.train import meta_train_rl

    family = Navigation2D(horizon=6)
    cfg = RLTrainConfig(iterations=2, meta_batch_size=2, checkpoint_every=1, fisher_subsample=0.5, loggers=[])

    def algorithm():
        torch.manual_seed(0)
        return PolicyMAML(GaussianMLP(2, 2, (8,)))

    straight = algorithm()
    meta_train_rl(straight, family, cfg, 2, tmp_path / "straight", progress=False, loggers=())
    resumed = algorithm()
    meta_train_rl(resumed, family, dataclasses.replace(cfg, iterations=1), 2, tmp_path / "resumed",
                  progress=False, loggers=())
    with ParallelFamily(family, 2) as parallel:
        result = meta_train_rl(resumed, parallel, cfg, 2, tmp_path / "resumed", progress=False, loggers=())
    assert result.iterations == 2
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
