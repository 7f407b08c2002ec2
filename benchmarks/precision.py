"""The meta-gradient's error against float64 for each ``precision`` of the execution layer.

Second-order MAML on conv-4 (Omniglot shape: 1x28x28, 64 filters, BatchNorm with batch statistics),
5-way 1-shot with 15 queries, 4 tasks, 1 inner step: the float64 meta-gradient (model and batch in
float64) is the reference; each precision runs the float32 model through ``Execution(precision=...)``
(``fp32``; ``bf16`` autocast; ``fp16`` autocast with a loss scale of 2**12, on CUDA only). Reported:
the relative error ``||g - g64|| / ||g64||`` over all meta-parameters, the cosine between them, and
the median time of a meta-gradient (``--repeats`` after a warm-up). On a CPU without native bfloat16
it is emulated and several times slower than float32.

    python benchmarks/precision.py [--device cpu] [--repeats 3]

Writes benchmarks/results/precision_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from innerloop.adapt import loss_scale
from innerloop.algorithms import MAML
from innerloop.execution import resolve_device
from innerloop.models import Conv4
from innerloop.tasks import TaskBatch
from innerloop.training.evaluate import machine

RESULTS = Path(__file__).parent / "results"


def batch(tasks: int = 4, ways: int = 5, queries: int = 15) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    return TaskBatch(torch.rand(tasks, ways, 1, 28, 28, generator=g),
                     torch.arange(ways).expand(tasks, -1).clone(),
                     torch.rand(tasks, ways * queries, 1, 28, 28, generator=g),
                     torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone())


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.double().flatten().cpu() for _, g in sorted(grads.items())])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = Conv4(1, 5, 64, 28)
    b = batch()
    kw = dict(inner_lr=0.4, inner_steps=1, task_threads=1)
    ref = MAML(copy.deepcopy(model).double(), "classification", **kw).meta_gradient(b.to(dtype=torch.float64))[0]
    g64 = flat(ref)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    rows = {}
    for precision in precisions:
        alg = MAML(copy.deepcopy(model).to(device), "classification", precision=precision, device=str(device),
                   **kw)
        on = b.to(device)
        scale = 2.0**12 if precision == "fp16" else 1.0

        def step(alg: MAML = alg, on: TaskBatch = on, scale: float = scale) -> dict[str, torch.Tensor]:
            with loss_scale(scale):
                return alg.meta_gradient(on)[0]

        g = flat(step())
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows[precision] = {"rel_error_vs_float64": float((g - g64).norm() / g64.norm()),
                           "cosine_vs_float64": float(torch.nn.functional.cosine_similarity(g, g64, dim=0)),
                           "median_s": statistics.median(times), "loss_scale": scale}
        print(precision, rows[precision], file=sys.stderr, flush=True)
    command = "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "date": datetime.date.today().isoformat(), "machine": machine(),
              "device": str(device), "rows": rows,
              "setting": {"model": "conv4 64 filters, BatchNorm (batch statistics)", "tasks": 4, "ways": 5,
                          "shots": 1, "queries": 15, "inner_steps": 1, "second_order": True, "seed": 0,
                          "threads": args.threads}}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"precision_{device.type}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Meta-gradient error against float64 per precision ({device.type})", "",
             f"`{command.strip()}`, {machine()['cpu']}, torch {machine()['torch']}, {result['date']}. "
             "Second-order MAML, conv-4 (64 filters, BatchNorm with batch statistics), 4 tasks of 5-way 1-shot "
             "with 15 queries on 1x28x28 inputs, 1 inner step; the reference is the same computation in "
             "float64.", "",
             "| precision | rel. error vs float64 | cosine vs float64 | s per meta-gradient |",
             "|---|---|---|---|"]
    for p, r in rows.items():
        lines.append(f"| {p} | {r['rel_error_vs_float64']:.1e} | {r['cosine_vs_float64']:.6f} | "
                     f"{r['median_s']:.3f} |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
