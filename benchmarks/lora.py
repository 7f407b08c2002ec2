"""Time and memory per meta-iteration: LoRA adapters of a frozen transformer against adapting everything.

Second-order MAML (one inner step by default) on the transformer of ``examples/lora_meta_learning.py``
(d_model 256, 4 heads, pre-LN blocks, 16-token sequences of the 5-way 1-shot ``PatternTokens``
family, 3 queries per class, meta-batch 4), at two depths (``--depths``, default 4 and 16 blocks:
3.2M and 12.7M parameters), each in these modes (``--modes``):

* ``full``: the plain transformer (no adapters); every parameter adapts and is meta-learned.
* ``lora``: LoRA (rank 8, on the attention's q, k and v projections of every block: the example's
  adapters) and the head adapt and are meta-learned (``adapt=["*.lora_*", "head.*"]``); the base is
  frozen (``requires_grad=False``).
* ``lora-top``: LoRA on the last block only, and the head; the blocks below carry no graph at all.
* ``head``: the head alone (a frozen body, as ANIL's inner loop but with the body frozen outside too).

Every row runs in its own fresh process (one intra-op thread, ``task_threads=1``, seed 0), rounds
interleave the rows, and per row it reports:

* ms per meta-iteration (``meta_gradient`` and the Adam step on the trainable parameters): the
  median over every timed iteration of every round, after a warm-up iteration;
* peak tensor memory of one meta-iteration: the high-water mark of the bytes held by tensors
  allocated during it (``torch.profiler`` memory events, summed in time order; the model's own
  weights, allocated before, are not counted), and the growth of the process's max RSS over its RSS
  before the first meta-iteration (coarse: what the allocator keeps);
* FLOPs of one meta-gradient (``torch.utils.flop_counter``);
* the number of parameters: in the model, trainable (meta-learned), adapted in the inner loop.

    python benchmarks/lora.py [--rounds 3 --iters 5] [--depths 4 16] [--modes full lora lora-top head]

Writes benchmarks/results/lora.json and lora.md (``--tag`` for another name).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from innerloop import MAML
from innerloop.training.evaluate import machine

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EXAMPLE = HERE.parent / "examples" / "lora_meta_learning.py"

MODES: dict[str, str] = {
    "full": "no adapters; every parameter adapts and is meta-learned",
    "lora": "LoRA on q, k, v of every block + head adapt and are meta-learned; the base is frozen",
    "lora-top": "LoRA on q, k, v of the last block only + head; the rest is frozen",
    "head": "the head alone adapts and is meta-learned; the body is frozen",
}


def example() -> ModuleType:
    """``examples/lora_meta_learning.py`` as a module (the model and the task family)."""
    spec = importlib.util.spec_from_file_location("lora_meta_learning", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("lora_meta_learning", module)
    spec.loader.exec_module(module)
    return module


def build(args: argparse.Namespace, layers: int, mode: str) -> tuple[MAML, Any]:
    """The algorithm of one row and its meta-batch."""
    ex = example()
    family = ex.PatternTokens(args.ways, args.shots, args.queries, vocab=args.vocab, length=args.length,
                              seed=args.seed)
    common = {"d_model": args.d_model, "layers": layers, "heads": args.heads, "rank": args.rank,
              "targets": tuple(args.targets), "seed": args.seed}
    if mode == "full":
        model = ex.lora_transformer(args.vocab, args.length, args.ways, frozen=False, **{**common, "targets": ()})
        adapt: Any = "all"
    elif mode in ("lora", "lora-top"):
        lora_layers = [layers - 1] if mode == "lora-top" else None
        model = ex.lora_transformer(args.vocab, args.length, args.ways, lora_layers=lora_layers, **common)
        adapt = list(ex.LORA_ADAPT)
    elif mode == "head":
        plain = ex.lora_transformer(args.vocab, args.length, args.ways, **{**common, "targets": ()})
        model = ex.freeze_base(plain, ("head.*",))
        adapt = ["head.*"]
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {list(MODES)}")
    maml = MAML(model, "classification", inner_lr=args.inner_lr, inner_steps=args.steps, adapt=adapt,
                task_threads=1)
    return maml, family.batch("train", range(args.meta_batch))


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_tensor_bytes(fn: Any) -> int:
    """The high-water mark of the bytes held by tensors allocated while ``fn()`` runs (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One row (depth, mode) in this process: counts, FLOPs, peak memory, timed iterations."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    maml, batch = build(args, args.layers, args.mode)
    params = maml.trainable()
    named = dict(maml.model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    out: dict[str, Any] = {
        "layers": args.layers, "mode": args.mode,
        "params": sum(p.numel() for p in named.values()),
        "trainable": sum(p.numel() for p in params.values()),
        "adapted": sum(named[n].numel() for n in maml.adapt_names),
        "rss_before": rss_now(),
    }

    def iteration() -> None:
        grads, _ = maml.meta_gradient(batch)
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
        opt.zero_grad(set_to_none=True)

    iteration()  # warm-up (and the execution layer's plan, traced once)
    times, cpu_times = [], []
    for _ in range(args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        iteration()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    out["times"], out["cpu_times"] = times, cpu_times
    out["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the profiler's own
    if args.measure:
        out["peak_tensor_bytes"] = peak_tensor_bytes(iteration)
        with FlopCounterMode(display=False) as counter:
            maml.meta_gradient(batch)
        out["flops"] = counter.get_total_flops()
    return out


def run_row(args: argparse.Namespace, layers: int, mode: str, measure: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--layers", str(layers), "--mode", mode, "--iters",
           str(args.iters), *shared_flags(args)] + (["--measure"] if measure else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"row layers={layers} mode={mode} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


SHARED = ("ways", "shots", "queries", "vocab", "length", "d_model", "heads", "rank", "inner_lr", "steps",
          "meta_batch", "seed")


def shared_flags(args: argparse.Namespace) -> list[str]:
    flags = [x for k in SHARED for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return [*flags, "--targets", *args.targets]


def fmt_count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def report(args: argparse.Namespace, rows: list[dict[str, Any]], wall: float) -> str:
    head = ("| blocks | mode | parameters | trainable | adapted | CPU ms / meta-iteration | vs full | wall ms "
            "| peak tensor MiB | vs full | GFLOP / meta-gradient | vs full | RSS growth MiB |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    full = {r["layers"]: r for r in rows if r["mode"] == "full"}

    def vs(r: dict[str, Any], key: str) -> str:
        f = full.get(r["layers"])
        return f"{r[key] / f[key]:.2f}x" if f else "-"

    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['mode']} | {fmt_count(r['params'])} | {fmt_count(r['trainable'])} | "
            f"{fmt_count(r['adapted'])} | {r['median_cpu_ms']:.0f} | {vs(r, 'median_cpu_ms')} | "
            f"{r['median_ms']:.0f} | {r['peak_tensor_bytes'] / 2**20:.1f} | {vs(r, 'peak_tensor_bytes')} | "
            f"{r['flops'] / 1e9:.1f} | {vs(r, 'flops')} | {r['rss_growth'] / 2**20:.0f} |")
    depths = sorted({r["layers"] for r in rows})
    growth = []
    if len(depths) > 1:
        lo, hi = depths[0], depths[-1]
        by = {(r["layers"], r["mode"]): r for r in rows}
        growth = ["", f"From {lo} to {hi} blocks ({hi / lo:.0f}x the blocks, "
                  f"{by[(hi, args.modes[0])]['params'] / by[(lo, args.modes[0])]['params']:.2f}x the parameters), "
                  "each mode's", ""]
        for mode in args.modes:
            a, b = by.get((lo, mode)), by.get((hi, mode))
            if a and b:
                x = {k: b[k] / a[k] for k in ("trainable", "peak_tensor_bytes", "flops", "median_cpu_ms")}
                growth.append(f"- {mode}: trainable parameters {x['trainable']:.2f}x, peak tensor memory "
                              f"{x['peak_tensor_bytes']:.2f}x, FLOPs {x['flops']:.2f}x, CPU time "
                              f"{x['median_cpu_ms']:.2f}x")
    m = machine()
    modes = "\n".join(f"- `{k}`: {v}" for k, v in MODES.items() if k in args.modes)
    cmd = " ".join(["python benchmarks/lora.py", *sys.argv[1:]])
    return "\n".join([
        "# LoRA adapters of a frozen transformer vs adapting everything (second-order MAML)",
        "",
        *lines,
        *growth,
        "",
        f"Transformer of `examples/lora_meta_learning.py`: d_model {args.d_model}, {args.heads} heads, pre-LN "
        f"blocks with a 4x GELU MLP, vocabulary {args.vocab}, LoRA rank {args.rank} on "
        f"{', '.join(args.targets)}, {args.length}-token sequences; "
        f"`PatternTokens` {args.ways}-way {args.shots}-shot, {args.queries} queries per class, meta-batch "
        f"{args.meta_batch}; MAML second order, {args.steps} inner step(s), inner lr {args.inner_lr}; the "
        f"per-task loop (LayerNorm), task_threads=1, one intra-op thread. Modes:",
        "",
        modes,
        "",
        "CPU ms / meta-iteration: median over every timed iteration (meta-gradient + Adam step) of the "
        "process's CPU time (one thread, so other load on the machine inflates it less than the wall time, "
        "whose median is the next column; "
        f"{args.iters} per round, {args.rounds} round(s), each row in a fresh process, rounds interleaving the "
        "rows, after one warm-up iteration). Peak tensor MiB: the high-water mark of the bytes held by "
        "tensors allocated during one meta-iteration (torch.profiler memory events; the weights themselves "
        "are allocated before and not counted). GFLOP: one meta-gradient (torch.utils.flop_counter). RSS growth: "
        "the process's max RSS less its RSS before the first meta-iteration (coarse: allocator caching; "
        "both are in the JSON).",
        "",
        f"Command: `{cmd}`; seed {args.seed}; {datetime.date.today().isoformat()}; torch {torch.__version__}; "
        f"machine: {json.dumps(m)}; {os.cpu_count()} CPUs, load average {args.load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end (other jobs share the machine); "
        f"{wall:.0f} s in all.",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=5, help="timed meta-iterations per row and round")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["q", "k", "v"], help="projections that get adapters")
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=1, help="inner steps")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="lora")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    torch.set_num_threads(1)  # as in every worker (and so in machine()'s report)
    args.load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    keys = [(d, m) for d in args.depths for m in args.modes]
    acc: dict[tuple[int, str], dict[str, Any]] = {}
    for r in range(args.rounds):
        for d, m in keys if r % 2 == 0 else keys[::-1]:
            res = run_row(args, d, m, measure=r == 0)
            e = acc.setdefault((d, m), {**res, "times": [], "cpu_times": [], "rss_growth": 0})
            e["times"] += res["times"]
            e["cpu_times"] += res["cpu_times"]
            e["max_rss"] = max(e["max_rss"], res["max_rss"])
            e["rss_growth"] = max(e["rss_growth"], res["max_rss"] - res["rss_before"])
            print(f"round {r + 1}: {d} blocks {m}: {1000 * statistics.median(res['cpu_times']):.0f} ms CPU, "
                  f"{1000 * statistics.median(res['times']):.0f} ms wall"
                  + (f", peak tensor {res['peak_tensor_bytes'] / 2**20:.1f} MiB" if r == 0 else ""), flush=True)
    rows = []
    for k in keys:
        e = acc[k]
        e["median_ms"] = 1000 * statistics.median(e["times"])
        e["median_cpu_ms"] = 1000 * statistics.median(e["cpu_times"])
        rows.append(e)
    wall = time.perf_counter() - t0
    text = report(args, rows, wall)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.md").write_text(text)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"command": " ".join(["python benchmarks/lora.py", *sys.argv[1:]]), "args": vars(args),
         "machine": machine(), "date": datetime.date.today().isoformat(), "wall_s": wall, "rows": rows},
        indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
