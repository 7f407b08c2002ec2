"""Time per episode of the MetaOptNet heads: the SVM's QP (innerloop.qp, float64 interior point) and
R2D2's closed-form ridge, for 5-way 1-shot and 5-shot episodes with 64-d (conv-4) and 640-d
(ResNet-12) embeddings.

The embeddings are random (non-negative, like post-ReLU features, scaled to unit mean norm); for each
setting the head's forward alone and forward + backward (to the embeddings, through the KKT
conditions for the SVM) are timed over ``--repeats`` episodes after a warm-up, and the median is
reported with the interior-point iterations taken.

    python benchmarks/metaoptnet_qp.py --threads 1 [--repeats 50] [--device cpu]

Writes benchmarks/results/metaoptnet_qp.md (``--device cuda``: metaoptnet_qp_cuda.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from innerloop.algorithms.metaoptnet import ridge_weights, svm_qp
from innerloop.io import atomic_write_text
from innerloop.qp import qp_solve

ROOT = Path(__file__).resolve().parent.parent


def episode(ways: int, shots: int, queries: int, d: int, device: str,
            g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support ``[ways*shots, d]``, labels ``[ways*shots]``, query ``[ways*queries, d]`` (float32)."""
    n, m = ways * shots, ways * queries
    z = torch.randn(n + m, d, generator=g).relu()
    z = z / z.norm(dim=-1).mean()
    labels = torch.arange(ways).repeat_interleave(shots)
    return z[:n].to(device), labels.to(device), z[n:].to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_head(head: str, ways: int, shots: int, d: int, repeats: int, device: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    fwd, both, iters = [], [], []
    for r in range(repeats + 3):  # 3 warm-up episodes
        zs, sy, zq = episode(ways, shots, 15, d, device, g)
        zs.requires_grad_(True)
        sync(device)
        t0 = time.perf_counter()
        if head == "svm":
            Q, p, G, h, A, b = svm_qp(zs, sy, ways, 0.1, 1.0)
            sol = qp_solve(Q, p, G, h, A, b, tol=1e-8, max_iter=50)
            logits = (zq @ zs.T) @ sol.z.reshape(len(sy), ways)
            its = sol.iterations
        else:
            logits = zq @ ridge_weights(zs, F.one_hot(sy, ways).float(), 1.0)
            its = 0
        sync(device)
        t1 = time.perf_counter()
        logits.logsumexp(-1).sum().backward()
        sync(device)
        t2 = time.perf_counter()
        if r >= 3:
            fwd.append(t1 - t0)
            both.append(t2 - t0)
            iters.append(its)
    return {"forward_ms": 1e3 * statistics.median(fwd), "forward_backward_ms": 1e3 * statistics.median(both),
            "iterations": statistics.median(iters)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for head in ("svm", "ridge"):
        for shots in (1, 5):
            for d in (64, 640):
                t = time_head(head, 5, shots, d, args.repeats, args.device)
                rows.append((head, shots, d, t))
                print(f"{head:5s} 5-way {shots}-shot d={d:3d}: forward {t['forward_ms']:.2f} ms, "
                      f"forward+backward {t['forward_backward_ms']:.2f} ms, {t['iterations']:.0f} iterations",
                      flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"{platform.processor() or platform.machine()}, {args.threads} thread(s)")
    lines = [
        "# MetaOptNet heads: time per episode",
        "",
        f"Command: `python benchmarks/metaoptnet_qp.py --threads {args.threads} --repeats {args.repeats} "
        f"--device {args.device}`",
        f"Machine: {where}; torch {torch.__version__}; load average {load:.2f} when it finished.",
        "",
        "5-way episodes with 15 queries per class; random non-negative embeddings (unit mean norm); the SVM QP "
        "in float64 (C = 0.1, diagonal 1.0, tol 1e-8), ridge with lambda = 1 in float32. Medians over "
        f"{args.repeats} episodes after 3 warm-up ones.",
        "",
        "| head | shots | embedding | forward (ms) | forward + backward (ms) | QP iterations |",
        "|---|---|---|---|---|---|",
    ]
    for head, shots, d, t in rows:
        lines.append(f"| {head} | {shots} | {d} | {t['forward_ms']:.2f} | {t['forward_backward_ms']:.2f} | "
                     f"{t['iterations']:.0f} |" if head == "svm" else
                     f"| {head} | {shots} | {d} | {t['forward_ms']:.2f} | {t['forward_backward_ms']:.2f} | - |")
    name = "metaoptnet_qp.md" if args.device == "cpu" else f"metaoptnet_qp_{args.device.split(':')[0]}.md"
    atomic_write_text(ROOT / "benchmarks" / "results" / name, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
