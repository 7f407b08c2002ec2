"""Per-task view of the sinusoid table: a mean over tasks hides a task whose fine-tuning diverges.

Loads the best checkpoints that ``benchmarks/sinusoid_table.py`` trained (K = 10 and K = 5) and
reports, on the same 600 fixed 5-shot test tasks (100 query points each), the median MSE after
1 / 5 / 10 steps, the number of tasks whose MSE exceeds 10 (for MAML: fine-tuning that diverged;
for the baseline: mostly large-amplitude tasks it never fits) and the mean over the rest.

    python benchmarks/sinusoid_per_task.py

Writes benchmarks/results/sinusoid_per_task.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from innerloop.training.run import build_family, load_for_eval

RUNS = {"meta-trained with K = 10": "runs/bench-sinusoid", "meta-trained with K = 5": "runs/bench-sinusoid-k5"}


def main() -> None:
    lines = ["# Sinusoid, 5-shot, per task (600 fixed test tasks, 100 query points each)", "",
             "| model | algorithm | steps | mean | median | tasks with MSE > 10 | mean over the others |",
             "|---|---|---|---|---|---|---|"]
    for label, run in RUNS.items():
        for name, sub in (("maml", ""), ("pretrain", "baseline")):
            cfg, alg = load_for_eval(Path(run) / sub / "best.pt")
            batch = build_family(cfg, 5, 100).batch("test", range(600))
            with torch.no_grad():
                mse = alg.evaluate(batch, 10)["mse"]
            for k in (1, 5, 10):
                v = mse[:, k]
                lines.append(f"| {label} | {name} | {k} | {v.mean():.3f} | {v.median():.3f} | "
                             f"{int((v > 10).sum())} | {v[v <= 10].mean():.3f} |")
    lines += ["", "Command: `python benchmarks/sinusoid_per_task.py` (after both runs of "
              "`benchmarks/sinusoid_table.py`, `--train-shots 10` and `--train-shots 5`)."]
    out = Path(__file__).parent / "results" / "sinusoid_per_task.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
