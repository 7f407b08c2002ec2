"""Every algorithm on the same tasks and the same budget: sinusoid regression and Omniglot 5-way.

Sinusoid (the algorithms that adapt a regression network by gradient steps): the same MLP
1-40-40-1, the same tasks (train K = 10 + 10, test K = 5 support + 100 query points on 600 fixed
test tasks), the same number of meta-iterations and meta-batch size for each::

    python benchmarks/family.py sinusoid --iterations 10000 [--threads 1]

Omniglot 5-way K-shot (K = 1, 5): each algorithm's own recipe (its config in ``configs/``, see
``RECIPES``), the same 600 fixed test tasks (15 queries per class), and the same *compute*
budget of meta-training on one thread: a short calibration measures the CPU time of the
algorithm's meta-iteration (process time, so other jobs on the machine do not shrink the budget),
and the run gets as many iterations as fit in the budget (its learning-rate and annealing
schedules are set for that many, so they complete). Equal compute, not equal tasks, is the fair
budget here: a ProtoNets episode costs a small fraction of a second-order MAML meta-batch. The
iterations each run got are recorded, so a row can be rerun exactly with its iteration count::

    python benchmarks/family.py omniglot maml --shots 1 --budget-min 3 --threads 1
    python benchmarks/family.py report

``report`` writes benchmarks/results/family.md from the rows in benchmarks/results/family/, with
each paper's number beside ours. Data: ``$INNERLOOP_DATA`` (``../shared/data`` in CI) or
``task.data_root`` of the configs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from innerloop.training.config import Config, load_config
from innerloop.training.run import build_algorithm, build_family, machine, run

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
ROWS = RESULTS / "family"

# Omniglot: (config, overrides "section.key" -> value). "{K}" in a config name is the shot count;
# overrides apply to both shot counts unless they name the eval/task shots, which the runner sets.
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "maml": ("omniglot_maml_5w{K}s.toml", {}),
    "fomaml": ("omniglot_maml_5w{K}s.toml", {"algorithm.name": "fomaml"}),
    "metasgd": ("omniglot_maml_5w{K}s.toml", {"algorithm.name": "metasgd"}),
    "anil": ("omniglot_maml_5w{K}s.toml", {"algorithm.name": "anil", "algorithm.inner_lr": 0.1,
                                             "algorithm.inner_steps": 5, "eval.steps": 5}),
    "boil": ("omniglot_maml_5w{K}s.toml", {"algorithm.name": "boil", "algorithm.inner_lr": 0.1,
                                             "algorithm.inner_steps": 1, "eval.steps": 3}),
    "mamlpp": ("omniglot_mamlpp_5w1s.toml", {}),
    "reptile": ("omniglot_reptile_5w1s.toml", {"eval.steps": 20, "eval.report_steps": [0, 1, 20]}),  # 50: 13 min
    "imaml": ("omniglot_imaml_5w1s.toml", {}),
    "protonet": ("omniglot_protonet_5w{K}s.toml", {}),
    "matchingnet": ("omniglot_protonet_5w{K}s.toml", {"algorithm.name": "matchingnet", "task.train_ways": None}),
    "baseline": ("omniglot_baselinepp_5w1s.toml", {"algorithm.name": "baseline"}),
    "baselinepp": ("omniglot_baselinepp_5w1s.toml", {}),
}

# Published Omniglot 5-way accuracy (%), 1-shot / 5-shot, with the protocol where it matters.
PAPER_OMNIGLOT: dict[str, tuple[str, str, str]] = {
    "maml": ("98.7 ± 0.4", "99.9 ± 0.1", "Finn et al. 2017, Table 1"),
    "fomaml": ("98.3 ± 0.5", "99.2 ± 0.2", "Finn et al. 2017, Table 1"),
    "metasgd": ("99.53 ± 0.26", "99.93 ± 0.09", "Li et al. 2017, Table 2"),
    "anil": ("—", "—", "Raghu et al. 2020 report Omniglot 20-way only"),
    "boil": ("—", "—", "Oh et al. 2021 report no Omniglot"),
    "mamlpp": ("99.47", "99.93", "Antoniou et al. 2019, Table 1"),
    "reptile": ("95.39 / 97.68", "98.90 / 99.48", "Nichol et al. 2018, non-transductive / transductive"),
    "imaml": ("99.16 ± 0.35", "99.67 ± 0.12", "Rajeswaran et al. 2019, Table 2"),
    "protonet": ("98.8", "99.7", "Snell et al. 2017, Table 1"),
    "matchingnet": ("98.1", "98.9", "Vinyals et al. 2016, Table 1"),
    "baseline": ("—", "—", "Chen et al. 2019 report no Omniglot 5-way"),
    "baselinepp": ("—", "—", "Chen et al. 2019 report no Omniglot 5-way"),
}

SINUSOID = ("maml", "fomaml", "metasgd", "anil", "reptile", "imaml", "mamlpp", "pretrain")
SINUSOID_OVERRIDES: dict[str, dict[str, Any]] = {  # per algorithm, on top of the MAML paper's set-up
    "reptile": {"algorithm.inner_steps": 5, "algorithm.inner_lr": 0.02, "train.optimizer": "sgd",
                "train.outer_lr": 0.1, "train.lr_schedule": "linear"},
    "imaml": {"algorithm.inner_steps": 5, "algorithm.reg_lambda": 1.0},
    "mamlpp": {"algorithm.inner_steps": 5, "algorithm.msl_iterations": 1000, "train.lr_schedule": "cosine",
               "train.final_outer_lr": 1e-5},
}
PAPER_SINUSOID = {  # 5-shot MSE after 10 steps where published for this set-up
    "maml": "0.35 (Finn et al. 2017, App. C)",
    "pretrain": "2.19 (Finn et al. 2017, App. C)",
}


def _config(base: Config | Path, overrides: dict[str, Any]) -> Config:
    return (load_config(base) if isinstance(base, Path) else base).override(overrides)


def seconds_per_iteration(cfg: Config, repeats: int = 2) -> float:
    """Median CPU time (this process, one thread) of one meta-iteration, after one warm-up."""
    family = build_family(cfg, ways=cfg.task.train_ways)
    algorithm = build_algorithm(cfg, family)
    train = algorithm.training_family(family)
    b = cfg.train.meta_batch_size
    times = []
    for i in range(repeats + 1):
        t0 = time.process_time()
        algorithm.set_progress(0, 1)
        grads, _ = algorithm.meta_gradient(train.batch("train", range(i * b, (i + 1) * b)))
        times.append(time.process_time() - t0)
        del grads
    return statistics.median(times[1:])


def _write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def cmd_omniglot(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    config, overrides = RECIPES[args.algorithm]
    cfg = _config(ROOT / "configs" / config.format(K=args.shots), overrides)
    shots = {"eval.shots": args.shots, "eval.test_tasks": args.test_tasks}
    if cfg.algorithm.name not in ("reptile",):  # Reptile trains on 10 shots for every test K
        shots["task.shots"] = args.shots
    cfg = cfg.override(shots)  # one shared override (Config.override: dotted keys, checked as a file)
    per_iter = None if args.iterations else seconds_per_iteration(cfg)
    iterations = args.iterations or max(2, int(args.budget_min * 60 / per_iter))
    changes: dict[str, Any] = {
        "train.iterations": iterations, "train.validate_every": max(1, iterations // 2), "train.val_tasks": 50,
        "train.log_every": max(1, iterations // 20),
        "eval.report_steps": sorted({0, 1, cfg.eval.steps} & set(range(cfg.eval.steps + 1))),
        "out_dir": str(Path(args.runs) / f"{args.algorithm}_5w{args.shots}s"),
    }
    if cfg.algorithm.name == "mamlpp":  # the paper anneals the multi-step loss over the first 10%
        changes["algorithm.msl_iterations"] = max(1, iterations // 10)
    cfg = cfg.override(changes)
    t0, c0 = time.perf_counter(), time.process_time()
    report = run(cfg, progress=sys.stderr.isatty(), overwrite=not args.resume)
    r = report["runs"][cfg.algorithm.name]
    _write(ROWS / f"omniglot_{args.algorithm}_5w{args.shots}s.json", {
        "algorithm": args.algorithm, "shots": args.shots, "config": config.format(K=args.shots),
        "overrides": overrides, "budget_min": args.budget_min, "calibrated_cpu_s_per_iteration": per_iter,
        "iterations": iterations, "meta_batch_size": cfg.train.meta_batch_size,
        "train_tasks": iterations * cfg.train.meta_batch_size, "best_step": r["best_step"],
        "train_wall_s": r["train_wall_s"], "eval_wall_s": r["eval_wall_s"],
        "total_wall_s": time.perf_counter() - t0, "total_cpu_s": time.process_time() - c0, "resumed": args.resume,
        "eval_steps": cfg.eval.steps, "test": r["test"],
        "final_config": cfg.to_dict(), "machine": machine(), "load_average": os.getloadavg(),
        "command": f"python benchmarks/family.py omniglot {args.algorithm} --shots {args.shots} "
                   f"--iterations {iterations} --threads {args.threads}",
    })
    print(report["table"])


def cmd_sinusoid(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rows: dict[str, Any] = {}
    for name in args.algorithms or SINUSOID:
        cfg = _config(Config(), {"algorithm.name": name, **SINUSOID_OVERRIDES.get(name, {}),
                                 "train.iterations": args.iterations,
                                 "train.validate_every": max(1, args.iterations // 5), "eval.baseline": False,
                                 "eval.steps": 10, "eval.report_steps": [0, 1, 10],
                                 "out_dir": str(Path(args.runs) / f"sinusoid_{name}")})
        report = run(cfg, progress=sys.stderr.isatty(), overwrite=True)
        r = report["runs"][name]
        rows[name] = {"iterations": args.iterations, "meta_batch_size": cfg.train.meta_batch_size,
                      "overrides": SINUSOID_OVERRIDES.get(name, {}), "best_step": r["best_step"],
                      "train_wall_s": r["train_wall_s"], "eval_wall_s": r["eval_wall_s"], "test": r["test"]}
        print(f"{name}: {r['test']['per_step'][10]}", flush=True)
    _write(ROWS / "sinusoid.json", {"rows": rows, "machine": machine(), "load_average": os.getloadavg(),
                                    "command": f"python benchmarks/family.py sinusoid --iterations "
                                               f"{args.iterations} --threads {args.threads}"})


def _fmt(step: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    return f"{step['mean'] * scale:.{digits}f} ± {step['ci95'] * scale:.{digits}f}"


def cmd_report(args: argparse.Namespace) -> None:
    lines = ["# Every algorithm on the same tasks and budget", ""]
    sin = ROWS / "sinusoid.json"
    if sin.exists():
        s = json.loads(sin.read_text())
        lines += [
            "## Sinusoid regression, 5-shot MSE on 600 fixed test tasks (100 query points each, mean ± 95% CI)",
            "",
            f"Command: `{s['command']}`; MLP 1-40-40-1, train K = 10 + 10, meta-batch 25, Adam 1e-3 unless "
            "noted, inner lr 0.01, 1 inner step unless noted; task seed 0, init seed 0; best-on-validation "
            f"checkpoint; {s['machine']['cpu']}, torch {s['machine']['torch']}, {s['machine']['threads']} "
            f"thread, load average {s['load_average'][0]:.1f} at the end.",
            "",
            "| algorithm | settings | MSE, 0 steps | 1 step | 10 steps | paper (10 steps) | train wall |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in s["rows"].items():
            per = r["test"]["per_step"]
            settings = ", ".join(f"{k.split('.')[1]}={v}" for k, v in r["overrides"].items()) or "as MAML"
            lines.append(f"| {name} | {settings} | {_fmt(per[0])} | {_fmt(per[1])} | {_fmt(per[10])} | "
                         f"{PAPER_SINUSOID.get(name, '—')} | {r['train_wall_s'] / 60:.1f} min |")
        lines += ["", "A mean over tasks is sensitive to the rare task whose loss blows up when adapted for more "
                  "steps than training used (10 here against 1 or 5); `nan` means at least one task overflowed.",
                  ""]
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(ROWS.glob("omniglot_*.json"))}
    if rows:
        any_row = next(iter(rows.values()))
        lines += [
            "## Omniglot 5-way, accuracy % on 600 fixed test tasks (15 queries per class, mean ± 95% CI)",
            "",
            f"Each algorithm gets the same {any_row['budget_min']:g} CPU-minutes of meta-training on one thread "
            "of "
            f"{any_row['machine']['cpu']} (torch {any_row['machine']['torch']}), with its own recipe "
            "(configs/ and `RECIPES` in benchmarks/family.py); vinyals split, conv-4 with BatchNorm on batch "
            "statistics (transductive, as in the MAML protocol); task seed 0, init seed 0; best-on-validation "
            "checkpoint (50 validation tasks, validated half-way and at the end). The papers trained for hours "
            "to days on GPUs: their numbers are what each recipe reaches at convergence, ours what it reaches "
            "in the budget.",
            "",
            "| algorithm | 1-shot | 5-shot | paper 1-shot | paper 5-shot | source "
            "| iterations × tasks (1 / 5-shot) | test steps |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in RECIPES:
            one, five = rows.get(f"omniglot_{name}_5w1s"), rows.get(f"omniglot_{name}_5w5s")
            if one is None and five is None:
                continue

            def acc(r: dict[str, Any] | None) -> str:
                if r is None:
                    return "not run"
                short = "" if r.get("calibrated_cpu_s_per_iteration") or r.get("resumed") else " †"
                return _fmt(r["test"]["per_step"][r["eval_steps"]], 100) + short

            def budget(r: dict[str, Any] | None) -> str:
                return "—" if r is None else f"{r['iterations']} × {r['meta_batch_size']}"

            paper = PAPER_OMNIGLOT[name]
            steps = (one or five)["eval_steps"]
            lines.append(f"| {name} | {acc(one)} | {acc(five)} | {paper[0]} | {paper[1]} | {paper[2]} | "
                         f"{budget(one)} / {budget(five)} | {steps} |")
        flagged = any(not (r.get("calibrated_cpu_s_per_iteration") or r.get("resumed")) for r in rows.values())
        lines += ["", "† a smaller budget: 2 minutes of *wall-clock* time on a machine loaded by other jobs (the "
                  "first rows, before the budget became CPU time and before their top-up to it finished); they "
                  "got fewer iterations than 2 CPU-minutes give."] * flagged + [""] * flagged
        lines += [
            "", "Commands (a row reruns with its iteration count; train and test times are wall-clock on the "
            "loaded machine, so they overstate the CPU time):", ""]
        lines += [f"- `{r['command']}` (train {r['train_wall_s'] / 60:.1f} min, test {r['eval_wall_s'] / 60:.1f} "
                  f"min, load average {r['load_average'][0]:.1f})" for r in rows.values()]
    out = RESULTS / "family.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("omniglot", help="one algorithm on Omniglot 5-way K-shot within a compute budget")
    o.add_argument("algorithm", choices=sorted(RECIPES))
    o.add_argument("--shots", type=int, choices=(1, 5), default=1)
    o.add_argument("--budget-min", type=float, default=2.0, help="meta-training CPU-minutes (default 2)")
    o.add_argument("--iterations", type=int, help="skip the calibration: train exactly this many iterations")
    o.add_argument("--resume", action="store_true",
                   help="continue the row's run folder to --iterations (constant learning rates only)")
    o.add_argument("--test-tasks", type=int, default=600)
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--runs", default="runs/family")
    s = sub.add_parser("sinusoid", help="the regression algorithms on sinusoid, same iterations each")
    s.add_argument("--iterations", type=int, default=10000)
    s.add_argument("--algorithms", nargs="*", choices=SINUSOID)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--runs", default="runs/family")
    sub.add_parser("report", help="write benchmarks/results/family.md")
    args = p.parse_args()
    {"omniglot": cmd_omniglot, "sinusoid": cmd_sinusoid, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
