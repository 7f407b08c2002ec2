"""Data-parallel scaling of meta-training: 1 vs 2 processes (gloo, 1 thread each).

Times meta-iterations of the real training loop (``meta_train``: shard, meta-gradient,
all-reduce, outer step) on one process with the whole meta-batch and on two processes with half
each, and reports the scaling efficiency t1 / (2 t2) and the all-reduce volume per iteration.

    python benchmarks/distributed.py [--iterations 6]

Writes benchmarks/results/distributed.md.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from innerloop.algorithms import MAML
from innerloop.models import MLP
from innerloop.models.conv4 import Conv4
from innerloop.tasks import TaskBatch
from innerloop.training.config import TrainConfig
from innerloop.training.loop import meta_train


class RandomImages:
    """Omniglot-shaped tasks (1x28x28) with random pixels: the compute of real ones, no data needed."""

    objective = "classification"
    seed = 0

    def __init__(self, ways: int, shots: int, queries: int) -> None:
        self.ways, self.shots, self.queries = ways, shots, queries

    def batch(self, split: str, indices) -> TaskBatch:
        n = len(indices)
        g = torch.Generator().manual_seed(int(indices[0]) if n else 0)
        lab = torch.arange(self.ways)
        return TaskBatch(torch.rand(n, self.ways * self.shots, 1, 28, 28, generator=g),
                         lab.repeat_interleave(self.shots).expand(n, -1).clone(),
                         torch.rand(n, self.ways * self.queries, 1, 28, 28, generator=g),
                         lab.repeat_interleave(self.queries).expand(n, -1).clone())

    def task(self, split, index):
        return self.batch(split, [index]).task(0)


def case(name: str):
    if name == "sinusoid":
        from innerloop.data import make_family

        torch.manual_seed(0)
        return MAML(MLP(1, 1, (40, 40)), "regression", 0.01, 1), make_family("sinusoid"), 32
    torch.manual_seed(0)
    return MAML(Conv4(1, 5, 64, 28, "max"), "classification", 0.4, 1), RandomImages(5, 1, 15), 8


def worker(rank: int, world: int, port: int, name: str, iterations: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    alg, family, meta_batch = case(name)
    cfg = TrainConfig(iterations=1, meta_batch_size=meta_batch, validate_every=10**9, val_tasks=1)
    meta_train(alg, family, cfg, None, progress=False)  # warm-up
    cfg = TrainConfig(iterations=iterations, meta_batch_size=meta_batch, validate_every=10**9, val_tasks=1)
    t0 = time.perf_counter()
    meta_train(alg, family, cfg, None, progress=False)
    elapsed = time.perf_counter() - t0
    if rank == 0:
        params = sum(p.numel() for p in alg.parameters())
        out.put((elapsed / iterations, params, meta_batch))
    if world > 1:
        dist.destroy_process_group()


def measure(name: str, world: int, iterations: int) -> tuple[float, int, int]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=worker, args=(r, world, port, name, iterations, out)) for r in range(world)]
    for p in procs:
        p.start()
    result = out.get(timeout=3600)
    for p in procs:
        p.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed.md"))
    args = p.parse_args()
    load = os.getloadavg()[0]
    rows = ["| case | meta-batch | 1 process (s/iter) | 2 processes (s/iter) | speed-up | efficiency "
            "| all-reduce per iteration |", "|---|---|---|---|---|---|---|"]
    for name, label in (("sinusoid", "sinusoid MAML, MLP 1-40-40-1, 1 step"),
                        ("conv4", "Omniglot-shaped MAML, conv-4 (64, max-pool, BN), 5-way 1-shot 15 queries")):
        iters = args.iterations * (50 if name == "sinusoid" else 1)
        t1, params, mb = measure(name, 1, iters)
        t2, _, _ = measure(name, 2, iters)
        rows.append(f"| {label} | {mb} | {t1:.4f} | {t2:.4f} | {t1 / t2:.2f}x | {t1 / (2 * t2):.0%} "
                    f"| {params} floats = {4 * params / 1024:.0f} KiB |")
        print(rows[-1], flush=True)
    text = ("# Data-parallel meta-training: 1 vs 2 processes (gloo on loopback, 1 thread each)\n\n"
            + "\n".join(rows) + "\n\n"
            "The all-reduce carries the meta-gradient (one float32 per meta-parameter) plus the metrics, once "
            "per iteration; a ring all-reduce sends and receives about 2 (N-1)/N times that per rank, so across "
            "machines an iteration costs roughly that volume over the network bandwidth plus a latency term, "
            "against the compute of meta_batch/N tasks.\n\n"
            f"Command: `python benchmarks/distributed.py --iterations {args.iterations}`; "
            f"torch {torch.__version__}, CPU, seed 0; machine load average {load:.1f} on {os.cpu_count()} "
            "cores when it started (other jobs running: the two-process runs compete with them for the "
            "second core, so efficiency here is a lower bound).\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
