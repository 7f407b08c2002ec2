"""MAML meta-training speed and memory: innerloop against learn2learn, higher and torchopt.

The same math in every library, in one run: the Omniglot-shaped conv-4 MAML (5-way 1-shot, 15
queries per class, 1x28x28 images, 64 filters, BatchNorm with batch statistics, max-pool; inner
lr 0.4, Adam 1e-3 outside), its 5-step and 20-way variants, and the sinusoid MLP 1-40-40-1.

* Parity first: each implementation's meta-gradient for the same initial weights and batch,
  against innerloop's default (relative error of the whole gradient vector).
* Timing: every (implementation, setting) runs in its own fresh subprocess, so its max RSS is its
  own; rounds interleave the implementations (runs on this machine vary by 10-20%), and the
  median is over all timed meta-iterations (gradient + Adam step) after a warm-up.
* FLOPs of one meta-iteration (``torch.utils.flop_counter`` on innerloop's per-task loop) and
  the machine's measured float32 peaks (a large conv forward+backward, a large matmul).
* bfloat16 autocast on a CPU without native bfloat16 (AVX2 only) is several times slower than
  float32, so on CPU it is timed over ``--bf16-iters`` iterations in one round only.
* ``--impls innerloop-mamlpp innerloop-imaml innerloop-reptile``: innerloop's MAML++, iMAML and
  Reptile too (only when named; no other library has them, so no rel_err and no parity for them).
* ``--old-src DIR``: against the old release as well. Each of innerloop, innerloop-mamlpp,
  innerloop-imaml, innerloop-reptile that runs gets a twin row ``<impl>-0.1.0`` whose worker imports
  innerloop from DIR (a checkout of 0.1.0, e.g. ``git worktree add /work/before 1d7e620``; first on
  its PYTHONPATH, and ``innerloop.__file__`` checked); the report adds the speed-up over 0.1.0, and
  each twin's meta-gradient is compared with its current counterpart's.

    bash benchmarks/speed/make_env.sh            # .venv-bench: torch 2.13.0 + the old libraries
    .venv-bench/bin/python benchmarks/speed/bench.py [--threads 2] [--rounds 2 --iters 10]
    .venv-bench/bin/python benchmarks/speed/bench.py --device cuda   # see gpu.sh

Writes benchmarks/results/speed.md, speed.json and speed_*.png (``--tag`` for another name).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
sys.path.insert(0, str(HERE))


@dataclass(frozen=True)
class Setting:
    """One benchmark problem: ``omniglot`` (conv-4) or ``sinusoid`` (MLP 1-40-40-1)."""

    problem: str
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch: int = 32
    steps: int = 1
    first_order: bool = False
    inner_lr: float = 0.4

    @property
    def label(self) -> str:
        order = "1st order" if self.first_order else "2nd order"
        if self.problem == "sinusoid":
            return f"sinusoid MLP 1-40-40-1, K=10+10, meta-batch {self.meta_batch}, {self.steps} step, {order}"
        step = f"{self.steps} inner step" + ("s" if self.steps > 1 else "")
        return f"conv-4 {self.ways}-way {self.shots}-shot, meta-batch {self.meta_batch}, {step}, {order}"


OMNI = Setting("omniglot")
SINE = Setting("sinusoid", ways=1, shots=10, queries=10, meta_batch=25, inner_lr=0.01)
SETTINGS: dict[str, Setting] = {
    "omniglot-2nd": OMNI,
    "omniglot-1st": replace(OMNI, first_order=True),
    "omniglot-5step-2nd": replace(OMNI, steps=5),
    "omniglot-20way-5step-2nd": replace(OMNI, ways=20, meta_batch=16, steps=5),
    "sinusoid-2nd": SINE,
    "sinusoid-1st": replace(SINE, first_order=True),
}

# Implementations. innerloop variants switch its levers off one at a time.
IMPLS: dict[str, str] = {
    "innerloop": "innerloop default: per-task loop over task threads (one intra-op thread each), channels-last, "
                 "max-pool before ReLU, fused inner update (sinusoid: vmap over tasks)",
    "innerloop-bf16": "innerloop default under torch.autocast(bfloat16)",
    "innerloop-intraop": "innerloop default but one task at a time, the threads inside each op (task_threads=1)",
    "innerloop-nomalloc": "innerloop default but glibc's own malloc thresholds (INNERLOOP_TUNE_MALLOC=0)",
    "innerloop-bn4d": "innerloop default but torch's BatchNorm2d kernels for the 4-D channels-last tensors",
    "innerloop-nchw": "innerloop default but contiguous (NCHW) layout",
    "innerloop-before": "innerloop as before this work: one task at a time (intra-op threads), NCHW, ReLU before "
                        "max-pool, torch.func.grad, glibc's malloc thresholds (the plain torch.func loop)",
    "innerloop-checkpoint": "innerloop default with checkpointed inner steps (checkpoint=True)",
    "learn2learn": "learn2learn 0.2.0 MAML (clone + adapt per task)",
    "learn2learn-malloc": "learn2learn 0.2.0 MAML with innerloop's malloc thresholds "
                          "(innerloop.runtime.tune_malloc called first): what the allocator lever gives it",
    "higher": "higher 0.2.1 innerloop_ctx per task",
    "torchopt": "torchopt 0.7.3 MetaSGD per task (extract/recover state dict)",
    "innerloop-mamlpp": "innerloop MAMLPlusPlus (per-step rates and BatchNorm weights, both meta-learned; MSL "
                        "off), the setting's inner lr, steps and order",
    "innerloop-imaml": "innerloop IMAML (implicit gradient by 5 CG steps, lambda 2), the setting's inner lr and "
                       "steps; always second order (the setting's order does not apply)",
    "innerloop-reptile": "innerloop Reptile (SGD inner loop), the setting's inner lr and steps; always first "
                         "order (the setting's order does not apply)",
}

# Other algorithms than MAML: timed only when named in --impls (the default run is MAML only). Their
# meta-gradient covers the algorithm's own parameters (MAML++'s step_lr / bn_steps too), and has no
# counterpart in the other libraries: no rel_err against innerloop's MAML, no parity mode.
ALGOS = ("innerloop-mamlpp", "innerloop-imaml", "innerloop-reptile")
# iMAML and Reptile have a fixed order: in the first-order settings they would repeat the same run.
FIXED_ORDER = ("innerloop-imaml", "innerloop-reptile")

# --old-src DIR: each of these gets a twin row "<impl>-0.1.0" whose worker imports innerloop from DIR
# (the old release, e.g. a git worktree of it), with everything else the same.
OLD = "-0.1.0"
OLD_TWINS = ("innerloop", *ALGOS)
IMPLS.update({f"{impl}{OLD}": f"{IMPLS[impl]}; innerloop 0.1.0 (imported from --old-src)" for impl in OLD_TWINS})


def base_impl(impl: str) -> str:
    """``innerloop-mamlpp-0.1.0`` -> ``innerloop-mamlpp``; other names unchanged."""
    return impl.removesuffix(OLD)


def is_old(impl: str) -> bool:
    return impl.endswith(OLD)


# Variants that switch one lever off (timed in the first round only, unless --lever-all-rounds).
LEVERS = ("innerloop-nomalloc", "innerloop-bn4d", "innerloop-nchw", "innerloop-before")


# -- problems -----------------------------------------------------------------------------------
def make_model(setting: Setting, relu_first: bool = False, torch_bn: bool = False) -> nn.Module:
    """The model with seed-0 weights; ``relu_first`` swaps conv-4's blocks to conv, BN, ReLU, pool
    (the usual order; the same function and parameters as innerloop's Conv4); ``torch_bn`` uses
    ``torch.nn.BatchNorm2d`` instead of innerloop's (the same function; other kernels)."""
    torch.manual_seed(0)
    if setting.problem == "sinusoid":
        from innerloop.models import MLP

        return MLP(1, 1, hidden=(40, 40))
    from innerloop.models.conv4 import Conv4

    model = Conv4(1, setting.ways, 64, 28)
    if torch_bn:
        for block in list(model.features)[:4]:
            bn = nn.BatchNorm2d(64, track_running_stats=False)
            bn.load_state_dict(block[1].state_dict())
            block[1] = bn
    if relu_first:
        for block in list(model.features)[:4]:
            block[2], block[3] = block[3], block[2]
    return model


def make_batch(setting: Setting, device: torch.device):
    """A fixed meta-batch (seeded): ``TaskBatch`` of ``[tasks, examples, ...]`` tensors."""
    from innerloop.tasks import TaskBatch

    if setting.problem == "sinusoid":
        from innerloop.data import make_family

        fam = make_family("sinusoid", shots=setting.shots, queries=setting.queries, seed=0)
        return fam.batch("train", range(setting.meta_batch)).to(device=device)
    g = torch.Generator().manual_seed(0)
    t, w = setting.meta_batch, setting.ways
    batch = TaskBatch(
        torch.rand(t, w * setting.shots, 1, 28, 28, generator=g),
        torch.arange(w).repeat_interleave(setting.shots).expand(t, -1).clone(),
        torch.rand(t, w * setting.queries, 1, 28, 28, generator=g),
        torch.arange(w).repeat_interleave(setting.queries).expand(t, -1).clone(),
    )
    return batch.to(device=device)


def loss_fn(setting: Setting) -> Callable[[Tensor, Tensor], Tensor]:
    return F.mse_loss if setting.problem == "sinusoid" else F.cross_entropy


# -- implementations: each returns ``meta_grad(batch) -> [grad per model parameter]`` ----------------
def impl_innerloop(lib: str, setting: Setting, model: nn.Module):
    from innerloop.algorithms import MAML

    objective = "regression" if setting.problem == "sinusoid" else "classification"
    fmt = "contiguous" if lib in ("innerloop-nchw", "innerloop-before") else "auto"
    threads = 1 if lib in ("innerloop-intraop", "innerloop-before") else None
    maml = MAML(model, objective, inner_lr=setting.inner_lr, inner_steps=setting.steps,
                first_order=setting.first_order, memory_format=fmt, checkpoint=lib == "innerloop-checkpoint",
                task_threads=threads)
    names = [f"model.{n}" for n, _ in model.named_parameters()]

    def meta_grad(batch) -> list[Tensor]:
        if lib == "innerloop-bf16":
            with torch.autocast(batch.support_x.device.type, dtype=torch.bfloat16):
                grads, _ = maml.meta_gradient(batch)
        else:
            grads, _ = maml.meta_gradient(batch)
        return [grads[n] for n in names]

    return meta_grad


def impl_algorithm(lib: str, setting: Setting, model: nn.Module):
    """MAML++, iMAML or Reptile from innerloop.algorithms (keyword arguments only: the old and the new
    versions both take these names). Returns ``(meta_grad, params)``: the gradient of every one of
    the algorithm's own parameters (``model.<name>``, and MAML++'s ``step_lr.*`` / ``bn_steps.*``),
    and those parameters, for the worker's Adam step."""
    from innerloop.algorithms import IMAML, MAMLPlusPlus, Reptile

    objective = "regression" if setting.problem == "sinusoid" else "classification"
    common = {"inner_lr": setting.inner_lr, "inner_steps": setting.steps}
    if lib == "innerloop-mamlpp":
        alg = MAMLPlusPlus(model, objective, first_order=setting.first_order, **common)
    elif lib == "innerloop-imaml":
        alg = IMAML(model, objective, **common)
    elif lib == "innerloop-reptile":
        alg = Reptile(model, objective, **common)
    else:
        raise ValueError(f"unknown algorithm implementation {lib!r}")
    named = list(alg.named_parameters())

    def meta_grad(batch) -> list[Tensor]:
        grads, _ = alg.meta_gradient(batch)
        return [grads[n] for n, _ in named]

    return meta_grad, [p for _, p in named]


def impl_learn2learn(setting: Setting, model: nn.Module):
    import stubs

    stubs.install()
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=setting.inner_lr, first_order=setting.first_order)
    loss = loss_fn(setting)

    def meta_grad(batch) -> list[Tensor]:
        model.zero_grad(set_to_none=True)
        n = len(batch)
        for i in range(n):
            learner = maml.clone()
            for _ in range(setting.steps):
                learner.adapt(loss(learner(batch.support_x[i]), batch.support_y[i]))
            (loss(learner(batch.query_x[i]), batch.query_y[i]) / n).backward()
        return [p.grad for p in model.parameters()]

    return meta_grad


