"""Peak memory and time per meta-iteration of second-order MAML through the full ResNet-12
(64-160-320-640), with and without the checkpointed inner loop (``Execution(checkpoint=True)``).

Rows: Omniglot-size inputs (28x28x1) and miniImageNet-size inputs (84x84x3), 5-way 1-shot, 1 and 5
inner steps, meta-batch ``--meta-batch``, one intra-op thread, random images (memory and time do not
depend on the pixels). Each row runs in its own process, so its numbers are its own:

* ``peak tensor MiB``: the high-water mark of the bytes held by tensors during one meta-iteration,
  from torch.profiler's memory events (the method of ``benchmarks/lora.py``);
* ``max RSS MiB``: the process's peak resident set (``ru_maxrss``), model and interpreter included;
* ``s / iteration``: the median wall time of ``--iters`` meta-iterations (meta-gradient and Adam
  step) after one warm-up.

    python benchmarks/resnet12_memory.py            # writes benchmarks/results/resnet12_memory.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lora import peak_tensor_bytes  # the same measure as benchmarks/lora.py (this script's folder)

from innerloop.algorithms import MAML
from innerloop.execution import Execution
from innerloop.io import atomic_write_text
from innerloop.models import ResNet12
from innerloop.tasks import TaskBatch

RESULTS = Path(__file__).parent / "results"
ROWS = [(size, channels, steps, checkpoint) for size, channels in ((28, 1), (84, 3))
        for steps in (1, 5) for checkpoint in (False, True)]


def batch(tasks: int, ways: int, shots: int, queries: int, channels: int, size: int) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    return TaskBatch(torch.rand(tasks, ways * shots, channels, size, size, generator=g),
                     labels.repeat_interleave(shots).expand(tasks, -1).clone(),
                     torch.rand(tasks, ways * queries, channels, size, size, generator=g),
                     labels.repeat_interleave(queries).expand(tasks, -1).clone())


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ResNet12(args.channels, 5, image_size=args.size)
    maml = MAML(model, "classification", inner_lr=0.01, inner_steps=args.steps,
                execution=Execution(checkpoint=args.checkpoint, task_threads=1))
    data = batch(args.meta_batch, 5, 1, args.queries, args.channels, args.size)
    params = maml.trainable()
    opt = torch.optim.Adam(params.values(), lr=1e-3)

    def iteration() -> None:
        grads, _ = maml.meta_gradient(data)
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
        opt.zero_grad(set_to_none=True)

    iteration()  # warm-up (the execution layer's plan is traced once)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - t0)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the profiler's own
    return {"size": args.size, "channels": args.channels, "steps": args.steps, "checkpoint": args.checkpoint,
            "meta_batch": args.meta_batch, "queries": args.queries, "times": times,
            "median_s": statistics.median(times), "max_rss": max_rss,
            "peak_tensor_bytes": peak_tensor_bytes(iteration),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2, help="timed meta-iterations per row (after a warm-up)")
    parser.add_argument("--meta-batch", type=int, default=1, help="tasks per meta-iteration")
    parser.add_argument("--queries", type=int, default=5, help="query images per class")
    parser.add_argument("--sizes", default="28,84", help="input sides to run (28: 1 channel, 84: 3 channels)")
    parser.add_argument("--out", type=Path, default=RESULTS / "resnet12_memory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=28, help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sizes = {int(s) for s in args.sizes.split(",")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    started = time.time()
    load = os.getloadavg()[0]
    for size, channels, steps, checkpoint in ROWS:
        if size not in sizes:
            continue
        cmd = [sys.executable, __file__, "--worker", "--size", str(size), "--channels", str(channels),
               "--steps", str(steps), "--iters", str(args.iters), "--meta-batch", str(args.meta_batch),
               "--queries", str(args.queries)] + (["--checkpoint"] if checkpoint else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    command = "python benchmarks/resnet12_memory.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_1min_at_start": load, "wall_s": time.time() - started,
            "threads": 1, "meta_batch": args.meta_batch, "queries_per_class": args.queries}
    atomic_write_text(args.out.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Second-order MAML through ResNet-12 (64-160-320-640): memory and time",
        "",
        f"Command: `{meta['command']}` (torch {meta['torch']}, {meta['cpus']} CPUs, 1 intra-op thread, "
        f"1-min load {load:.2f} at start, {meta['wall_s']:.0f} s in all). 5-way 1-shot, "
        f"{args.queries} queries per class, meta-batch {args.meta_batch}, random images, BatchNorm with batch "
        f"statistics. Median of {args.iters} meta-iterations after a warm-up; each row in its own process.",
        "",
        "Peak tensor memory: the high-water mark of the bytes held by tensors in one meta-iteration "
        "(torch.profiler memory events); max RSS: the process's peak resident set (model, optimiser and "
        "interpreter included).",
        "",
        "| input | inner steps | checkpoint | s / iteration | peak tensor MiB | max RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mib = r["peak_tensor_bytes"] / 2**20, r["max_rss"] / 2**20
        lines.append(f"| {r['size']}x{r['size']}x{r['channels']} | {r['steps']} | "
                     f"{'yes' if r['checkpoint'] else 'no'} | {r['median_s']:.2f} | {mib[0]:.0f} | {mib[1]:.0f} |")
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
