"""Kernel-level measurements behind innerloop's CPU fast path (issue 5's levers), one thread.

    python benchmarks/speed/levers.py            # writes benchmarks/results/speed_levers_kernels.{md,json}

What it times (median of ``--repeats`` after a warm-up, a 64 MiB buffer written between runs so
that the data comes from memory as it does inside a meta-iteration):

1. max-pool 2x2 on conv-4's first activation ``[75, 64, 28, 28]`` in NCHW and channels-last (the
   first block runs NCHW unless 1-channel images get explicit channels-last strides);
2. BatchNorm of channels-last ``[75, 64, 28, 28]`` (query) and ``[5, 64, 28, 28]`` (support):
   torch's 4-D kernel against the 2-D ``[N*H*W, C]`` view (innerloop's ``BatchNorm2d``): forward,
   forward + backward, and the second-order pass MAML runs through the support set;
3. the first convolution (1 -> 64 channels) as oneDNN's channels-last kernel and as an im2col
   matmul (a candidate that was not adopted);
4. one second-order meta-iteration of conv-4 5-way 1-shot, meta-batch 8 at 2 threads (innerloop's
   default, task threads, and ``task_threads=1``), in ``--malloc-procs`` fresh processes each with
   glibc's malloc thresholds and with innerloop's (``innerloop.runtime.tune_malloc``): seconds and
   minor page faults per iteration;
5. ``torch.compile`` of the query pass (the part of second-order MAML that is differentiated
   only once) against eager, same meta-iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
sys.path.insert(0, str(HERE))
CL = torch.channels_last


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, memory traffic in between."""
    flush = torch.empty(16 * 2**20)
    fn()
    times = []
    for _ in range(repeats):
        flush.add_(1.0)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernels(repeats: int) -> dict:
    from innerloop.algorithms.base import to_channels_last
    from innerloop.models.layers import BatchNorm2d

    out: dict = {}
    images = torch.rand(75, 1, 28, 28)
    out["layout"] = {
        "contiguous(channels_last) strides": list(images.contiguous(memory_format=CL).stride()),
        "innerloop strides": list(to_channels_last({"x": images})["x"].stride()),
    }
    x = torch.randn(75, 64, 28, 28)
    xc = x.contiguous(memory_format=CL)
    out["maxpool_ms"] = {
        "nchw": timed(lambda: F.max_pool2d_with_indices(x, 2), repeats) * 1e3,
        "channels_last": timed(lambda: F.max_pool2d_with_indices(xc, 2), repeats) * 1e3,
    }
    out["batchnorm_ms"] = {}
    for n in (75, 5):
        xc = torch.randn(n, 64, 28, 28).contiguous(memory_format=CL).requires_grad_()
        g = torch.randn(n, 64, 28, 28).contiguous(memory_format=CL)
        row = {}
        for name, bn in (("torch 4-D", torch.nn.BatchNorm2d(64, track_running_stats=False)),
                         ("2-D view", BatchNorm2d(64, track_running_stats=False))):
            wrt = (xc, bn.weight, bn.bias)

            def second(bn=bn, wrt=wrt, xc=xc, g=g) -> None:
                grads = torch.autograd.grad((bn(xc) * g).sum(), wrt, create_graph=True)
                torch.autograd.grad(sum((a * a).sum() for a in grads), wrt[1:], allow_unused=True)

            def both(bn=bn, wrt=wrt, xc=xc, g=g) -> None:
                torch.autograd.grad(bn(xc), wrt, g)

            row[name] = {
                "forward": timed(lambda bn=bn, xc=xc: bn(xc), repeats) * 1e3,
                "forward+backward": timed(both, repeats) * 1e3,
                "second order": timed(second, repeats) * 1e3,
            }
        out["batchnorm_ms"][f"[{n}, 64, 28, 28]"] = row
    xi = to_channels_last({"x": images})["x"]
    w = torch.randn(64, 1, 3, 3, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    g = torch.randn(75, 64, 28, 28).contiguous(memory_format=CL)

    def im2col(x: torch.Tensor) -> torch.Tensor:
        n, _, h, wd = x.shape
        xp = F.pad(x[:, 0], (1, 1, 1, 1))
        s0, s1, s2 = xp.stride()
        win = xp.as_strided((n, h, wd, 3, 3), (s0, s1, s2, s1, s2)).reshape(n * h * wd, 9)
        return torch.addmm(b, win, w.view(64, 9).t()).view(n, h, wd, 64).permute(0, 3, 1, 2)

    out["conv1_ms"] = {
        "oneDNN channels-last": {
            "forward": timed(lambda: F.conv2d(xi, w, b, padding=1), repeats) * 1e3,
            "forward+backward": timed(lambda: torch.autograd.grad(F.conv2d(xi, w, b, padding=1), (w, b), g),
                                      repeats) * 1e3,
        },
        "im2col matmul": {
            "forward": timed(lambda: im2col(images), repeats) * 1e3,
            "forward+backward": timed(lambda: torch.autograd.grad(im2col(images), (w, b), g), repeats) * 1e3,
        },
    }
    return out


def meta_iteration(impl: str, tune: bool, iters: int) -> dict:
    """Run in a fresh process (2 threads): seconds and page faults per meta-iteration."""
    from dataclasses import replace

    from bench import SETTINGS, make_batch, make_impl, make_model

    from innerloop.runtime import tune_malloc

    tuned = tune_malloc() if tune else False
    setting = replace(SETTINGS["omniglot-2nd"], meta_batch=8)
    meta_grad = make_impl(impl, setting, make_model(setting))
    batch = make_batch(setting, torch.device("cpu"))
    meta_grad(batch)
    meta_grad(batch)
    times, faults = [], []
    for _ in range(iters):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        meta_grad(batch)
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"tuned": tuned, "s": statistics.median(times), "faults": statistics.median(faults)}