def impl_higher(setting: Setting, model: nn.Module):
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=setting.inner_lr)
    loss = loss_fn(setting)
    params = list(model.parameters())

    def meta_grad(batch) -> list[Tensor]:
        total = [torch.zeros_like(p) for p in params]
        n = len(batch)
        for i in range(n):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                      track_higher_grads=not setting.first_order) as (fmodel, diffopt):
                for _ in range(setting.steps):
                    diffopt.step(loss(fmodel(batch.support_x[i]), batch.support_y[i]))
                query = loss(fmodel(batch.query_x[i]), batch.query_y[i]) / n
                # Second order: back to the initial weights; first order (no tracked history):
                # the gradient at the adapted weights, which is FOMAML's meta-gradient.
                wrt = params if not setting.first_order else list(fmodel.parameters())
                for t, g in zip(total, torch.autograd.grad(query, wrt), strict=True):
                    t += g
        return total

    return meta_grad


def impl_torchopt(setting: Setting, model: nn.Module):
    import torchopt

    if setting.first_order:
        raise NotImplementedError("torchopt's MetaSGD has no first-order mode")
    inner_opt = torchopt.MetaSGD(model, lr=setting.inner_lr)
    loss = loss_fn(setting)

    def meta_grad(batch) -> list[Tensor]:
        model.zero_grad(set_to_none=True)
        net_state = torchopt.extract_state_dict(model)
        opt_state = torchopt.extract_state_dict(inner_opt)
        n = len(batch)
        for i in range(n):
            for _ in range(setting.steps):
                inner_opt.step(loss(model(batch.support_x[i]), batch.support_y[i]))
            (loss(model(batch.query_x[i]), batch.query_y[i]) / n).backward()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        return [p.grad for p in model.parameters()]

    return meta_grad


