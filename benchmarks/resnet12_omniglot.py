"""Omniglot (Vinyals split, 28x28, ``$INNERLOOP_DATA``) with ResNet-12: ProtoNets and MetaOptNet rows
within a wall-clock budget, resumable.

    python benchmarks/resnet12_omniglot.py --algorithm protonet --shots 1 --minutes 120
    python benchmarks/resnet12_omniglot.py --algorithm metaoptnet --shots 5 --minutes 120   # or r2d2

Each row is the config ``configs/omniglot_resnet12_<algorithm>_5w<shots>s.toml``. Meta-training runs
in chunks of ``train.validate_every`` iterations until ``--minutes`` of this invocation have passed or
``train.iterations`` are done; a later invocation resumes from the run's ``last.pt`` (the same config
and seeds: the same run). The best-on-validation checkpoint is then meta-tested on ``--test-tasks``
fixed test tasks (600 for the table): mean accuracy and 95% confidence interval.
Writes ``benchmarks/results/resnet12_omniglot.{md,json}`` (every finished row, with its command,
seeds, budget, wall time and machine load).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from innerloop.io import atomic_write_text
from innerloop.training.checkpoint import load_checkpoint
from innerloop.training.config import load_config
from innerloop.training.evaluate import meta_test
from innerloop.training.loop import meta_train
from innerloop.training.run import build_algorithm, build_family, identity, machine

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
ALGORITHMS = ("protonet", "metaoptnet", "r2d2")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", choices=ALGORITHMS, default="protonet")
    p.add_argument("--shots", type=int, choices=(1, 5), default=1)
    p.add_argument("--minutes", type=float, required=True, help="meta-training budget of this invocation")
    p.add_argument("--iterations", type=int, default=None, help="most training iterations (config's default)")
    p.add_argument("--validate-every", type=int, default=None, help="override train.validate_every (a chunk)")
    p.add_argument("--val-tasks", type=int, default=None, help="override train.val_tasks")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the run folders go")
    p.add_argument("--out", type=Path, default=RESULTS / "resnet12_omniglot", help="results path (no suffix)")
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = f"omniglot_resnet12_{args.algorithm}_5w{args.shots}s"
    config = ROOT / "configs" / f"{name}.toml"
    changes: dict[str, Any] = {"out_dir": str(args.runs / name), "eval.test_tasks": args.test_tasks}
    if args.iterations:
        changes["train.iterations"] = args.iterations
    if args.validate_every:
        changes["train.validate_every"] = args.validate_every
    if args.val_tasks:
        changes["train.val_tasks"] = args.val_tasks
    cfg = load_config(config).override(changes)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    family = build_family(cfg, ways=cfg.task.train_ways)
    val_family = build_family(cfg, ways=cfg.eval.ways)
    test_family = build_family(cfg, cfg.eval.shots, cfg.eval.queries, cfg.eval.ways)
    algorithm = build_algorithm(cfg, family)
    ident = identity(cfg, cfg.algorithm.name)
    load_start = os.getloadavg()
    started = time.perf_counter()
    deadline = started + args.minutes * 60
    last = run_dir / "last.pt"
    done = int(load_checkpoint(last)["step"]) if last.exists() else 0
    first_step, result = done, None
    chunk = cfg.train.validate_every
    while done < cfg.train.iterations and time.perf_counter() < deadline:
        target = min(cfg.train.iterations, (done // chunk + 1) * chunk)
        result = meta_train(algorithm, family, dataclasses.replace(cfg.train, iterations=target), run_dir,
                            identity=ident, val_steps=algorithm.validation_steps, resume=True, progress=False,
                            desc=name, val_family=val_family)
        done = result.steps
        print(f"{name}: {done} iterations, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - started
    best = load_checkpoint(run_dir / "best.pt")
    algorithm.load_state_dict(best["state"])
    t0 = time.perf_counter()
    test = meta_test(algorithm, test_family, "test", args.test_tasks, steps=cfg.eval.steps, progress=False)
    final = test.per_step[-1]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    row = {
        "config": str(config.relative_to(ROOT)), "algorithm": cfg.algorithm.name, "ways": cfg.eval.ways,
        "shots": cfg.eval.shots, "iterations": done, "best_step": int(best["step"]),
        "accuracy": final.mean, "ci95": final.ci95, "test_tasks": args.test_tasks,
        "train_wall_s_total": result.wall_time_s if result else None,
        "this_invocation": {"minutes_budget": args.minutes, "iterations": done - first_step, "train_s": train_s,
                            "s_per_iteration": train_s / (done - first_step) if done > first_step else None,
                            "test_s": time.perf_counter() - t0},
        "load_1_5_15min_at_start": load_start, "load_1_5_15min_at_end": os.getloadavg(),
        "task_seed": cfg.task.seed, "init_seed": cfg.train.seed, "threads": torch.get_num_threads(),
        "command": "python benchmarks/resnet12_omniglot.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "steps_logged": len(metrics),
    }
    out_json = args.out.with_suffix(".json")
    rows = json.loads(out_json.read_text())["rows"] if out_json.exists() else {}
    rows[name] = row
    atomic_write_text(out_json, json.dumps({"rows": rows}, indent=2, default=str) + "\n")
    lines = [
        "# Omniglot with ResNet-12 (64-160-320-640, average pool), Vinyals split, 28x28",
        "",
        "Each row: `benchmarks/resnet12_omniglot.py` (command below) trains within its budget and resumes from "
        "its checkpoint; the best-on-validation checkpoint is tested on fixed test tasks (mean accuracy, 95% "
        "confidence interval). BatchNorm with batch statistics over the episode.",
        "",
        "| algorithm | task | test accuracy % (95% CI) | test tasks | iterations (best) | s / iteration | "
        "1-min load at start | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        inv = r["this_invocation"]
        spi = f"{inv['s_per_iteration']:.2f}" if inv["s_per_iteration"] else "-"
        lines.append(f"| {r['algorithm']} | {r['ways']}-way {r['shots']}-shot | {100 * r['accuracy']:.2f} ± "
                     f"{100 * r['ci95']:.2f} | {r['test_tasks']} | {r['iterations']} ({r['best_step']}) | {spi} | "
                     f"{r['load_1_5_15min_at_start'][0]:.2f} | `{r['command']}` |")
    lines += ["", "Seeds: task seed and initialisation seed per row in the json (`task_seed`, `init_seed`), "
              "with the machine, threads and wall times."]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