def compiled_query(iters: int) -> dict:
    """Second-order MAML, one task at a time, with the query pass eager or ``torch.compile``d."""
    from dataclasses import replace

    from bench import SETTINGS, make_batch, make_model
    from torch.func import functional_call

    from innerloop.algorithms.base import to_channels_last
    from innerloop.runtime import tune_malloc

    tune_malloc()
    setting = replace(SETTINGS["omniglot-2nd"], meta_batch=8)
    model, batch = make_model(setting), make_batch(setting, torch.device("cpu"))
    params = dict(model.named_parameters())

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    compiled = torch.compile(loss, dynamic=False)

    def step(query_loss: Callable) -> list[torch.Tensor]:
        laid = to_channels_last(params)
        total = [torch.zeros_like(p) for p in params.values()]
        for i in range(len(batch)):
            t = to_channels_last({"s": batch.support_x[i], "q": batch.query_x[i]})
            support = loss(laid, t["s"], batch.support_y[i])
            grads = torch.autograd.grad(support, list(laid.values()), create_graph=True)
            fast = {k: v - setting.inner_lr * g for (k, v), g in zip(laid.items(), grads, strict=True)}
            q = query_loss(fast, t["q"], batch.query_y[i]) / len(batch)
            for acc, g in zip(total, torch.autograd.grad(q, list(params.values())), strict=True):
                acc += g
        return total

    t0 = time.perf_counter()
    a = step(compiled)
    compile_s = time.perf_counter() - t0
    b = step(loss)
    va, vb = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    eager, comp = [], []
    for _ in range(iters):
        for fn, out in ((loss, eager), (compiled, comp)):
            t0 = time.perf_counter()
            step(fn)
            out.append(time.perf_counter() - t0)
    return {"eager_s": statistics.median(eager), "compiled_s": statistics.median(comp),
            "first_call_s": compile_s, "rel_err": float((va - vb).norm() / vb.norm())}


