"""MAML-RL against the MAML paper (Finn et al. 2017, Sec. 5.3): 2D navigation and HalfCheetah.

Meta-trains MAML (one policy-gradient step in the inner loop, TRPO in the outer loop) and the
pre-trained baseline (the same TRPO on all tasks, no adaptation) within a stated budget of
iterations, then reports the return after 0..3 policy-gradient steps on fixed test tasks (mean
and 95% CI over tasks) beside a random initialisation and the paper's numbers:

    OMP_NUM_THREADS=1 python benchmarks/rl.py nav2d --iterations 200 --pretrain-iterations 200
    OMP_NUM_THREADS=1 python benchmarks/rl.py cheetah-vel --iterations 40 --pretrain-iterations 10 \\
        --meta-batch 20 --rollouts 10

Writes benchmarks/results/rl_<env>[_<tag>].{md,json} (and rl_nav2d_trajectories.png); the run
folder (runs/bench-rl-<env>[-<tag>]) keeps checkpoints, so the same command resumes. Variants:
``--first-order``, ``--optimizer ppo``, ``--no-pretrain``, ``--tag NAME``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from innerloop.io import atomic_write_text
from innerloop.rl.config import load_rl_config
from innerloop.rl.plots import plot_rl_run
from innerloop.rl.train import batch_text, lr_text, meta_test_lr, run_rl
from innerloop.training.run import machine
from innerloop.training.settings import cli_changes

CONFIGS = {"nav2d": "rl_nav2d.toml", "cheetah-vel": "rl_cheetah_vel.toml", "cheetah-dir": "rl_cheetah_dir.toml",
           "metaworld-ml1-reach": "rl_metaworld_ml1_reach.toml",
           "metaworld-ml1-push": "rl_metaworld_ml1_push.toml",
           "metaworld-ml1-pick-place": "rl_metaworld_ml1_pick_place.toml",
           "metaworld-ml10": "rl_metaworld_ml10.toml"}
PAPER = {  # Finn et al. 2017, average return after 0, 1, 2, 3 policy-gradient steps (as quoted in issue 7)
    "nav2d": {"MAML (paper, Table 4)": [-40.41, -11.68, -3.33, -3.23]},
    "cheetah-vel": {"MAML (paper): 0 and 3 steps": [-129.5, None, None, -60.8],
                    "oracle (paper)": [-54.5, None, None, None]},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("env", choices=list(CONFIGS))
    p.add_argument("--iterations", type=int, required=True, help="MAML meta-iterations (the budget)")
    p.add_argument("--pretrain-iterations", type=int, default=1, help="iterations of the pre-trained baseline")
    p.add_argument("--meta-batch", type=int, help="tasks per meta-iteration (default: the config's)")
    p.add_argument("--rollouts", type=int, help="episodes per task per step in training (default: the config's)")
    p.add_argument("--test-tasks", type=int, help="fixed test tasks (default: the config's, 40)")
    p.add_argument("--first-order", action="store_true", help="first-order MAML (inner gradient as a constant)")
    p.add_argument("--optimizer", choices=["trpo", "ppo"], help="outer optimiser (default: the config's, trpo)")
    p.add_argument("--no-pretrain", action="store_true", help="skip the pre-trained baseline")
    p.add_argument("--tag", help="suffix of the results files, e.g. first_order (default: none)")
    p.add_argument("--out", help="run folder (default runs/bench-rl-<env>[-<tag>])")
    p.add_argument("--config", help="the config file (default: configs/<the env's config>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="change any config field, as `innerloop rl train --set` (repeatable)")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(__file__).parent.parent
    config_path = Path(args.config) if args.config else root / "configs" / CONFIGS[args.env]
    cfg = load_rl_config(config_path)
    changes = {
        "out_dir": args.out or f"runs/bench-rl-{args.env}" + (f"-{args.tag}" if args.tag else ""),
        "algorithm.first_order": args.first_order or cfg.algorithm.first_order,
        "train.optimizer": args.optimizer or cfg.train.optimizer, "eval.pretrain": not args.no_pretrain,
        "train.iterations": args.iterations, "eval.pretrain_iterations": args.pretrain_iterations,
    }
    if args.meta_batch:
        changes["train.meta_batch_size"] = args.meta_batch
    if args.rollouts:
        changes["algorithm.rollouts"] = args.rollouts
    if args.test_tasks:
        changes["eval.test_tasks"] = args.test_tasks
    changes.update(cli_changes(cfg, args.set, "benchmarks/rl.py"))
    cfg = cfg.override(changes)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    report = run_rl(cfg, progress=sys.stderr.isatty())
    plot_rl_run(report, cfg)
    wall = time.perf_counter() - t0
    command = "OMP_NUM_THREADS=1 python " + " ".join(["benchmarks/rl.py", *sys.argv[1:]])
    runs = report["runs"]
    order = "first-order" if cfg.algorithm.first_order else "second-order"
    variant = f"{order} MAML, {cfg.train.optimizer.upper()}"
    lines = [f"# MAML-RL: {args.env} ({variant})", "", report["table"], ""]
    if args.env in PAPER:
        lines += ["The paper's numbers (return after 0, 1, 2, 3 steps; '-' where not reported):", "",
                  "| source | 0 steps | 1 step | 2 steps | 3 steps |", "|---|---|---|---|---|"]
        for name, values in PAPER[args.env].items():
            lines.append(f"| {name} | " + " | ".join("-" if v is None else str(v) for v in values) + " |")
        lines.append("")
    a, t, e = cfg.algorithm, cfg.train, cfg.eval
    budget = (f"MAML {t.iterations} meta-iterations x {t.meta_batch_size} tasks x {a.rollouts} episodes x "
              f"{a.inner_steps + 1} (pre- and post-update) x horizon {cfg.env.horizon}")
    if e.pretrain:
        budget += f"; pre-trained baseline {e.pretrain_iterations} iterations x {t.meta_batch_size} tasks x " \
                  f"{a.rollouts} episodes"
    m = machine()
    outer = (f"TRPO max KL {t.max_kl}, {t.cg_iterations} CG iterations on the KL of {t.fisher_subsample:.0%} of "
             "the meta-batch's tasks" if t.optimizer == "trpo" else
             f"PPO {t.ppo_epochs} epochs, Adam {t.ppo_lr}, clip {t.ppo_clip}")
    try:
        config_name = str(config_path.resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        config_name = str(config_path)
    lines += [
        f"Command: `{command}` (config `{config_name}`, overridden as the command says).",
        f"Budget: {budget}. {outer}, inner lr {a.inner_lr}, discount {a.discount}, policy "
        f"{cfg.policy.hidden} {cfg.policy.activation} with initial std {cfg.policy.init_std}; "
        f"test: {e.test_tasks} fixed test tasks, {batch_text(e)} per step, {lr_text(meta_test_lr(cfg))}.",
        f"Environment options: {cfg.env.options or 'the defaults'}.",
        f"Seeds: env/task seed {cfg.env.seed}, policy init seed {t.seed}.",
        "Wall time: " + ", ".join(f"{k} training {v['train_wall_s'] / 60:.1f} min + test {v['eval_wall_s']:.0f} s"
                                  for k, v in runs.items()) + f"; {wall / 60:.1f} min in all for this command.",
        f"Machine: {m['cpu']}, {m['threads']} thread(s), torch {m['torch']}, Python {m['python']} "
        f"({os.cpu_count()} cores shared with other jobs; load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end).",
    ]
    md = "\n".join(lines) + "\n"
    stem = Path(__file__).parent / "results" / (f"rl_{args.env.replace('-', '_')}" + (f"_{args.tag}" if args.tag
                                                                                     else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(f"{stem}.md"), md)  # not with_suffix: a tag such as lr0.1 holds a dot
    atomic_write_text(Path(f"{stem}.json"), json.dumps({**report, "command": command, "wall_s": wall,
                                                     "paper": PAPER.get(args.env)}, indent=2))
    for figure in ("trajectories", "curve", "success"):
        if (Path(cfg.out_dir) / f"{figure}.png").exists():
            shutil.copy(Path(cfg.out_dir) / f"{figure}.png", str(stem) + f"_{figure}.png")
    print(md)


if __name__ == "__main__":
    main()
