"""The cost of one Omniglot 20-way 1-shot episode at 28, 56, 84 and 105 pixels (ProtoNets, conv-4).

For each image side and conv-4 width (``--filters``), one ProtoNets meta-gradient (forward and backward
of a 20-way 1-shot episode with ``--queries`` queries per class, the embedding of support and query in
one pass) is timed ``--reps`` times after two warm-ups, and the median reported; beside it the cost of
augmenting that episode with Koch et al.'s affine distortions (:data:`innerloop.data.augment.KOCH`),
the embedding size (conv-4's flattened output: 1x1, 3x3, 5x5 and 6x6 maps after four 2x2 max-pools)
and the parameter count. The inputs are random binary images of the right shape: the cost of a conv
net does not depend on the pixels (the data loading cost is ``benchmarks/loader_timing.py``'s).

    python benchmarks/omniglot_resolution.py --threads 1 [--filters 64 128] [--reps 5]

Writes benchmarks/results/omniglot_resolution.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from innerloop.algorithms.protonet import ProtoNet
from innerloop.data.augment import KOCH, augment_batch
from innerloop.io import atomic_write_text
from innerloop.models.conv4 import Conv4
from innerloop.tasks import TaskBatch
from innerloop.training.evaluate import machine

ROOT = Path(__file__).resolve().parent.parent
SIZES = (28, 56, 84, 105)


def episode(side: int, ways: int, queries: int, seed: int = 0) -> TaskBatch:
    """One ``ways``-way 1-shot episode of random binary ``side x side`` images: ``[1, ways, 1, side, side]``
    support and ``[1, ways * queries, 1, side, side]`` query."""
    g = torch.Generator().manual_seed(seed)
    sx = (torch.rand(1, ways, 1, side, side, generator=g) > 0.9).float()
    qx = (torch.rand(1, ways * queries, 1, side, side, generator=g) > 0.9).float()
    return TaskBatch(sx, torch.arange(ways).unsqueeze(0), qx, torch.arange(ways).repeat_interleave(queries)[None])


def median_s(fn: Any, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--filters", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--ways", type=int, default=20)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "omniglot_resolution.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for filters in args.filters:
        for side in SIZES:
            torch.manual_seed(0)
            model = Conv4(1, 0, filters, side)
            alg = ProtoNet(model)
            batch = episode(side, args.ways, args.queries)
            embedding = int(model(batch.support_x[0, :1]).shape[-1])
            step = median_s(lambda: alg.meta_gradient(batch), args.reps)  # noqa: B023 - timed now
            aug = median_s(lambda: augment_batch(batch, KOCH, [0]), args.reps)  # noqa: B023
            rows.append({"side": side, "filters": filters, "embedding": embedding,
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "meta_gradient_s": step, "augment_s": aug})
            print(rows[-1], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# Omniglot {args.ways}-way 1-shot: the cost of one episode by image side (ProtoNets, conv-4)", "",
        f"Command: `python benchmarks/omniglot_resolution.py --threads {args.threads} --filters "
        f"{' '.join(map(str, args.filters))} --ways {args.ways} --queries {args.queries} "
        f"--reps {args.reps}`", "",
        f"One episode: {args.ways} support images + {args.ways * args.queries} queries "
        f"({args.queries} per class), random binary images of the side shown; median of the timed repetitions "
        "after two warm-ups. "
        f"Machine: {machine()}; load average {load:.2f} when it ended (other processes share the cores).", "",
        "| side | filters | embedding (flattened conv-4 output) | parameters | forward + backward (s) "
        "| Koch augmentation of the episode (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['side']} | {r['filters']} | {r['embedding']} | {r['parameters']:,} | "
                     f"{r['meta_gradient_s']:.4f} | {r['augment_s']:.4f} |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "load": load, "rows": rows}
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
