"""Environment steps per second of the meta-RL sampler on HalfCheetah goal velocity, and the share of
a MAML-TRPO meta-iteration spent sampling.

    OMP_NUM_THREADS=1 python benchmarks/rl_sampler.py            # the full size (run on an idle machine)
    OMP_NUM_THREADS=1 python benchmarks/rl_sampler.py --tasks 2 --rollouts 2 --horizon 20 --repeats 1 \\
        --meta-batch 2 --meta-rollouts 2 --out /tmp/sampler    # a smoke test of a few seconds

One rollout is ``--tasks`` x ``--rollouts`` episodes of ``--horizon`` steps (``innerloop.rl.episodes.rollout``,
the policy evaluated once per step on all copies in the main process) with a fixed policy (the
``configs/rl_cheetah_vel.toml`` one, seeded) and fixed noise. Timed, interleaved round by round so that
the ratios hold under a changing load, the median of ``--repeats`` rollouts each of:

* ``fresh, in process``: the sampler before simulator reuse, new ``HalfCheetahEnv()`` simulators for
  every rollout (``reuse_simulators=False``);
* ``reuse, in process``: the family's simulator pool (``execution.workers = 0``);
* ``N workers``: ``ParallelFamily(family, N)`` for N = 1 .. ``--max-workers`` (default: the machine's
  core count), pools started before the timing (their start-up is reported apart); each configuration
  gets one untimed rollout first (the pools build their simulators).

Every configuration's episodes are checked to equal the first's bit for bit. Then one MAML-TRPO
meta-iteration (``--meta-batch`` tasks x ``--meta-rollouts`` episodes, the config's policy, inner step
and TRPO settings) is timed in process and with the fastest worker count: sampling (rollouts and inner
steps, ``PolicyMAML.sample``) against the outer TRPO update, from the same initial policy.

Writes ``rl_sampler.md`` and ``rl_sampler.json`` into ``--out`` (default ``benchmarks/results``), with
the machine, threads, load average before and after, and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from innerloop.io import atomic_write_text
from innerloop.rl.config import load_rl_config
from innerloop.rl.envs import EnvFamily
from innerloop.rl.episodes import Episodes, rollout, rollout_noise
from innerloop.rl.families import make_env_family
from innerloop.rl.maml import PolicyMAML
from innerloop.rl.train import build_algorithm, build_policy
from innerloop.rl.workers import ParallelFamily
from innerloop.training.evaluate import machine

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "rl_cheetah_vel.toml"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def same(a: Episodes, b: Episodes) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("obs", "actions", "rewards", "mask"))


def iteration(algorithm: PolicyMAML, family: EnvFamily, state: dict[str, torch.Tensor], tasks: int, rollouts: int,
              settings: Any) -> dict[str, float]:
    """One meta-iteration from the policy ``state``: seconds sampling and updating."""
    algorithm.load_state_dict(state)
    sample_s, batch = timed(lambda: algorithm.sample(family, "train", range(tasks), rollouts))
    update_s, _ = timed(lambda: algorithm.outer_step(batch, None, settings))
    return {"sample_s": sample_s, "update_s": update_s, "sample_share": sample_s / (sample_s + update_s)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=10, help="tasks per timed rollout (default 10)")
    p.add_argument("--rollouts", type=int, default=20, help="episodes per task (default 20)")
    p.add_argument("--horizon", type=int, default=200, help="steps per episode (default 200, the paper's)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rollouts per configuration (the median; default 5)")
    p.add_argument("--max-workers", type=int, default=os.cpu_count() or 1,
                   help="worker counts 1..this (default: the machine's core count)")
    p.add_argument("--meta-batch", type=int, default=20, help="tasks of the timed meta-iteration (default 20)")
    p.add_argument("--meta-rollouts", type=int, default=20, help="episodes per task in it (default 20)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder of the results files")
    args = p.parse_args()
    for key in ("tasks", "rollouts", "horizon", "repeats", "max_workers", "meta_batch", "meta_rollouts"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    cfg = load_rl_config(CONFIG).override({"env.horizon": args.horizon})
    reuse = make_env_family("cheetah-vel", seed=cfg.env.seed, horizon=args.horizon)
    fresh = make_env_family("cheetah-vel", seed=cfg.env.seed, horizon=args.horizon, reuse_simulators=False)
    policy = build_policy(cfg, reuse)
    params = {k: v.detach() for k, v in policy.named_parameters()}
    indices = list(range(args.tasks))
    tasks = reuse.tasks("train", indices)
    noise = rollout_noise(reuse.seed, "train", indices, "bench", args.rollouts, args.horizon, reuse.act_dim)
    steps = args.tasks * args.rollouts * args.horizon

    families: dict[str, EnvFamily] = {"fresh, in process": fresh, "reuse, in process": reuse}
    start_s: dict[str, float] = {}
    pools: list[ParallelFamily] = []
    try:
        for w in range(1, args.max_workers + 1):
            seconds, pool = timed(lambda w=w: ParallelFamily(reuse, w))
            pools.append(pool)
            families[f"{w} worker{'s' * (w > 1)}"] = pool
            start_s[f"{w} worker{'s' * (w > 1)}"] = seconds
        reference = rollout(fresh, policy, params, tasks, noise)
        identical = {}
        for name, family in families.items():  # untimed: the pools build their simulators
            identical[name] = same(rollout(family, policy, params, tasks, noise), reference)
        times: dict[str, list[float]] = {name: [] for name in families}
        for _ in range(args.repeats):  # interleaved: each round times every configuration once
            for name, family in families.items():
                seconds, episodes = timed(lambda f=family: rollout(f, policy, params, tasks, noise))
                times[name].append(seconds)
                identical[name] = identical[name] and same(episodes, reference)
        median = {name: statistics.median(ts) for name, ts in times.items()}
        base = median["fresh, in process"]
        best = min((n for n in families if n.endswith(("worker", "workers"))), key=lambda n: median[n])

        algorithm = build_algorithm(cfg, reuse)
        state = {k: v.clone() for k, v in algorithm.state_dict().items()}
        settings = cfg.train
        iteration(algorithm, reuse, state, 1, 2, settings)  # untimed: torch.func's first calls
        iterations = {
            "reuse, in process": iteration(algorithm, reuse, state, args.meta_batch, args.meta_rollouts, settings),
            best: iteration(algorithm, families[best], state, args.meta_batch, args.meta_rollouts, settings),
        }
    finally:
        for pool in pools:
            pool.close()
    load_after = os.getloadavg()

    command = "OMP_NUM_THREADS=1 python " + " ".join(["benchmarks/rl_sampler.py", *sys.argv[1:]])
    rows = [{"sampler": name, "median_s": median[name], "steps_per_s": steps / median[name],
             "ratio_to_fresh": base / median[name], "start_s": start_s.get(name), "times_s": times[name],
             "identical_episodes": identical[name]} for name in families]
    report = {
        "command": command, "machine": machine(), "cpu_count": os.cpu_count(),
        "main_threads": torch.get_num_threads(),
        "worker_threads": 1, "load_before": load_before, "load_after": load_after,
        "rollout": {"tasks": args.tasks, "rollouts": args.rollouts, "horizon": args.horizon, "env_steps": steps,
                    "repeats": args.repeats, "policy_hidden": cfg.policy.hidden},
        "samplers": rows, "best_workers": best,
        "meta_iteration": {"tasks": args.meta_batch, "rollouts": args.meta_rollouts,
                           "inner_steps": cfg.algorithm.inner_steps,
                           "fisher_subsample": cfg.train.fisher_subsample,
                           "by_sampler": iterations},
    }
    lines = [
        "# Meta-RL sampler: HalfCheetah goal velocity, environment steps per second", "",
        f"One rollout: {args.tasks} tasks x {args.rollouts} episodes x {args.horizon} steps = {steps:,} "
        f"environment steps, policy MLP {cfg.policy.hidden} evaluated once per step on all copies in the main "
        f"process; median of {args.repeats} rollouts per sampler, interleaved. Ratios against the "
        "fresh-simulator sampler of the same run.",
        "",
        "| sampler | median s per rollout | env steps / s | vs fresh, in process | pool start-up s "
        "| episodes identical |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        start = "-" if r["start_s"] is None else f"{r['start_s']:.2f}"
        lines.append(f"| {r['sampler']} | {r['median_s']:.3f} | {r['steps_per_s']:,.0f} | "
                     f"{r['ratio_to_fresh']:.2f}x | "
                     f"{start} | {'yes' if r['identical_episodes'] else 'NO'} |")
    lines += ["", f"One MAML-TRPO meta-iteration ({args.meta_batch} tasks x {args.meta_rollouts} episodes, "
              f"{cfg.algorithm.inner_steps} inner step, TRPO with Fisher subsample {cfg.train.fisher_subsample}; "
              "sampling = rollouts and inner steps, update = the outer TRPO step):", "",
              "| sampler | sampling s | update s | share sampling |", "|---|---|---|---|"]
    for name, it in iterations.items():
        lines.append(f"| {name} | {it['sample_s']:.2f} | {it['update_s']:.2f} | {100 * it['sample_share']:.0f}% |")
    m = report["machine"]
    before, after = (", ".join(f"{x:.2f}" for x in load) for load in (load_before, load_after))
    lines += ["", f"Machine: {m['cpu']}, {os.cpu_count()} cores, Python {m['python']}, torch {m['torch']}; "
              "1 torch "
              f"thread in the main process and in each worker; load average (1, 5, 15 min) "
              f"{before} before, {after} after.",
              "", f"Command: `{command}`", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "rl_sampler.md", "\n".join(lines))
    atomic_write_text(args.out / "rl_sampler.json", json.dumps(report, indent=1) + "\n")
    print("\n".join(lines))
    if not all(identical.values()):
        sys.exit("the samplers' episodes differ: see the table")


if __name__ == "__main__":
    main()