def make_impl(lib: str, setting: Setting, model: nn.Module) -> tuple[Callable, list[nn.Parameter]]:
    """``(meta_grad, params)``: the meta-gradient function and the parameters its gradients are for
    (the model's, in order, for the MAML implementations; the algorithm's own for ``ALGOS``). An
    ``-0.1.0`` twin is built like its base: which innerloop it imports is decided by sys.path."""
    lib = base_impl(lib)
    if lib in ALGOS:
        return impl_algorithm(lib, setting, model)
    if lib == "learn2learn-malloc":
        from innerloop.runtime import tune_malloc

        if not tune_malloc():
            raise RuntimeError("innerloop.runtime.tune_malloc() did not apply here")
        fn = impl_learn2learn(setting, model)
    elif lib.startswith("innerloop"):
        fn = impl_innerloop(lib, setting, model)
    else:
        others = {"learn2learn": impl_learn2learn, "higher": impl_higher, "torchopt": impl_torchopt}
        fn = others[lib](setting, model)
    return fn, list(model.parameters())


def check_innerloop_source(impl: str, old_src: str) -> str:
    """Import innerloop and check it is the copy this row should time: the one under ``old_src``
    for an ``-0.1.0`` twin (put first on sys.path by run_worker's PYTHONPATH, and here again),
    any other for the rest. Returns ``innerloop.__file__``."""
    if is_old(impl):
        if not old_src:
            raise RuntimeError(f"{impl} needs --old-src")
        sys.path.insert(0, old_src)
    import innerloop

    path = Path(innerloop.__file__).resolve()
    inside = bool(old_src) and path.is_relative_to(Path(old_src).resolve())
    if inside != is_old(impl):
        raise RuntimeError(f"{impl} imported innerloop from {path} (--old-src {old_src or 'not given'})")
    return str(path)


