"""Hypergradient tuning against grid search at the same compute: per-group weight decay.

The problem (``configs/tune_groups_wd.toml``): linear regression on 4 feature groups of 8 features
whose true weights shrink 4x per group, 60 training and 60 validation examples, 2000 held-out test
examples; the model has one weight tensor per group, so a per-tensor weight decay is one L2 strength
per group (4 hyperparameters). Every training run is 100 full-batch SGD steps from zero.

* ``tune``: the implicit hypergradient (CG, 10 Hessian-vector products), Adam on log weight decay,
  warm-started runs (``innerloop tune --config configs/tune_groups_wd.toml``), then one fresh run
  with the tuned values.
* ``grid``: every point of a 3 x 3 x 3 x 3 grid over {1e-3, 1e-1, 10} per group (81 runs).
* ``grid_shared``: one weight decay for every group, as many log-spaced values (1e-4..10) as the
  tuning's compute allows.

Compute is counted in inner-step equivalents: one SGD step (a gradient on the training set) is 1,
one Hessian-vector product is 2 (reverse over reverse). Validation and test losses are of fresh
100-step runs. Float64, one thread, the same data and seeds for all.

    OMP_NUM_THREADS=1 python benchmarks/tune_vs_grid.py

writes ``benchmarks/results/tune_vs_grid.{md,json,png}``.
"""

from __future__ import annotations

import itertools
import json
import platform
import time
from pathlib import Path

import torch

from innerloop.io import atomic_write_text
from innerloop.tuning.hypergradient import Hyper, TrainingRun, mean_loss
from innerloop.tuning.tune import load_tune_config, make_problem, tune

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_tune_config(ROOT / "configs" / "tune_groups_wd.toml")
    problem = make_problem(cfg.problem)
    init = {n: torch.zeros_like(p) for n, p in problem.model.named_parameters()}
    run = TrainingRun(problem.model, init, *problem.train, steps=cfg.inner.steps, loss=problem.loss)
    names = list(init)

    def fresh(wd: dict[str, float]) -> tuple[float, float]:
        hyper = Hyper.create(init, lr=cfg.inner.lr, weight_decay=1.0, tune_weight_decay="tensor")
        hyper = hyper.with_tensors({f"weight_decay/{n}": torch.tensor(wd[n], dtype=torch.float64).log()
                                    for n in names})
        end = run.train(hyper)
        return float(mean_loss(run, end, *problem.val)), float(mean_loss(run, end, *problem.test))

    # -- hypergradient tuning
    m, o = cfg.method, cfg.outer
    start = Hyper.create(init, lr=cfg.inner.lr, weight_decay=cfg.inner.weight_decay, tune_weight_decay="tensor")
    t0 = time.perf_counter()
    result = tune(run, *problem.val, start, method=m.name, outer_steps=o.steps, outer_lr=o.lr, solver=m.solver,
                  terms=m.terms, progress=False, loggers=())
    tuned = {k.split("/", 1)[1]: float(v) for k, v in result.hyper.values().items()}
    tune_val, tune_test = fresh(tuned)
    tune_wall = time.perf_counter() - t0
    per_step = result.compute / o.steps
    tune_curve = [((i + 1) * per_step, v) for i, v in enumerate(result.history)]
    budget = result.compute + run.steps  # the tuning and its one fresh run
    tune_curve.append((budget, tune_val))

    # -- grid search, per group
    values = [1e-3, 1e-1, 10.0]
    t0 = time.perf_counter()
    grid_curve, best = [], (float("inf"), float("nan"), {})
    for i, combo in enumerate(itertools.product(values, repeat=len(names))):
        wd = dict(zip(names, combo, strict=True))
        val, test = fresh(wd)
        if val < best[0]:
            best = (val, test, wd)
        grid_curve.append(((i + 1) * run.steps, best[0]))
    grid_wall = time.perf_counter() - t0

    # -- grid search, one shared weight decay, at the tuning's compute
    count = int(budget // run.steps)
    t0 = time.perf_counter()
    shared_curve, shared_best = [], (float("inf"), float("nan"), 0.0)
    for i, lam in enumerate(torch.logspace(-4, 1, count, dtype=torch.float64).tolist()):
        val, test = fresh(dict.fromkeys(names, lam))
        if val < shared_best[0]:
            shared_best = (val, test, lam)
        shared_curve.append(((i + 1) * run.steps, shared_best[0]))
    shared_wall = time.perf_counter() - t0
    start_val, start_test = fresh(dict.fromkeys(names, float(cfg.inner.weight_decay or 0.0)))

    rows = [
        ("start (weight decay 0.03 for every group)", run.steps, start_val, start_test, "-", "-"),
        (f"tune: implicit CG ({o.steps} outer steps)", budget, tune_val, tune_test,
         ", ".join(f"{v:.3g}" for v in tuned.values()), f"{tune_wall:.1f}"),
        (f"grid: {len(values)}^{len(names)} per group", len(grid_curve) * run.steps, best[0], best[1],
         ", ".join(f"{v:.3g}" for v in best[2].values()), f"{grid_wall:.1f}"),
        (f"grid: one shared value, {count} points", count * run.steps, shared_best[0], shared_best[1],
         f"{shared_best[2]:.3g} (all)", f"{shared_wall:.1f}"),
    ]
    command = "OMP_NUM_THREADS=1 python benchmarks/tune_vs_grid.py"
    data = {
        "command": command, "machine": f"{platform.machine()} {platform.processor()}, 1 thread, torch "
        f"{torch.__version__}", "config": cfg.to_dict(),
        "rows": [dict(zip(["method", "compute", "val_loss", "test_loss", "weight_decays", "wall_s"], r,
                          strict=True)) for r in rows],
        "curves": {"tune": tune_curve, "grid": grid_curve, "grid_shared": shared_curve},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT / "tune_vs_grid.json", json.dumps(data, indent=2) + "\n")
    lines = [
        "# Hypergradient tuning vs grid search (per-group weight decay)", "",
        f"`{command}` ({data['machine']}). Problem: `configs/tune_groups_wd.toml` (linear regression, 4 "
        "feature groups x 8 features with signal falling 4x per group, 60 train / 60 validation / 2000 test "
        "examples, one weight decay per group, 100 full-batch SGD steps per run, float64). Compute in "
        "inner-step equivalents (an SGD step 1, a Hessian-vector product 2). Losses of a fresh run with "
        "the chosen weight decays (mean 1/2 squared error).", "",
        "| method | compute | validation loss | test loss | weight decays (groups 1..4) | wall s |",
        "|---|---:|---:|---:|---|---:|",
        *[f"| {r[0]} | {r[1]:.0f} | {r[2]:.4f} | {r[3]:.4f} | {r[4]} | {r[5]} |" for r in rows],
        "", "![validation loss against compute](tune_vs_grid.png)", "",
        "The tuning curve is the validation loss at each outer step's (warm-started) end point; the grid "
        "curves are the best validation loss found so far.", "",
    ]
    atomic_write_text(OUT / "tune_vs_grid.md", "\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("tune", "hypergradient (implicit, CG)"), ("grid", "grid 3^4, per group"),
                       ("grid_shared", "grid, one shared value")):
        xs, ys = zip(*data["curves"][key], strict=True)
        ax.plot(xs, ys, label=label)
    ax.set_xlabel("compute (inner-step equivalents)")
    ax.set_ylabel("validation loss")
    ax.set_title("per-group weight decay: validation loss against compute")
    ax.legend()
    fig.tight_layout()
    tmp = OUT / ".tune_vs_grid.png.part"
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(OUT / "tune_vs_grid.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
