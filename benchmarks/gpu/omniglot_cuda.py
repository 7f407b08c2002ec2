"""Omniglot MAML 5-way 1-shot on a GPU within a time budget: accuracy on 600 fixed test tasks and wall time.

The paper's set-up (``configs/omniglot_maml_5w1s.toml``: conv-4, 64 filters, strided convolutions,
BatchNorm with batch statistics, one inner step of 0.4, second order, meta-batch 32, Adam 1e-3), for as
many iterations as ``--budget-s`` seconds of training allow (measured on a few meta-iterations first),
at most ``--max-iterations``. Writes ``omniglot_cuda.json`` into ``--out``.

    python benchmarks/gpu/omniglot_cuda.py --device cuda --out "$OUT" --budget-s 150
    python benchmarks/gpu/omniglot_cuda.py --device cpu --out /tmp/x --dry-run     # tiny, on a CPU

Data: ``$INNERLOOP_DATA/omniglot`` (``shared/data`` or ``../shared/data`` when unset).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from innerloop.training.config import load_config
from innerloop.training.device import place, to_device
from innerloop.training.run import build_algorithm, build_family, run

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "omniglot_maml_5w1s.toml"


def data_root() -> str:
    if os.environ.get("INNERLOOP_DATA"):
        return os.environ["INNERLOOP_DATA"]
    for candidate in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
        if (candidate / "omniglot").is_dir():
            os.environ["INNERLOOP_DATA"] = str(candidate)
            return str(candidate)
    raise SystemExit("no Omniglot: set INNERLOOP_DATA to the folder holding omniglot/ (shared/data).")


def seconds_per_iteration(cfg, family, probes: int) -> float:
    """The median time of ``probes`` meta-gradients and Adam steps (after two warm-ups) on this device."""
    alg = build_algorithm(cfg, family)
    device = place(alg, cfg.execution.device, cfg.execution.precision)
    opt = torch.optim.Adam(alg.parameters(), lr=cfg.train.outer_lr)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(probes + 2):
        batch = to_device(family.batch("train", range(i * 32, i * 32 + cfg.train.meta_batch_size)), device)
        sync()
        t0 = time.perf_counter()
        grads, _ = alg.meta_gradient(batch)
        for n, p in alg.trainable().items():
            p.grad = grads[n]
        opt.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=150.0, help="seconds of meta-training")
    p.add_argument("--max-iterations", type=int, default=20000)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--dry-run", action="store_true", help="a tiny run (meta-batch 2, 3 iterations, 10 tasks)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    root = data_root()
    t_start = time.perf_counter()
    run_dir = tempfile.mkdtemp(prefix="omniglot_cuda_")  # checkpoints stay out of --out
    changes: dict = {"out_dir": run_dir, "execution.device": args.device,
                     "eval.test_tasks": args.test_tasks}
    if args.dry_run:
        changes.update({"train.meta_batch_size": 2, "model.filters": 8, "eval.test_tasks": 10,
                        "train.val_tasks": 4})
    cfg = load_config(CONFIG).override(changes)
    family = build_family(cfg)  # decodes and caches the images (timed separately)
    data_s = time.perf_counter() - t_start
    per_iter = seconds_per_iteration(cfg, family, 2 if args.dry_run else 8)
    iterations = 3 if args.dry_run else max(10, min(args.max_iterations, int(args.budget_s / per_iter)))
    cfg = cfg.override({"train.iterations": iterations, "train.validate_every": max(1, iterations // 4),
                        "train.log_every": max(1, iterations // 20)})
    print(f"omniglot: {per_iter * 1e3:.1f} ms per meta-iteration on {args.device}: {iterations} iterations",
          flush=True)
    t0 = time.perf_counter()
    result = run(cfg, progress=False, overwrite=True)
    total = time.perf_counter() - t0
    r = result["runs"]["maml"]
    out = {
        "config": str(CONFIG.relative_to(ROOT)), "device": args.device, "data_root": root,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "iterations": iterations, "meta_batch_size": cfg.train.meta_batch_size,
        "probe_s_per_iteration": per_iter, "train_wall_s": r["train_wall_s"], "eval_wall_s": r["eval_wall_s"],
        "run_wall_s": total, "data_prep_s": data_s, "best_step": r["best_step"], "best_val": r["best_val"],
        "test": r["test"], "table": result["table"], "execution": result["execution"],
        "dry_run": args.dry_run,
    }
    (args.out / "omniglot_cuda.json").write_text(json.dumps(out, indent=1))
    print(result["table"], flush=True)
    print(f"train {r['train_wall_s']:.1f} s, test {r['eval_wall_s']:.1f} s ({cfg.eval.test_tasks} tasks)",
          flush=True)


if __name__ == "__main__":
    main()