# -- the worker: one (implementation, setting) in a fresh process --------------------------------
def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> dict:
    source = check_innerloop_source(args.impl, args.old_src)  # before anything else imports innerloop
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setting = SETTINGS[args.setting] if args.setting in SETTINGS else Setting(**json.loads(args.setting))
    impl = base_impl(args.impl)
    model = make_model(setting, relu_first=impl == "innerloop-before",
                       torch_bn=impl in ("innerloop-before", "innerloop-bn4d")).to(device)
    batch = make_batch(setting, device)
    if args.float64:  # the same float32 weights and batch, in float64
        model = model.double()
        batch = type(batch)(*(t.double() if t.is_floating_point() else t for t in
                              (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
        torch.set_default_dtype(torch.float64)
    meta_grad, params = make_impl(args.impl, setting, model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"impl": args.impl, "threads": args.threads, "innerloop_file": source}
    if args.grad_out:
        grads = meta_grad(batch)
        torch.save([g.detach().double().cpu().contiguous() for g in grads], args.grad_out)
    opt = torch.optim.Adam(params, lr=1e-3)

    def iteration() -> None:
        for p, g in zip(params, meta_grad(batch), strict=True):
            p.grad = g
        opt.step()
        sync()

    for _ in range(args.warmup):
        iteration()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - t0)
    out["times"] = times
    out["max_rss"] = max_rss_bytes()
    if device.type == "cuda":
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out


def flops_worker(args: argparse.Namespace) -> dict:
    """FLOPs of one meta-iteration, counted on innerloop's per-task loop (NCHW: the counter's
    formulas do not depend on the layout)."""
    from torch.utils.flop_counter import FlopCounterMode

    setting = SETTINGS[args.setting] if args.setting in SETTINGS else Setting(**json.loads(args.setting))
    model = make_model(setting)
    meta_grad, _ = make_impl("innerloop-before", setting, model)
    batch = make_batch(setting, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        meta_grad(batch)
    return {"flops": counter.get_total_flops()}


def peak_worker(args: argparse.Namespace) -> dict:
    """The machine's float32 peaks: a large 3x3 conv forward+backward (64 -> 64 channels,
    [128, 64, 28, 28], NCHW and channels-last; the better one) and a 2048^3 matmul; bf16 too."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def best(fn: Callable[[], None], flops: float, repeats: int = 5) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return flops / min(times)  # a peak: the best run (other jobs only ever slow it down)

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = "fp32" if dtype == torch.float32 else "bf16"
        m = 2048 if dtype == torch.float32 or device.type == "cuda" else 512
        a = torch.randn(m, m, device=device, dtype=dtype)
        b = torch.randn(m, m, device=device, dtype=dtype)
        out[f"matmul_{name}"] = best(lambda a=a, b=b: torch.mm(a, b), 2 * m**3)
        conv_rates = []
        # bfloat16 without native CPU support (no AVX512-BF16 / AMX) is slow: a smaller batch.
        n = 128 if dtype == torch.float32 or device.type == "cuda" else 16
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(n, 64, 28, 28, device=device, dtype=dtype).contiguous(memory_format=fmt)
            w = torch.randn(64, 64, 3, 3, device=device, dtype=dtype).contiguous(memory_format=fmt)
            w.requires_grad_()
            x.requires_grad_()
            flops = 3 * 2 * n * 64 * 64 * 9 * 28 * 28  # forward, grad input, grad weight

            def conv(x=x, w=w) -> None:
                y = F.conv2d(x, w, padding=1)
                torch.autograd.grad(y, (x, w), torch.ones_like(y))

            conv_rates.append(best(conv, flops))
        out[f"conv_{name}"] = max(conv_rates)
    return out


# -- the driver ----------------------------------------------------------------------------------
MMAP_THRESHOLD = 0  # set from --mmap-threshold
OLD_SRC = ""  # set from --old-src


def run_worker(python: str, mode: str, extra: list[str], threads: int, device: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    impl = extra[extra.index("--impl") + 1] if "--impl" in extra else ""
    if base_impl(impl) in ("innerloop-nomalloc", "innerloop-before"):
        env["INNERLOOP_TUNE_MALLOC"] = "0"
    if OLD_SRC:
        # Every worker is told --old-src (it checks which innerloop it imported); an -0.1.0 twin also
        # gets it first on PYTHONPATH, ahead of the editable install's finder.
        extra = [*extra, "--old-src", OLD_SRC]
        if is_old(impl):
            env["PYTHONPATH"] = os.pathsep.join([OLD_SRC, *filter(None, [os.environ.get("PYTHONPATH")])])
    if MMAP_THRESHOLD:
        # glibc serves allocations above this size by mmap and returns them on free, so max RSS is
        # the peak of live memory rather than of the heap that freed tensors leave fragmented.
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    cmd = [python, str(Path(__file__).resolve()), "--mode", mode, "--threads", str(threads),
           "--device", device, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rel_err_reference(impl: str) -> str | None:
    """Whose meta-gradient a row's is compared with: a twin with its base (the same algorithm, new
    and old), ALGOS with nothing (no other MAML++ / iMAML / Reptile here), the rest with innerloop."""
    if is_old(impl):
        return base_impl(impl)
    return None if impl in ALGOS else "innerloop"


def _git_commit(path: str) -> str:
    proc = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    """``||a - b|| / ||b||`` over the whole meta-gradient (per-tensor errors are meaningless for
    the conv biases before BatchNorm, whose true gradient is 0)."""
    va = torch.cat([t.flatten() for t in a])
    vb = torch.cat([t.flatten() for t in b])
    return float((va - vb).norm() / vb.norm())


def available_libs() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("learn2learn", "higher", "torchopt"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = ""
    return out


def plan(args: argparse.Namespace) -> dict[str, list[str]]:
    libs = [lib for lib, version in available_libs().items() if version]
    core = ["innerloop", *libs]
    l2l_malloc = ["learn2learn-malloc"] if "learn2learn" in libs else []
    chosen = {
        "omniglot-2nd": ["innerloop", "innerloop-intraop", *LEVERS, "innerloop-bf16", *libs, *l2l_malloc],
        "omniglot-1st": ["innerloop", "innerloop-intraop", *LEVERS, "innerloop-bf16",
                         *[lib for lib in libs if lib != "torchopt"], *l2l_malloc],
        "omniglot-5step-2nd": [*core, "innerloop-checkpoint"],
        "omniglot-20way-5step-2nd": core,
        "sinusoid-2nd": core,
        "sinusoid-1st": [lib for lib in core if lib != "torchopt"],
    }
    for name in ("omniglot-2nd", "omniglot-1st", "sinusoid-2nd", "sinusoid-1st"):
        chosen[name] += [a for a in ALGOS if not (a in FIXED_ORDER and SETTINGS[name].first_order)]
    # With --old-src, the 0.1.0 twin right after its base (so its rel_err is against it).
    chosen = {s: [j for i in impls for j in (i, f"{i}{OLD}") if j == i or (args.old_src and i in OLD_TWINS)]
              for s, impls in chosen.items()}
    if args.impls:  # a twin comes with its base; ALGOS only when named
        wanted = {*args.impls, *[f"{i}{OLD}" for i in args.impls if i in OLD_TWINS]}
        chosen = {s: [i for i in impls if i in wanted] for s, impls in chosen.items()}
    else:
        chosen = {s: [i for i in impls if base_impl(i) not in ALGOS] for s, impls in chosen.items()}
    return {s: chosen[s] for s in args.settings}


def main_run(args: argparse.Namespace) -> None:
    python = sys.executable
    start = {"time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load": os.getloadavg()}
    print(f"start {start}", flush=True)
    todo = plan(args)
    planned = {i for impls in todo.values() for i in impls}
    # The descriptions of the usual implementations, and of ALGOS and the twins only when they run.
    impls_shown = {k: v for k, v in IMPLS.items() if k in planned or not (is_old(k) or k in ALGOS)}
    result: dict = {
        "command": " ".join(["python benchmarks/speed/bench.py", *sys.argv[1:]]),
        "torch": torch.__version__, "device": args.device, "threads": args.threads, "cpu_count": os.cpu_count(),
        "libs": available_libs(), "impls": impls_shown, "start": start, "settings": {}, "peak": {},
        "mmap_threshold": args.mmap_threshold,
    }
    if args.old_src:
        result["old_src"] = {"path": args.old_src, "commit": _git_commit(args.old_src)}
    if args.device == "cpu":
        result["cpu"] = _cpu_name()
    result["peak"] = run_worker(python, "peak", [], args.threads, args.device)
    print("peak", result["peak"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, impls in todo.items():
            setting = SETTINGS[name]
            if args.meta_batch is not None:
                setting = replace(setting, meta_batch=args.meta_batch)
            spec = json.dumps(asdict(setting))
            entry: dict = {"setting": asdict(setting), "label": setting.label, "impls": {}}
            if setting.problem == "omniglot":  # counted on CPU: the count does not depend on the device
                entry["flops"] = run_worker(python, "flops", ["--setting", spec], args.threads, "cpu").get("flops")
            round0: dict[str, list[Tensor]] = {}  # round-0 meta-gradients, for rel_err
            for r in range(args.rounds):
                for impl in impls:
                    slow = impl == "innerloop-bf16" and args.device == "cpu"
                    lever = impl in (*LEVERS, "innerloop-checkpoint")
                    if (slow or (lever and not args.lever_all_rounds)) and r > 0:
                        continue
                    iters, warmup = (args.iters, args.warmup)
                    if slow:
                        iters, warmup = args.bf16_iters, 0
                    elif lever and not args.lever_all_rounds:
                        iters = args.lever_iters
                    extra = ["--impl", impl, "--setting", spec, "--iters", str(iters), "--warmup", str(warmup)]
                    gpath = Path(tmp) / f"{name}-{impl}.pt"
                    if r == 0:
                        extra += ["--grad-out", str(gpath)]
                    res = run_worker(python, "worker", extra, args.threads, args.device)
                    e = entry["impls"].setdefault(impl, {"times": [], "max_rss": 0})
                    if "error" in res:
                        e["error"] = res["error"]
                        print(f"{name} {impl}: {res['error']}", flush=True)
                        continue
                    e["times"] += res["times"]
                    e["max_rss"] = max(e["max_rss"], res["max_rss"])
                    e["innerloop_file"] = res.get("innerloop_file")
                    if "cuda_peak" in res:
                        e["cuda_peak"] = max(e.get("cuda_peak", 0), res["cuda_peak"])
                    if r == 0:
                        round0[impl] = torch.load(gpath)
                        ref_name = rel_err_reference(impl)
                        ref = round0.get(ref_name) if ref_name else None
                        try:
                            e["rel_err"] = rel_err(round0[impl], ref) if ref is not None else None
                        except RuntimeError:  # e.g. a twin whose algorithm has other parameters
                            e["rel_err"] = None
                        if ref_name and ref_name != "innerloop":
                            e["rel_err_vs"] = ref_name
                    print(f"{name} {impl} round {r}: median {statistics.median(res['times']):.3f} s, "
                          f"rss {res['max_rss'] / 2**30:.2f} GiB, rel_err {e.get('rel_err')}", flush=True)
            for e in entry["impls"].values():
                if e["times"]:
                    e["median_s"] = statistics.median(e["times"])
            result["settings"][name] = entry
            save(result, args.tag, final=False)  # a run stopped early still leaves its finished settings
    if args.sweeps:
        result["sweeps"] = sweeps(python, args)
        result["sweep_batch"] = args.sweep_batch
    # The peaks again at the end; the higher of the two counts (a busy moment only lowers them).
    end = run_worker(python, "peak", [], args.threads, args.device)
    result["peak_start"] = dict(result["peak"])
    result["peak"] = {k: max(v, end.get(k, 0.0)) for k, v in result["peak"].items()}
    save(result, args.tag, final=True)


def main_parity(args: argparse.Namespace) -> None:
    """Meta-gradients only (no timing): every implementation in float32 and in float64, each
    compared with innerloop's float64 meta-gradient. Float64 agreement shows the libraries compute
    the same function; the float32 errors show what rounding does to it (the mean of many tasks'
    gradients cancels, so it grows with the meta-batch)."""
    python = sys.executable
    libs = [lib for lib, version in available_libs().items() if version]
    twin = [f"innerloop{OLD}"] if args.old_src else []  # MAML only: parity of the other algorithms is not run
    impls = [i for i in ("innerloop", *twin, "innerloop-intraop", "innerloop-before", *libs) if not args.impls
             or i in args.impls or (i in twin and "innerloop" in args.impls)]
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            setting = SETTINGS[name] if args.meta_batch is None else replace(SETTINGS[name],
                                                                             meta_batch=args.meta_batch)
            spec = json.dumps(asdict(setting))
            grads: dict = {}
            for dtype in ("float64", "float32"):
                for impl in impls:
                    if impl == "torchopt" and setting.first_order:
                        continue
                    path = Path(tmp) / f"{name}-{impl}-{dtype}.pt"
                    extra = ["--impl", impl, "--setting", spec, "--iters", "0", "--warmup", "0",
                             "--grad-out", str(path), *(["--float64"] if dtype == "float64" else [])]
                    res = run_worker(python, "worker", extra, args.threads, args.device)
                    if "error" in res:
                        print(f"{name} {impl} {dtype}: {res['error']}", flush=True)
                        continue
                    grads[impl, dtype] = torch.load(path)
            ref = grads.get(("innerloop", "float64"))
            rows[name] = {"label": setting.label, "impls": {
                impl: {dtype: rel_err(grads[impl, dtype], ref) for dtype in ("float64", "float32")
                       if (impl, dtype) in grads and ref is not None}
                for impl in impls}}
            print(name, json.dumps(rows[name]["impls"]), flush=True)
    result = {"command": " ".join(["python benchmarks/speed/bench.py", *sys.argv[1:]]), "torch": torch.__version__,
              "libs": available_libs(), "cpu": _cpu_name(), "threads": args.threads, "settings": rows,
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    lines = ["# Meta-gradient parity: float64 and float32 against innerloop's float64", "",
             f"Command: `{result['command']}`. {result['cpu']}, torch {result['torch']}, {args.threads} threads, "
             f"{result['time']}. The same initial weights and meta-batch as the speed benchmark; relative error "
             "`||g - g_ref|| / ||g_ref||` of the whole meta-gradient, `g_ref` = innerloop in float64.", ""]
    for entry in rows.values():
        lines += [f"### {entry['label']}", "", "| implementation | float64 | float32 |", "|---|---|---|"]
        for impl, errs in entry["impls"].items():
            cells = [f"{errs[d]:.1e}" if d in errs else "-" for d in ("float64", "float32")]
            lines.append(f"| {impl} | {cells[0]} | {cells[1]} |")
        lines.append("")
    (RESULTS / f"{args.tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def save(result: dict, tag: str, final: bool) -> None:
    """Write <tag>.json and, through report.py, <tag>.md and the plots; ``end`` is the time and load
    average now (``partial`` until the run is complete)."""
    import report

    result["end"] = {"time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load": os.getloadavg()}
    result["partial"] = not final
    print(f"end {result['end']}" if final else f"saved so far ({result['end']})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(result, indent=1))
    report.write(tag)


def sweeps(python: str, args: argparse.Namespace) -> dict:
    """Time per meta-iteration against meta-batch size, inner steps and ways, and max RSS against
    inner steps (few iterations each: the shape of the curves, not the headline numbers)."""
    libs = [lib for lib in ("learn2learn",) if available_libs().get(lib)]
    base = replace(OMNI, meta_batch=args.sweep_batch)
    axes: dict[str, list[tuple[float, Setting]]] = {
        "meta_batch": [(b, replace(OMNI, meta_batch=b)) for b in (2, 4, 8, 16)],
        "steps": [(k, replace(base, steps=k)) for k in (1, 2, 3, 5)],
        "ways": [(w, replace(base, ways=w)) for w in (5, 10, 20)],
        "memory_steps": [(k, replace(base, meta_batch=2, steps=k)) for k in (1, 2, 4, 8, 16)],
        # A larger support set (100 images), where the support activations dominate memory.
        "memory_steps_20way5shot": [(k, replace(OMNI, ways=20, shots=5, queries=5, meta_batch=1, steps=k))
                                    for k in (1, 2, 4, 8)],
    }
    axes = {k: v for k, v in axes.items() if k in args.sweep_axes}
    out: dict = {}
    for axis, points in axes.items():
        impls = ["innerloop", *libs]
        if axis.startswith("memory_steps"):
            impls = ["innerloop", "innerloop-checkpoint", "innerloop-1st", *libs]
        for x, setting in points:
            for impl in impls:
                s = replace(setting, first_order=True) if impl == "innerloop-1st" else setting
                real = "innerloop" if impl == "innerloop-1st" else impl
                extra = ["--impl", real, "--setting", json.dumps(asdict(s)), "--iters", str(args.sweep_iters),
                         "--warmup", "1"]
                res = run_worker(python, "worker", extra, args.threads, args.device)
                row = out.setdefault(axis, {}).setdefault(impl, [])
                if "error" in res:
                    print(f"sweep {axis}={x} {impl}: {res['error']}", flush=True)
                    continue
                row.append({"x": x, "median_s": statistics.median(res["times"]), "max_rss": res["max_rss"],
                            **({"cuda_peak": res["cuda_peak"]} if "cuda_peak" in res else {})})
                print(f"sweep {axis}={x} {impl}: {row[-1]}", flush=True)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("run", "parity", "worker", "flops", "peak", "report"), default="run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (a fresh process each)")
    p.add_argument("--iters", type=int, default=10, help="timed meta-iterations per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=None, help="override every setting's (smoke tests only)")
    p.add_argument("--bf16-iters", type=int, default=3,
                   help="timed iterations of bfloat16 on CPU, one round (no native bf16 on AVX2: very slow)")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), help="only these implementations")
    p.add_argument("--sweeps", action="store_true", help="also the scaling and memory sweeps (plots)")
    p.add_argument("--sweep-iters", type=int, default=3)
    p.add_argument("--sweep-batch", type=int, default=4, help="meta-batch of the steps and ways sweeps")
    p.add_argument("--sweep-axes", nargs="+", default=["meta_batch", "steps", "ways", "memory_steps"],
                   choices=["meta_batch", "steps", "ways", "memory_steps", "memory_steps_20way5shot"])
    p.add_argument("--lever-iters", type=int, default=5,
                   help="timed iterations (one round) of innerloop-nchw, -before, -checkpoint")
    p.add_argument("--lever-all-rounds", action="store_true", help="time the lever variants like the rest")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="MALLOC_MMAP_THRESHOLD_ for the workers (0: glibc's default); for memory sweeps")
    p.add_argument("--tag", default="speed", help="results file name under benchmarks/results/")
    p.add_argument("--old-src", default="", metavar="DIR",
                   help="a checkout of innerloop 0.1.0 (DIR/innerloop/__init__.py): adds a row <impl>-0.1.0 "
                        f"importing innerloop from DIR for each of {', '.join(OLD_TWINS)} that runs")
    p.add_argument("--impl", default="innerloop", choices=list(IMPLS))
    p.add_argument("--setting", default="omniglot-2nd")
    p.add_argument("--grad-out", default="")
    p.add_argument("--float64", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    global MMAP_THRESHOLD, OLD_SRC
    MMAP_THRESHOLD = args.mmap_threshold
    if args.old_src:
        args.old_src = str(Path(args.old_src).resolve())
        if not (Path(args.old_src) / "innerloop" / "__init__.py").is_file():
            p.error(f"--old-src {args.old_src}: no innerloop/__init__.py there")
    elif args.mode in ("run", "parity") and args.impls and any(is_old(i) for i in args.impls):
        p.error("the -0.1.0 implementations need --old-src")
    OLD_SRC = args.old_src
    if args.mode == "run":
        main_run(args)
    elif args.mode == "parity":
        main_parity(args)
    elif args.mode == "report":
        import report

        report.write(args.tag)
    else:
        fn = {"worker": worker, "flops": flops_worker, "peak": peak_worker}[args.mode]
        print(json.dumps(fn(args)))


if __name__ == "__main__":
    main()
