"""Hyperparameter optimisation by hypergradient: learn MAML's inner learning rates.

The inner learning rate is a hyperparameter of adaptation. innerloop makes it a
meta-parameter: the meta-gradient flows into it exactly as into the initial weights, so the
outer optimiser tunes it on the query loss (Li et al. 2017, Meta-SGD, learn one rate per
element; one rate per tensor or one for all are the cheaper variants). This script starts every
variant from a deliberately poor rate (0.001) and compares, on the same 600 fixed test tasks, with
plain MAML at that rate and at the paper's hand-tuned 0.01.

    python examples/learned_inner_lr.py [--iterations 4000] [--test-tasks 600] [--out FILE]

Writes benchmarks/results/learned_inner_lr.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from innerloop import MAML, make_family, meta_test, meta_train
from innerloop.io import atomic_write_text
from innerloop.models import MLP
from innerloop.training import Config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=4000)
    p.add_argument("--test-tasks", type=int, default=600, help="fixed test tasks every variant is scored on")
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "benchmarks/results/learned_inner_lr.md"))
    args = p.parse_args()

    train_tasks = make_family("sinusoid", shots=10, queries=10, seed=0)
    test_tasks = make_family("sinusoid", shots=10, queries=100, seed=0)
    cfg = dataclasses.replace(Config().train, iterations=args.iterations, validate_every=args.iterations)
    variants = {  # name: (initial inner lr, lr_mode)
        "fixed lr 0.001": (0.001, "fixed"),
        "fixed lr 0.01 (hand-tuned, paper)": (0.01, "fixed"),
        "learned scalar, from 0.001": (0.001, "scalar"),
        "learned per tensor, from 0.001": (0.001, "per_tensor"),
        "learned per element (Meta-SGD), from 0.001": (0.001, "per_element"),
    }
    rows = [f"| inner learning rate | 10-shot MSE after 1 step ({args.test_tasks} test tasks, 95% CI) "
            "| learned rates | time |",
            "|---|---|---|---|"]
    for name, (lr, mode) in variants.items():
        torch.manual_seed(0)
        maml = MAML(MLP(1, 1, (40, 40)), "regression", inner_lr=lr, inner_steps=1, lr_mode=mode)
        t0 = time.perf_counter()
        meta_train(maml, train_tasks, cfg, progress=False)
        wall = time.perf_counter() - t0
        res = meta_test(maml, test_tasks, "test", tasks=args.test_tasks, steps=1)
        rates = {k.replace("__", "."): v.detach() for k, v in maml.inner_lr.rates.items()}
        shown = ", ".join(f"{k}: {v.mean():.4f}" + ("" if v.numel() == 1 else " (mean)")
                          for k, v in rates.items()) or "-"
        rows.append(f"| {name} | {res.per_step[1]} | {shown} | {wall:.0f} s |")
        print(rows[-1], flush=True)
    text = (
        "# Learned inner learning rates (hypergradient) vs fixed ones\n\n"
        + "\n".join(rows)
        + f"\n\nCommand: `python examples/learned_inner_lr.py {' '.join(sys.argv[1:])}`; MAML, MLP "
        "1-40-40-1, sinusoid K=10, one inner step, meta-batch 25, Adam 1e-3, task seed 0, init seed 0; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU.\n"
    )
    atomic_write_text(args.out, text)  # never a half-written results file
    print(text)


if __name__ == "__main__":
    main()
