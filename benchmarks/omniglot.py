"""Omniglot few-shot classification: MAML and Prototypical Networks on the standard protocol.

Run one configured row within a budget, then collect every finished row into one table and an
accuracy-vs-wall-clock plot:

    python benchmarks/omniglot.py run configs/omniglot_maml_5w1s.toml --iterations 1000 --threads 1
    python benchmarks/omniglot.py report

``run`` meta-trains with the config (keeping the best-on-validation checkpoint), meta-tests on 600
fixed test tasks and writes benchmarks/results/omniglot/<config>.json; ``report`` writes
benchmarks/results/omniglot.md and omniglot_accuracy_vs_time.png. Data: ``$INNERLOOP_DATA``
(``../shared/data`` in CI) or the config's ``task.data_root``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from innerloop.plotting import plot_run
from innerloop.training.config import load_config
from innerloop.training.run import machine, run

RESULTS = Path(__file__).parent / "results"
PAPER = {  # accuracy %, Finn et al. 2017 Table 1 and Snell et al. 2017 Table 1
    ("maml", 5, 1): "98.7 ± 0.4", ("maml", 5, 5): "99.9 ± 0.1",
    ("maml", 20, 1): "95.8 ± 0.3", ("maml", 20, 5): "98.9 ± 0.2",
    ("protonet", 5, 1): "98.8", ("protonet", 5, 5): "99.7",
    ("protonet", 20, 1): "96.0", ("protonet", 20, 5): "98.9",
}
PAPER_ITERATIONS = {
    "maml": "60,000 × 32 (5-way)",
    "protonet": "many thousands of 60-way episodes (lr halved every 2000)",
}


def cmd_run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    name = Path(args.config).stem
    changes: dict[str, object] = {"out_dir": str(Path(args.runs) / name)}
    if args.iterations:
        changes["train.iterations"] = args.iterations
    if args.validate_every:
        changes["train.validate_every"] = args.validate_every
    cfg = load_config(args.config).override(changes)
    t0 = time.perf_counter()
    report = run(cfg, progress=sys.stderr.isatty())
    plot_run(report, cfg)
    r = report["runs"][cfg.algorithm.name]
    curve = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    out = {
        "config": str(args.config), "algorithm": cfg.algorithm.name, "ways": cfg.eval.ways or cfg.task.ways,
        "shots": cfg.eval.shots or cfg.task.shots, "train_ways": cfg.task.train_ways or cfg.task.ways,
        "iterations": cfg.train.iterations, "meta_batch_size": cfg.train.meta_batch_size,
        "best_step": r["best_step"], "train_wall_s": r["train_wall_s"], "total_wall_s": time.perf_counter() - t0,
        "test": r["test"], "table": report["table"], "batchnorm": cfg.model.norm, "pool": cfg.model.pool,
        "curve": [{"step": c["step"], "wall_s": c["wall_s"], "val": c["val_accuracy"]}
                  for c in curve if "val_accuracy" in c],
        "command": f"python benchmarks/omniglot.py run {args.config} --iterations {cfg.train.iterations} "
                   f"--validate-every {cfg.train.validate_every} --threads {torch.get_num_threads()}",
        "machine": machine(), "task_seed": cfg.task.seed, "init_seed": cfg.train.seed,
    }
    dest = RESULTS / "omniglot" / f"{name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(report["table"])


def cmd_report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(p.read_text()) for p in sorted((RESULTS / "omniglot").glob("*.json"))]
    if not rows:
        raise SystemExit("no results yet: run `python benchmarks/omniglot.py run CONFIG` first.")
    rows.sort(key=lambda r: (r["algorithm"], r["ways"], r["shots"]))
    lines = [
        "# Omniglot few-shot classification (Vinyals split, 600 fixed test tasks, 15 queries per class)",
        "",
        "| algorithm | task | test accuracy % (95% CI) | paper % | budget: iterations × tasks | paper budget "
        "| train wall time | BatchNorm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        last = r["test"]["per_step"][-1]
        steps = len(r["test"]["per_step"]) - 1
        acc = f"{100 * last['mean']:.2f} ± {100 * last['ci95']:.2f}" + (f" (after {steps} steps)" if steps else "")
        lines.append(
            f"| {r['algorithm']} | {r['ways']}-way {r['shots']}-shot | {acc} | "
            f"{PAPER[(r['algorithm'], r['ways'], r['shots'])]} | {r['iterations']} × {r['meta_batch_size']} "
            f"({r['train_ways']}-way) | {PAPER_ITERATIONS[r['algorithm']]} | {r['train_wall_s'] / 60:.0f} min "
            f"| {'batch statistics (transductive)' if r['batchnorm'] == 'batch' else 'none'} |"
        )
    lines += ["", "Commands (task seed 0, init seed 0, CPU, torch "
              f"{rows[0]['machine']['torch']}):", ""]
    lines += [f"- `{r['command']}` (best validation step {r['best_step']})" for r in rows]
    (RESULTS / "omniglot.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        xs = [c["wall_s"] / 60 for c in r["curve"]]
        ax.plot(xs, [100 * c["val"] for c in r["curve"]], marker="o", ms=3,
                label=f"{r['algorithm']} {r['ways']}w{r['shots']}s")
    ax.set_xlabel("wall-clock minutes of meta-training")
    ax.set_ylabel("validation accuracy % (200 fixed tasks)")
    ax.set_title("Omniglot: accuracy vs wall-clock on this machine", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(RESULTS / "omniglot_accuracy_vs_time.png", dpi=110, bbox_inches="tight")
    print((RESULTS / "omniglot.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("config")
    r.add_argument("--iterations", type=int)
    r.add_argument("--validate-every", type=int)
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--runs", default="runs/bench-omniglot")
    sub.add_parser("report")
    args = p.parse_args()
    {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