def _child(mode: str, arg: str, threads: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "INNERLOOP_TUNE_MALLOC"):
        env.pop(k, None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--arg", arg, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(result: dict) -> str:
    k = result["kernels"]
    bn, pool = k["batchnorm_ms"], k["maxpool_ms"]
    lines = [
        "# Kernel-level levers of the CPU fast path (issue 5)",
        "",
        f"Command: `{result['command']}`. Machine: {result['cpu']}, torch {result['torch']}, 1 thread "
        "(part 4: 2 threads), float32. "
        f"Start {result['start']} (load average {result['load'][0]:.2f}); medians of {result['repeats']} runs.",
        "",
        "## 1. One-channel images and the layout",
        "",
        f"`images.contiguous(memory_format=torch.channels_last)` of a `[75, 1, 28, 28]` batch keeps the strides "
        f"{k['layout']['contiguous(channels_last) strides']} (torch reads them as NCHW, so the first conv, its "
        f"BatchNorm and max-pool run the NCHW kernels); innerloop's layout step gives "
        f"{k['layout']['innerloop strides']}.",
        "",
        f"max-pool 2x2 with indices on `[75, 64, 28, 28]`: NCHW {pool['nchw']:.2f} ms, channels-last "
        f"{pool['channels_last']:.2f} ms ({pool['nchw'] / pool['channels_last']:.0f}x).",
        "",
        "## 2. BatchNorm: torch's 4-D channels-last kernel against the 2-D `[N*H*W, C]` view (ms)",
        "",
        "| input | kernel | forward | forward + backward | second order |",
        "|---|---|---|---|---|",
    ]
    for shape, rows in bn.items():
        for name, r in rows.items():
            lines.append(f"| {shape} | {name} | {r['forward']:.2f} | {r['forward+backward']:.2f} | "
                         f"{r['second order']:.2f} |")
    c = k["conv1_ms"]
    lines += [
        "",
        "## 3. The first convolution, 1 -> 64 channels, `[75, 1, 28, 28]` (ms; not adopted)",
        "",
        "| kernel | forward | forward + backward (weights) |",
        "|---|---|---|",
        *[f"| {name} | {r['forward']:.2f} | {r['forward+backward']:.2f} |" for name, r in c.items()],
        "",
        "## 4. glibc's malloc thresholds: one second-order meta-iteration (conv-4 5-way 1-shot, meta-batch 8, "
        "2 threads: innerloop's default with task threads, and `task_threads=1`)",
        "",
        "One row per fresh process (medians over its iterations after two warm-up iterations).",
        "",
        "| implementation, malloc | process | s / meta-iteration | minor page faults / meta-iteration |",
        "|---|---|---|---|",
    ]
    for name, runs in result["malloc"].items():
        for i, r in enumerate(runs):
            lines.append(f"| {name} | {i + 1} | {r['s']:.3f} | {r['faults']:.0f} |")
    q = result["compile"]
    lines += [
        "",
        "## 5. `torch.compile` of the query pass (same meta-iteration, one task at a time; not adopted)",
        "",
        f"eager {q['eager_s']:.3f} s, compiled {q['compiled_s']:.3f} s per meta-iteration (first call with "
        f"compilation {q['first_call_s']:.1f} s; meta-gradient relative difference {q['rel_err']:.1e}). "
        "The whole per-task step cannot be compiled for second order: torch 2.13 raises "
        "`torch.compile with aot_autograd does not currently support double backward`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--iters", type=int, default=5, help="meta-iterations per measurement in parts 4 and 5")
    p.add_argument("--malloc-procs", type=int, default=3, help="fresh processes per malloc setting in part 4")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--arg", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child == "malloc":
        impl, name = args.arg.split(":")
        print(json.dumps(meta_iteration(impl, name == "tuned", args.iters)))
        return
    if args.child == "compile":
        print(json.dumps(compiled_query(args.iters)))
        return
    from bench import _cpu_name

    result = {
        "command": " ".join(["python benchmarks/speed/levers.py", *sys.argv[1:]]), "cpu": _cpu_name(),
        "torch": torch.__version__, "start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load": os.getloadavg(), "repeats": args.repeats,
    }
    from innerloop.runtime import tune_malloc

    tune_malloc()
    result["kernels"] = kernels(args.repeats)
    # glibc's own thresholds adapt to the allocation history, which differs from process to process
    # (address-space layout): some processes fault every iteration, some settle. Several of each.
    result["malloc"] = {f"{impl}, {name}": [_child("malloc", f"{impl}:{name}", threads=2)
                                            for _ in range(args.malloc_procs)]
                        for impl in ("innerloop", "innerloop-intraop") for name in ("glibc's own", "tuned")}
    result["compile"] = _child("compile", "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed_levers_kernels.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "speed_levers_kernels.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
