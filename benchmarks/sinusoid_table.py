"""Reproduce the sinusoid table of the MAML paper (Finn et al. 2017, App. C, Table 2).

Set-up as in the paper: MLP 1-40-40-1 (ReLU), K = 10 support and 10 query points in
meta-training, one inner step with lr 0.01, meta-batch 25, Adam 1e-3, 70,000 iterations. The
pre-trained baseline sees the same tasks pooled for the same number of iterations and is
fine-tuned with the same inner rule. Both are tested on the same 600 fixed test tasks with 100
query points each, after 0..10 steps, with K = 5 and K = 10 support points.

    python benchmarks/sinusoid_table.py [--iterations N] [--out runs/bench-sinusoid]

Writes benchmarks/results/sinusoid_table.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from innerloop.plotting import plot_run
from innerloop.training.config import Config
from innerloop.training.evaluate import meta_test
from innerloop.training.run import build_family, format_table, machine, run

PAPER = {  # Finn et al. 2017, App. C: 5-shot MSE after 1 / 5 / 10 steps
    "maml": {1: 0.67, 5: 0.38, 10: 0.35},
    "pretrain": {1: 2.41, 5: 2.23, 10: 2.19},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=70000)
    p.add_argument("--train-shots", type=int, default=10,
                   help="K in meta-training (the paper's Figure 2 trains one model per K: 5 and 10)")
    p.add_argument("--out", help="run folder (default runs/bench-sinusoid, or runs/bench-sinusoid-k5)")
    p.add_argument("--results", help="results path without suffix (default benchmarks/results/sinusoid_table"
                   "[_k5])")
    args = p.parse_args()
    suffix = "" if args.train_shots == 10 else f"_k{args.train_shots}"
    args.out = args.out or "runs/bench-sinusoid" + suffix.replace("_", "-")
    args.results = args.results or str(Path(__file__).parent / "results" / f"sinusoid_table{suffix}")

    cfg = Config().override({"task.shots": args.train_shots, "task.queries": args.train_shots, "out_dir": args.out,
                             "train.iterations": args.iterations, "train.validate_every": 2000, "eval.shots": 5,
                             "eval.queries": 100, "eval.steps": 10})
    t0 = time.perf_counter()
    report = run(cfg, progress=sys.stderr.isatty())
    plot_run(report, cfg)
    from innerloop.training.run import load_for_eval

    tables, numbers = [report["table"]], {"5": {k: v["test"] for k, v in report["runs"].items()}}
    numbers["10"] = {}
    rows = {}
    for name, sub in (("maml", ""), ("pretrain", "baseline")):
        _, alg = load_for_eval(Path(args.out) / sub / "best.pt")
        rows[name] = meta_test(alg, build_family(cfg, 10, 100), "test", 600, 10)
        numbers["10"][name] = rows[name].to_dict()
    title = "sinusoid: 10-shot mse on 600 fixed test tasks (mean ± 95% CI)"
    tables.append(format_table(rows, [0, 1, 5, 10], title))
    paper = "\n".join(
        ["MAML paper, App. C (5-shot): | algorithm | 1 step | 5 steps | 10 steps |", "|---|---|---|---|"]
        + [f"| {k} (paper) | {v[1]} | {v[5]} | {v[10]} |" for k, v in PAPER.items()]
    )
    wall = time.perf_counter() - t0
    meta = (f"Command: `python benchmarks/sinusoid_table.py --iterations {args.iterations} "
            f"--train-shots {args.train_shots}`; meta-trained with K = {args.train_shots} support and "
            f"{args.train_shots} query points; "
            f"task seed {cfg.task.seed}, init seed {cfg.train.seed}; {args.iterations} meta-iterations "
            f"each for MAML and the baseline (best-on-validation checkpoint, validated every "
            f"{cfg.train.validate_every}); wall time {wall / 60:.1f} min in total on "
            f"{machine()['cpu']} ({torch.get_num_threads()} threads), torch {torch.__version__}.")
    md = "\n\n".join([*tables, paper, meta]) + "\n"
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({
        "paper_5shot": PAPER, "results": numbers, "iterations": args.iterations, "train_shots": args.train_shots,
        "train_wall_s": {k: v["train_wall_s"] for k, v in report["runs"].items()},
        "best_step": {k: v["best_step"] for k, v in report["runs"].items()},
        "total_wall_s": wall, "machine": machine(), "config": report["config"],
    }, indent=2))
    print(md)


if __name__ == "__main__":
    main()
