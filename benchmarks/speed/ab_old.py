"""This innerloop against an older one IN ONE PROCESS: the same meta-batch, calls alternated.

Separate processes on this shared 2-core machine differ by 10-30% from one run to the next (see the
rounds of ``bench.py``), more than the change being measured. Here the old package is copied to a
temporary folder under another name (``innerloop_old``, its imports rewritten), so both versions
run side by side: each meta-iteration of one is followed by one of the other, in alternating order,
on the same batch and the same initial weights.

    git worktree add /work/before 1d7e620          # innerloop 0.1.0
    python benchmarks/speed/ab_old.py --old-src /work/before [--iters 12] [--threads 2]

Writes benchmarks/results/speed_ab_old.md (``--out`` for another file).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"
CASES = [("MAML", False), ("MAML", True), ("MAMLPlusPlus", False), ("MAMLPlusPlus", True), ("IMAML", False),
         ("Reptile", False)]


def renamed_copy(src: Path, into: Path) -> None:
    """``src/innerloop`` copied to ``into/innerloop_old`` with every import of it renamed."""
    dest = into / "innerloop_old"
    shutil.copytree(src / "innerloop", dest)
    for path in dest.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\binnerloop(\.|\b(?= import))", r"innerloop_old\1", text)
        path.write_text(text)


def batch(cls: Any, model: str = "conv4") -> Any:
    """The benchmark's conv-4 meta-batch: 32 tasks of 5-way 1-shot, 15 queries, random 28x28 images;
    ``mlp``: the sinusoid one, 25 tasks of 10 support and 10 query points."""
    g = torch.Generator().manual_seed(0)
    if model == "mlp":
        return cls(torch.rand(25, 10, 1, generator=g) * 10 - 5, torch.randn(25, 10, 1, generator=g),
                   torch.rand(25, 10, 1, generator=g) * 10 - 5, torch.randn(25, 10, 1, generator=g))
    return cls(torch.rand(32, 5, 1, 28, 28, generator=g), torch.arange(5).expand(32, -1).clone(),
               torch.rand(32, 75, 1, 28, 28, generator=g),
               torch.arange(5).repeat_interleave(15).expand(32, -1).clone())


def measure(name: str, first_order: bool, iters: int, model: str = "conv4") -> dict[str, Any]:
    new_alg = importlib.import_module("innerloop.algorithms")
    old_alg = importlib.import_module("innerloop_old.algorithms")
    new_conv = importlib.import_module("innerloop.models.conv4").Conv4
    old_conv = importlib.import_module("innerloop_old.models.conv4").Conv4
    new_tb = importlib.import_module("innerloop.tasks").TaskBatch
    old_tb = importlib.import_module("innerloop_old.tasks").TaskBatch
    kw: dict[str, Any] = {"inner_lr": 0.4 if model == "conv4" else 0.01, "inner_steps": 1}
    if name in ("MAML", "MAMLPlusPlus"):
        kw["first_order"] = first_order
    if model == "mlp":
        new_net = importlib.import_module("innerloop.models.mlp").MLP
        old_net = importlib.import_module("innerloop_old.models.mlp").MLP
        args: tuple[Any, ...] = (1, 1, (40, 40))
        objective = "regression"
    else:
        new_net, old_net, args, objective = new_conv, old_conv, (1, 5, 64, 28), "classification"
    torch.manual_seed(0)
    new = getattr(new_alg, name)(new_net(*args), objective, **kw)
    torch.manual_seed(0)
    old = getattr(old_alg, name)(old_net(*args), objective, **kw)
    runs = {"new": (new, batch(new_tb, model)), "old": (old, batch(old_tb, model))}
    for alg, b in runs.values():  # warm-up
        alg.meta_gradient(b)
    times: dict[str, list[float]] = {"new": [], "old": []}
    for i in range(iters):
        for key in (("new", "old") if i % 2 == 0 else ("old", "new")):
            alg, b = runs[key]
            t0 = time.perf_counter()
            alg.meta_gradient(b)
            times[key].append(time.perf_counter() - t0)
    return {"algorithm": name, "first_order": first_order, "new": statistics.median(times["new"]),
            "old": statistics.median(times["old"]), "n": iters}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-src", required=True, help="a checkout of the older innerloop (its repository root)")
    p.add_argument("--iters", type=int, default=12, help="timed meta-iterations of each version per case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", choices=("conv4", "mlp"), default="conv4",
                   help="conv4 (Omniglot-shaped) or mlp (the sinusoid MLP 1-40-40-1, meta-batch 25)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    args.out = args.out or str(RESULTS / ("speed_ab_old.md" if args.model == "conv4" else "speed_ab_old_mlp.md"))
    torch.set_num_threads(args.threads)
    old_src = Path(args.old_src).resolve()
    commit = subprocess.run(["git", "-C", str(old_src), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    load0, t0 = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        renamed_copy(old_src, Path(tmp))
        sys.path.insert(0, tmp)
        rows = []
        for name, first_order in CASES:
            if args.model == "mlp" and name == "IMAML":
                continue  # its own benchmark row elsewhere; the point here is the MAML family's hot path
            row = measure(name, first_order, args.iters, args.model)
            rows.append(row)
            order = "1st" if first_order else "2nd"
            print(f"{name} {order} order: now {row['new']:.3f} s, old {row['old']:.3f} s, "
                  f"old / now {row['old'] / row['new']:.2f}x", flush=True)
    unit = "ms" if args.model == "mlp" else "s"
    lines = [
        f"# innerloop now against innerloop {commit}, in one process",
        "",
        f"Command: `python benchmarks/speed/ab_old.py --old-src {args.old_src} --iters {args.iters} "
        f"--threads {args.threads} --model {args.model}`. Machine: {os.uname().machine}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads, float32. Start {t0}, load average "
        f"{load0[0]:.2f}; end load average {os.getloadavg()[0]:.2f}.",
        "",
        ("conv-4 5-way 1-shot, 15 queries, meta-batch 32, 1 inner step of 0.4, random images"
         if args.model == "conv4"
         else "sinusoid MLP 1-40-40-1, meta-batch 25 of 10 + 10 points, 1 inner step of 0.01, random points")
        + "; the meta-gradient",
        "only (no optimiser step); each version's call alternated with the other's, medians over n calls.",
        "",
        f"| algorithm | order | now {unit} / meta-gradient | old {unit} / meta-gradient "
        "| old / now (above 1: faster now) | n |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        order = "1st" if r["first_order"] else ("2nd" if r["algorithm"] != "Reptile" else "-")
        ratio = r["old"] / r["new"]
        scale = 1e3 if args.model == "mlp" else 1.0  # the MLP's times in ms
        lines.append(f"| {r['algorithm']} | {order} | {r['new'] * scale:.3f} | {r['old'] * scale:.3f} "
                     f"| {ratio:.2f}x | {r['n']} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
