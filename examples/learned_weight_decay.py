"""Hyperparameter optimisation by hypergradient: learn MAML's inner weight decay, next to a grid search.

Each inner step of MAML can carry a weight decay ``wd``: ``p - lr * (g + wd * p)``. The decay is a
hyperparameter of adaptation; with ``wd_mode`` it is a meta-parameter that the outer optimiser
tunes with the exact hypergradient ``dL_query / d wd``, during the one meta-training run. The
classic alternative is a grid search: one meta-training run per value, the value chosen on the
validation tasks. This script does both on noisy few-shot linear regression (few points, many
inner steps, so adaptation overfits and shrinking helps) and scores everything on the same 600
fixed test tasks.

    python examples/learned_weight_decay.py [--iterations 2000] [--grid 0 0.1 0.3 1 3]

Writes benchmarks/results/learned_weight_decay.md (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from innerloop import MAML, LinearRegression, TrainConfig, meta_test, meta_train
from innerloop.io import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--grid", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0, 3.0])
    p.add_argument("--dim", type=int, default=5)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "benchmarks/results/learned_weight_decay.md"))
    args = p.parse_args()

    def family(queries: int) -> LinearRegression:
        return LinearRegression(shots=args.shots, queries=queries, dim=args.dim, noise_std=args.noise, seed=0)

    train_tasks, eval_tasks = family(10), family(50)
    cfg = TrainConfig(iterations=args.iterations, meta_batch_size=25, outer_lr=1e-2,
                      validate_every=args.iterations, val_tasks=200, log_every=max(1, args.iterations // 10))

    def run(weight_decay: float, mode: str) -> tuple[MAML, float, float, float]:
        torch.manual_seed(0)
        maml = MAML(nn.Linear(args.dim, 1), "regression", inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                    weight_decay=weight_decay, wd_mode=mode)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        meta_train(maml, train_tasks, cfg, progress=False)
        wall = time.perf_counter() - t0
        k = args.inner_steps
        val = meta_test(maml, eval_tasks, "val", tasks=args.test_tasks, steps=k).per_step[k].mean
        test = meta_test(maml, eval_tasks, "test", tasks=args.test_tasks, steps=k)
        return maml, val, test, wall  # type: ignore[return-value]

    k = args.inner_steps
    rows = [f"| inner weight decay | val MSE after {k} steps | test MSE after {k} steps "
            f"({args.test_tasks} tasks, 95% CI) | learned value | time |", "|---|---|---|---|---|"]
    grid = []
    total_grid_time = 0.0
    for wd in args.grid:
        _, val, test, wall = run(wd, "fixed")
        grid.append((val, wd, test))
        total_grid_time += wall
        rows.append(f"| grid: fixed {wd:g} | {val:.4f} | {test.per_step[k]} | - | {wall:.0f} s |")
        print(rows[-1], flush=True)
    best_val, best_wd, best_test = min(grid)
    rows.append(f"| **grid search** (best on val: {best_wd:g}; {len(grid)} runs) | {best_val:.4f} | "
                f"{best_test.per_step[k]} | - | {total_grid_time:.0f} s |")
    for mode in ("scalar", "per_tensor"):
        maml, val, test, wall = run(0.0, mode)
        rates = maml.inner_wd.rates.items()
        learned = ", ".join(f"{n.replace('__', '.')}: {float(v.detach()):.4f}" for n, v in rates)
        rows.append(f"| **learned {mode.replace('_', ' ')}, from 0** (1 run) | {val:.4f} | {test.per_step[k]} | "
                    f"{learned} | {wall:.0f} s |")
        print(rows[-1], flush=True)
    text = (
        "# Learned inner weight decay (hypergradient) vs a grid search\n\n"
        + "\n".join(rows)
        + f"\n\nCommand: `python examples/learned_weight_decay.py {' '.join(sys.argv[1:])}`; MAML on "
        f"`LinearRegression(dim={args.dim}, shots={args.shots}, noise_std={args.noise})`, linear model, "
        f"{k} inner steps of {args.inner_lr}, second order, meta-batch 25, Adam 1e-2, task seed 0, init seed 0; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU.\n"
    )
    atomic_write_text(args.out, text)  # never a half-written results file
    print(text)


if __name__ == "__main__":
    main()
