"""One meta-iteration split into data and compute, with meta-batches built inline vs prefetched.

For Omniglot 5-way 1-shot MAML (``configs/omniglot_maml_5w1s.toml``: conv-4, 28x28, meta-batch 32;
data from ``$INNERLOOP_DATA``) and the sinusoid (``configs/sinusoid_maml.toml``), every iteration is
timed in two parts, the loop of :func:`innerloop.training.loop.meta_train`:

* data: the meta-batch in the training thread's hands, on the device (inline: ``family.batch`` +
  ``to_device``; prefetched: the wait in ``Prefetcher.get`` + ``to_device``);
* compute: ``algorithm.meta_gradient`` + the outer optimiser step.

The two modes run interleaved in blocks (inline, prefetch, inline, ...) after a warm-up, so load
from other processes falls on both alike; the machine's load average is recorded.

    python benchmarks/data_compute.py --threads 1 [--iterations 24] [--prefetch 2]

Writes benchmarks/results/data_compute.md and data_compute.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from innerloop.io import atomic_write_text
from innerloop.training.config import load_config
from innerloop.training.device import place, to_device
from innerloop.training.evaluate import machine
from innerloop.training.loop import load_batch, make_optimizer
from innerloop.training.prefetch import Prefetcher
from innerloop.training.run import build_algorithm, build_family

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
CASES = {"omniglot 5-way 1-shot MAML (conv-4, meta-batch 32)": "configs/omniglot_maml_5w1s.toml",
         "sinusoid MAML (MLP 40-40, meta-batch 25)": "configs/sinusoid_maml.toml"}


def time_case(config: str, iterations: int, warmup: int, blocks: int, depth: int) -> dict[str, Any]:
    cfg = load_config(ROOT / config)
    family = build_family(cfg)
    algorithm = build_algorithm(cfg, family)
    device = place(algorithm, algorithm.execution.device, algorithm.execution.precision)
    family = algorithm.training_family(family)
    optimizer = make_optimizer(algorithm, cfg.train)
    params = algorithm.trainable()
    b = cfg.train.meta_batch_size

    def indices(step: int) -> list[int]:
        return list(range(step * b, (step + 1) * b))

    def compute(batch: Any) -> None:
        grads, _ = algorithm.meta_gradient(batch)
        for n, p in params.items():
            p.grad = grads[n]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, dict[str, list[float]]] = {m: {"data": [], "compute": []} for m in ("inline", "prefetch")}
    step = 0
    for _ in range(warmup):  # warm-up: allocator, caches, first-call costs
        compute(to_device(load_batch(family, indices(step), device), device))
        step += 1
    per_block = max(1, iterations // blocks)
    for _ in range(blocks):
        # each block's first iteration is untimed in both modes: the prefetch pipeline fills there
        # (once per run in training), and the inline mode is treated alike
        start = step
        for k, i in enumerate(range(start, start + per_block + 1)):  # inline: meta_train(prefetch=0)
            t0 = time.perf_counter()
            batch = to_device(family.batch("train", indices(i)), device)
            t1 = time.perf_counter()
            compute(batch)
            if k:
                times["inline"]["data"].append(t1 - t0)
                times["inline"]["compute"].append(time.perf_counter() - t1)
        start += per_block + 1
        with Prefetcher(lambda i: load_batch(family, indices(i), device), depth) as pf:
            for k, i in enumerate(range(start, start + per_block + 1)):
                t0 = time.perf_counter()
                batch = to_device(pf.get(i), device)
                t1 = time.perf_counter()
                compute(batch)
                if k:
                    times["prefetch"]["data"].append(t1 - t0)
                    times["prefetch"]["compute"].append(time.perf_counter() - t1)
        step = start + per_block + 1
    out: dict[str, Any] = {"config": config, "meta_batch_size": b, "device": str(device),
                           "iterations_per_mode": blocks * per_block, "warmup": warmup}
    for mode, parts in times.items():
        total = [d + c for d, c in zip(parts["data"], parts["compute"], strict=True)]
        out[mode] = {"data_ms": 1e3 * statistics.median(parts["data"]),
                     "compute_ms": 1e3 * statistics.median(parts["compute"]),
                     "iteration_ms": 1e3 * statistics.median(total),
                     "mean_iteration_ms": 1e3 * statistics.fmean(total)}
    out["speedup"] = out["inline"]["mean_iteration_ms"] / out["prefetch"]["mean_iteration_ms"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the training thread")
    ap.add_argument("--iterations", type=int, default=24, help="timed iterations per mode and case")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=4, help="alternations of the two modes")
    ap.add_argument("--prefetch", type=int, default=2, help="meta-batches built ahead")
    ap.add_argument("--sinusoid-iterations", type=int, default=200)
    args = ap.parse_args(argv)
    if not os.environ.get("INNERLOOP_DATA"):
        sys.exit("set INNERLOOP_DATA to the folder that holds omniglot/ (../shared/data in CI).")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = {}
    for name, config in CASES.items():
        n = args.sinusoid_iterations if "sinusoid" in config else args.iterations
        rows[name] = time_case(config, n, args.warmup, args.blocks, args.prefetch)
        print(name, json.dumps(rows[name]), flush=True)
    load_after = os.getloadavg()
    command = "python benchmarks/data_compute.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "machine": machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": load_after,
              "prefetch": args.prefetch, "cases": rows}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "data_compute.json", json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [
        "# One meta-iteration: data vs compute, inline vs prefetched meta-batches", "",
        f"`{command}`, torch {torch.__version__}, {m['cpu']} ({os.cpu_count()} cores), "
        f"{args.threads} intra-op thread(s), prefetch depth {args.prefetch}. Load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_before)} before, {'/'.join(f'{x:.1f}' for x in load_after)} after: "
        "other processes shared the machine.", "",
        "Medians per iteration in ms; data = the batch in the training thread's hands on the device "
        "(inline: `family.batch` + `to_device`; prefetch: the wait for the background thread + `to_device`), "
        "compute = `meta_gradient` + optimiser step. Modes interleaved in blocks after a warm-up.", "",
        "| case | mode | data | compute | iteration (median) | iteration (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        for mode in ("inline", "prefetch"):
            t = r[mode]
            lines.append(f"| {name} | {mode} | {t['data_ms']:.2f} | {t['compute_ms']:.1f} | "
                         f"{t['iteration_ms']:.1f} | {t['mean_iteration_ms']:.1f} |")
    ratios = ", ".join(f"{name}: {r['speedup']:.2f}x" for name, r in rows.items())
    counts = ", ".join(f"{r['iterations_per_mode']}" for r in rows.values())
    lines += ["", f"Mean iteration time, inline / prefetch: {ratios} ({counts} timed iterations per mode)."]
    atomic_write_text(RESULTS / "data_compute.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
