"""Measure the two ways to run a meta-batch: ``vmap`` over tasks vs a per-task loop.

``GradientBased(vectorize="auto")`` picks vmap for models without convolutions or normalisation
layers and the loop otherwise; this script is the measurement behind that rule. Both paths are
timed interleaved in one process (runs on this machine vary by 10-20%), medians over the
repeats after a warm-up, and their meta-gradients compared.

    python benchmarks/vectorize.py [--repeats 20]

Writes benchmarks/results/vectorize.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from innerloop.algorithms import MAML
from innerloop.data import make_family
from innerloop.models import MLP
from innerloop.tasks import TaskBatch


def conv_net(ways: int) -> nn.Module:
    """A conv-4 (64 filters, 3x3, ReLU, 2x2 max-pool) on 1x28x28 images, without BatchNorm."""
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(1 if i == 0 else 64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways))


def image_batch(tasks: int, ways: int, shots: int, queries: int) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return TaskBatch(
        torch.rand(tasks, ways * shots, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone(),
        torch.rand(tasks, ways * queries, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone(),
    )


def time_case(make, batch, repeats: int) -> dict[str, float]:
    algs = {v: make(v) for v in ("vmap", "loop")}
    for alg in algs.values():  # warm-up
        alg.meta_gradient(batch)
    times: dict[str, list[float]] = {v: [] for v in algs}
    for _ in range(repeats):
        for v, alg in algs.items():
            t0 = time.perf_counter()
            alg.meta_gradient(batch)
            times[v].append(time.perf_counter() - t0)
    ga, _ = algs["vmap"].meta_gradient(batch)
    gb, _ = algs["loop"].meta_gradient(batch)
    err = max(float((ga[k] - gb[k]).norm() / gb[k].norm().clamp_min(1e-30)) for k in ga)
    return {**{v: statistics.median(t) for v, t in times.items()}, "rel_err": err}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "vectorize.md"))
    args = p.parse_args()
    load = os.getloadavg()[0]
    sinusoid = make_family("sinusoid", shots=10, queries=10).batch("train", range(25))

    def mlp(v: str, first_order: bool = False) -> MAML:
        torch.manual_seed(0)
        return MAML(MLP(1, 1, (40, 40)), "regression", 0.01, 1, first_order, vectorize=v)

    def conv(v: str, first_order: bool = False) -> MAML:
        torch.manual_seed(0)
        return MAML(conv_net(5), "classification", 0.4, 1, first_order, vectorize=v)

    cases = {
        "sinusoid MLP 1-40-40-1, meta-batch 25, 1 step, 2nd order": (mlp, sinusoid, args.repeats),
        "sinusoid MLP, 1st order": (lambda v: mlp(v, True), sinusoid, args.repeats),
        "conv-4 (no BN) 5-way 1-shot 15 queries, meta-batch 4, 1 step, 2nd order":
            (conv, image_batch(4, 5, 1, 15), max(3, args.repeats // 4)),
    }
    rows = ["| case | vmap (ms) | loop (ms) | loop / vmap | rel. diff of meta-gradients |",
            "|---|---|---|---|---|"]
    for name, (make, batch, repeats) in cases.items():
        r = time_case(make, batch, repeats)
        rows.append(f"| {name} | {r['vmap'] * 1e3:.1f} | {r['loop'] * 1e3:.1f} | {r['loop'] / r['vmap']:.2f} "
                    f"| {r['rel_err']:.1e} |")
        print(rows[-1], flush=True)
    text = ("# vmap over tasks vs a per-task loop (MAML meta-gradient, medians)\n\n" + "\n".join(rows)
            + f"\n\nCommand: `python benchmarks/vectorize.py --repeats {args.repeats}`; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; float32, seed 0; machine load "
            f"average {load:.1f} on {os.cpu_count()} cores while it ran (absolute times are inflated by other "
            "jobs; the two paths are interleaved, so their ratio holds).\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
