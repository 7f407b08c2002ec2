"""Head-only adaptation: innerloop's captured-features path against full forwards and a by-hand unroll.

A CNN of about 1.9M parameters (four conv blocks 3-64-128-256-640 with stock ``nn.BatchNorm2d``, a
linear head ``fc``) adapts only ``fc.*`` (second-order MAML, 5 inner steps, 5-way 1-shot with 15
queries on 3x32x32 images). Three ways to compute the same meta-gradient, timed interleaved in one
process with one intra-op thread (medians after a warm-up):

* ``innerloop``: ``MAML(model, adapt=["fc.*"])`` (the body runs once per task and split, the inner
  loop on the head's features: :mod:`innerloop.split`);
* ``innerloop-full``: the same with ``reuse_features=False`` (full forwards at every inner step);
* ``by-hand``: the body once per task in plain autograd, the head's inner loop written out with
  ``torch.autograd.grad(create_graph=True)``.

The meta-gradients are compared (relative error, float32).

    python benchmarks/head_only.py [--repeats 5] [--tasks 4]

Writes benchmarks/results/head_only.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from innerloop.algorithms import MAML
from innerloop.tasks import TaskBatch
from innerloop.training.evaluate import machine

RESULTS = Path(__file__).parent / "results"


class CNN(nn.Module):
    """``[n, 3, 32, 32] -> [n, ways]``: four conv-BN-ReLU-maxpool blocks and a linear ``fc``."""

    def __init__(self, ways: int = 5, widths: tuple[int, ...] = (64, 128, 256, 640)) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        cin = 3
        for w in widths:
            blocks += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            cin = w
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.fc = nn.Linear(cin * 2 * 2, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


def batch(tasks: int, ways: int = 5, shots: int = 1, queries: int = 15) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return TaskBatch(torch.randn(tasks, ways * shots, 3, 32, 32, generator=g),
                     torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone(),
                     torch.randn(tasks, ways * queries, 3, 32, 32, generator=g),
                     torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone())


def by_hand(model: CNN, b: TaskBatch, lr: float, steps: int) -> dict[str, Tensor]:
    """The meta-gradient written out: body once per task (batch statistics), head unrolled."""
    params = dict(model.named_parameters())
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    body_state = {k[5:]: v for k, v in params.items() if k.startswith("body.")}
    buffers = {k[5:]: None for k, _ in model.named_buffers() if k.startswith("body.")}
    for i in range(len(b)):
        zs = torch.func.functional_call(model.body, (body_state, buffers), (b.support_x[i],))
        zq = torch.func.functional_call(model.body, (body_state, buffers), (b.query_x[i],))
        w, bias = params["fc.weight"], params["fc.bias"]
        for _ in range(steps):
            loss = F.cross_entropy(F.linear(zs, w, bias), b.support_y[i])
            gw, gb = torch.autograd.grad(loss, (w, bias), create_graph=True)
            w, bias = w - lr * gw, bias - lr * gb
        q = F.cross_entropy(F.linear(zq, w, bias), b.query_y[i]) / len(b)
        for k, g in zip(params, torch.autograd.grad(q, list(params.values())), strict=True):
            grads[k] += g
    return grads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CNN()
    n_params = sum(p.numel() for p in model.parameters())
    b = batch(args.tasks)
    lr = 0.1
    kw = dict(inner_lr=lr, inner_steps=args.steps, adapt=["fc.*"], task_threads=1)
    fast = MAML(model, "classification", **kw)
    full = MAML(model, "classification", reuse_features=False, **kw)
    ways = {"innerloop": lambda: fast.meta_gradient(b)[0],
            "innerloop-full": lambda: full.meta_gradient(b)[0],
            "by-hand": lambda: {f"model.{k}": v for k, v in by_hand(model, b, lr, args.steps).items()}}
    grads = {name: fn() for name, fn in ways.items()}  # warm-up, and the gradients to compare
    ref = grads["by-hand"]
    # relative to the whole gradient: the conv biases before BatchNorm have an exactly-zero gradient
    ref_all = torch.cat([ref[k].flatten() for k in ref])
    errors = {name: float(torch.cat([(g[k] - ref[k]).flatten() for k in ref]).norm() / ref_all.norm())
              for name, g in grads.items()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": "python benchmarks/head_only.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "machine": machine(), "parameters": n_params,
        "setting": {"tasks": args.tasks, "ways": 5, "shots": 1, "queries": 15, "image": [3, 32, 32],
                    "inner_steps": args.steps, "second_order": True, "adapt": ["fc.*"], "repeats": args.repeats,
                    "intra_op_threads": 1, "task_threads": 1, "seed": 0},
        "median_s": med, "times_s": times, "rel_error_vs_by_hand": errors,
        "ratio_vs_by_hand": {k: med[k] / med["by-hand"] for k in med},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "head_only.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Head-only adaptation: captured features vs full forwards vs by hand", "",
        f"`{result['command'].strip()}` on {machine()['cpu']} ({result['date']}, torch {machine()['torch']}), "
        f"one intra-op thread. CNN of {n_params / 1e6:.2f}M parameters (stock BatchNorm2d), adapt `fc.*`, "
        f"second-order MAML, {args.steps} inner steps, meta-batches of {args.tasks} 5-way 1-shot tasks "
        f"(15 queries) on 3x32x32 inputs; median of {args.repeats} meta-batches after a warm-up.", "",
        "| way | s per meta-batch | ratio to by hand | rel. error of the meta-gradient vs by hand |",
        "|---|---|---|---|",
    ]
    for k in ways:
        lines.append(f"| {k} | {med[k]:.3f} | {med[k] / med['by-hand']:.2f}x | {errors[k]:.1e} |")
    (args.out / "head_only.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
