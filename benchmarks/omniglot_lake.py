"""Omniglot's original one-shot challenge (Lake et al. 2015): 20-way 1-shot within one evaluation alphabet,
support and query by different drawers, trained on the background alphabets only (the ``lake`` split).

Each recipe is a config (``configs/omniglot_lake_*.toml``); a row is its error on 600 fixed test tasks with
a 95% interval, beside the published errors (Lake et al. 2019, "The Omniglot challenge: a 3-year progress
report"). Data: ``$INNERLOOP_DATA`` (``../shared/data``) or the config's ``task.data_root``.

    python benchmarks/omniglot_lake.py train configs/omniglot_lake_protonet_20w1s.toml --threads 1
    python benchmarks/omniglot_lake.py eval configs/omniglot_lake_protonet_20w1s.toml --tag tta8 \\
        --set eval.tta=8 --threads 1
    python benchmarks/omniglot_lake.py report

``train`` meta-trains the config (resuming from its run folder's ``last.pt``, so an interrupted run
continues where it stopped, and a finished one is only tested), meta-tests the best-on-validation
checkpoint and writes ``benchmarks/results/omniglot_lake/<config>.json``. ``eval`` tests that trained
checkpoint again with test-time settings changed (``--set eval.tta=8``,
``--set algorithm.transductive_steps=3``, ...) and writes ``<config>-<tag>.json``; the training is the
same, so the row keeps its training time. ``report`` collects every row into
``benchmarks/results/omniglot_lake.md`` and ``omniglot_lake_error_vs_time.png`` (validation error
against training time, each test error at the end of its curve, the human level).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from innerloop.io import atomic_write_text
from innerloop.training.checkpoint import identity_differences, load_checkpoint
from innerloop.training.config import load_config, tta_augment, within_alphabet
from innerloop.training.evaluate import meta_test, tta_note
from innerloop.training.run import build_family, identity, load_for_eval, machine, refine_steps_of, run
from innerloop.training.settings import cli_changes

RESULTS = Path(__file__).parent / "results"
ROWS = RESULTS / "omniglot_lake"
PUBLISHED = [  # error %, Lake, Salakhutdinov & Tenenbaum (2019), "The Omniglot challenge", Table 1 and text
    ("People", 4.5), ("Bayesian Program Learning (BPL)", 3.3), ("Recursive Cortical Networks", 7.3),
    ("Siamese networks (Koch et al. 2015)", 8.0), ("Prototypical Networks", 13.7),
]
HUMAN = 4.5
TEST_TIME_KEYS = ("eval.", "algorithm.transductive_steps")
"""What ``eval`` may change: test-time settings only (the row keeps the trained run's training)."""


def _load() -> float:
    return os.getloadavg()[0]


def _error(test: dict[str, Any], step: int) -> tuple[float, float]:
    """``(error %, 95% CI %)`` after ``step`` adaptation steps of a ``EvalResult.to_dict()``."""
    s = test["per_step"][step]
    return 100 * (1 - s["mean"]), 100 * s["ci95"]


def _setup(config: str, threads: int, settings: list[str]) -> Any:
    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(config)
    return cfg.override(cli_changes(cfg, settings, "benchmarks/omniglot_lake.py")) if settings else cfg


def _describe(cfg: Any) -> dict[str, Any]:
    t, m = cfg.task, cfg.model
    return {"algorithm": cfg.algorithm.name, "model": f"{m.name}, {m.filters} filters" if m.name == "conv4"
            else m.name, "image_size": t.image_size or 28, "train_ways": t.train_ways or t.ways,
            "augment": t.augment.build().describe(), "tta": tta_note(cfg.eval.tta, tta_augment(cfg)),
            "tta_copies": cfg.eval.tta, "pretrained": m.pretrained,
            "train_within_alphabet": within_alphabet(t)["train"],
            "batch_images": (t.train_ways or t.ways) * (t.shots + t.queries),
            "transductive_steps": refine_steps_of(cfg),
            "steps": cfg.eval.steps, "iterations": cfg.train.iterations,
            "meta_batch_size": cfg.train.meta_batch_size}


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _setup(args.config, args.threads, args.set)
    name = Path(args.config).stem
    t0 = time.perf_counter()
    report = run(cfg, progress=sys.stderr.isatty())
    r = report["runs"][cfg.algorithm.name]
    curve = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    sets = "".join(f" --set {shlex.quote(s)}" for s in args.set)
    row = {
        "tag": name, "config": args.config, **_describe(cfg), "best_step": r["best_step"],
        "train_wall_s": r["train_wall_s"], "eval_wall_s": r["eval_wall_s"],
        "total_wall_s": time.perf_counter() - t0,
        "test": r["test"], "error": _error(r["test"], cfg.eval.steps),
        "curve": [{"step": c["step"], "wall_s": c["wall_s"], "val_accuracy": c["val_accuracy"]}
                  for c in curve if "val_accuracy" in c],
        "command": f"python benchmarks/omniglot_lake.py train {args.config}{sets} "
                   f"--threads {torch.get_num_threads()}",
        "machine": machine(), "load_average": _load(), "task_seed": cfg.task.seed, "init_seed": cfg.train.seed,
    }
    ROWS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ROWS / f"{name}.json", json.dumps(row, indent=2))
    print(report["table"])


def cmd_eval(args: argparse.Namespace) -> None:
    if not args.set:
        raise SystemExit("eval: give the test-time settings to change (--set eval.tta=8, ...); the plain test is "
                         "the train command's row.")
    name = Path(args.config).stem
    base_file = ROWS / f"{name}.json"
    if not base_file.exists():
        raise SystemExit(f"eval: no {base_file}; run `python benchmarks/omniglot_lake.py train {args.config}` "
                         "first.")
    base = json.loads(base_file.read_text())
    if args.threads:
        torch.set_num_threads(args.threads)
    trained = load_config(args.config)
    changes = cli_changes(trained, args.set, "benchmarks/omniglot_lake.py")
    training = [k for k in changes if not k.startswith(TEST_TIME_KEYS)]
    if training:
        raise SystemExit(f"eval: {', '.join(training)} would change the training; eval changes test-time settings "
                         f"only ({', '.join(k + '*' if k.endswith('.') else k for k in TEST_TIME_KEYS)}). Give a "
                         "config of its own to `train` instead.")
    checkpoint = Path(trained.out_dir) / "best.pt"
    saved = load_checkpoint(checkpoint)
    differences = identity_differences(saved["identity"], identity(trained, trained.algorithm.name))
    if differences:
        raise SystemExit(f"eval: {checkpoint} was not trained with {args.config} ({'; '.join(differences)}); run "
                         f"`python benchmarks/omniglot_lake.py train {args.config}` again.")
    cfg, algorithm = load_for_eval(checkpoint, changes, payload=saved)
    e = cfg.eval
    family = build_family(cfg, e.shots, e.queries, e.ways, splits=("test",), tta=True)
    t0 = time.perf_counter()
    res = meta_test(algorithm, family, "test", e.test_tasks, e.steps, progress=sys.stderr.isatty(),
                    desc=f"meta-test {args.tag}").to_dict()
    row = {**base, "tag": f"{name}-{args.tag}", **_describe(cfg), "test": res, "error": _error(res, e.steps),
           "eval_wall_s": time.perf_counter() - t0, "settings": args.set,
           "command": f"python benchmarks/omniglot_lake.py eval {args.config} --tag {args.tag}"
                      + "".join(f" --set {shlex.quote(s)}" for s in args.set)
                      + f" --threads {torch.get_num_threads()}",
           "machine": machine(), "load_average": _load()}
    ROWS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ROWS / f"{name}-{args.tag}.json", json.dumps(row, indent=2))
    err, ci = row["error"]
    print(f"{row['tag']}: error {err:.2f} ± {ci:.2f} % ({e.test_tasks} test tasks)")


def _recipe(r: dict[str, Any]) -> str:
    parts = [r["algorithm"], r["model"], f"{r['image_size']} px"]
    if r["algorithm"] in ("protonet",) and r["train_ways"] != 20:
        parts.append(f"{r['train_ways']}-way training")
    if r.get("train_within_alphabet"):
        parts.append("training tasks within one alphabet")
    if r.get("pretrained"):
        parts.append(f"fine-tuned from `{r['pretrained']}`")
    return ", ".join(parts)


def _short(r: dict[str, Any]) -> str:
    return str(r["tag"]).removeprefix("omniglot_lake_")


def _start_minutes(r: dict[str, Any], rows: list[dict[str, Any]]) -> float:
    """Training minutes of the row's starting point: the run whose ``runs/<config>/best.pt`` it was fine-tuned
    from (0 for a row trained from scratch, or when that run has no row)."""
    pretrained = r.get("pretrained") or ""
    start = Path(pretrained).parent.name if Path(pretrained).name == "best.pt" else ""
    found = [o["train_wall_s"] / 60 for o in rows if o["tag"] == start]
    return found[0] if found else 0.0


def _budget(r: dict[str, Any]) -> str:
    if r["algorithm"] in ("baseline", "baselinepp"):  # pre-training batches of global labels, not tasks
        return f"{r['iterations']} × {r['meta_batch_size']} batches of {r['batch_images']} images"
    return f"{r['iterations']} × {r['meta_batch_size']} ({r['train_ways']}-way)"


def _test_time(r: dict[str, Any]) -> str:
    parts = []
    if r["steps"]:
        parts.append(f"{r['steps']} adaptation steps")
    if r["transductive_steps"]:
        parts.append(f"{r['transductive_steps']} soft k-means steps on the queries (transductive)")
    parts.append(f"TTA: {r['tta_copies']} copies" if r["tta_copies"] > 1 else "no TTA")
    return "; ".join(parts)


def cmd_report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(p.read_text()) for p in sorted(ROWS.glob("*.json"))]
    if not rows:
        raise SystemExit("no rows yet: run `python benchmarks/omniglot_lake.py train CONFIG` first.")
    rows.sort(key=lambda r: r["error"][0])
    best = rows[0]
    lines = [
        "# Omniglot's one-shot challenge: 20-way 1-shot within one alphabet, trained on the background set",
        "",
        "Lake et al. (2015)'s protocol: each test task is one of the 20 evaluation alphabets, 20 of its "
        "characters, one support image per character by one drawer and the query image by another "
        "(`task.sampling.test`: `within_alphabet`, `distinct_drawers`); 600 fixed test tasks (task seed 0), "
        "error = 100 - accuracy, with a 95% interval (Student t over tasks). Training: the `lake` split's "
        "background alphabets, 5 of them held out for validation (best-on-validation checkpoint). Every row "
        "was trained and tested on this machine's CPU with one thread; BatchNorm uses the statistics of each "
        "episode (transductive).",
        "",
        "| recipe | test time | error % (95% CI) | vs people (4.5%) | budget: iterations × tasks | training "
        "time | training augmentation |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err, ci = r["error"]
        before = _start_minutes(r, rows)
        time_text = f"{r['train_wall_s'] / 60:.0f} min" + (f" (after its start's {before:.0f})" if before else "")
        lines.append(f"| {_recipe(r)} | {_test_time(r)} | {err:.2f} ± {ci:.2f} | {err - HUMAN:+.2f} | "
                     f"{_budget(r)} | {time_text} | {r['augment']} |")
    notes = sorted({r["tta"] for r in rows if r["tta_copies"] > 1})
    lines += ["", *(f"TTA (test-time augmentation): {n}." for n in notes)]
    lines += ["", "Published errors on this protocol (Lake et al. 2019, \"The Omniglot challenge: a 3-year "
              "progress report\"), not rerun here:", "", "| model | error % |", "|---|---|"]
    lines += [f"| {name} | {err} |" for name, err in PUBLISHED]
    lines += ["", f"Best here: **{best['tag']}**, {best['error'][0]:.2f} ± {best['error'][1]:.2f} % error, "
              f"{best['error'][0] - HUMAN:+.2f} points from the human level.", "",
              "Commands (the `train` row first: an `eval` row tests that row's checkpoint again):", ""]
    for r in sorted(rows, key=lambda r: r["tag"]):
        load = r.get("load_average", float("nan"))
        lines.append(f"- {r['tag']}: `{r['command']}` (best validation step {r['best_step']}, "
                     f"load average {load:.1f} when it ended)")
    m = rows[0]["machine"]
    lines += ["", f"Machine: {m['cpu']}, torch {m['torch']}, python {m['python']}, {m['threads']} thread(s); "
              "other runs shared the 2 cores (the load average of each).", "",
              "![error vs training time](omniglot_lake_error_vs_time.png)"]
    atomic_write_text(RESULTS / "omniglot_lake.md", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        if r["tag"] == Path(r["config"]).stem:  # a trained run: its validation curve
            start = _start_minutes(r, rows)
            xs = [start + c["wall_s"] / 60 for c in r["curve"]]
            ax.plot(xs, [100 * (1 - c["val_accuracy"]) for c in r["curve"]], marker="o", ms=2.5,
                    label=f"{_short(r)}: validation")
    for r in rows:
        ax.errorbar([_start_minutes(r, rows) + r["train_wall_s"] / 60], [r["error"][0]], yerr=[r["error"][1]],
                    fmt="s", ms=4, capsize=2, label=f"{_short(r)}: test {r['error'][0]:.1f}%")
    ax.axhline(HUMAN, color="k", ls="--", lw=1, label="people (4.5%)")
    ax.set(xlabel="training minutes on this machine (1 CPU thread)", ylim=(0, None),
           ylabel="error % (20-way 1-shot within alphabet)")
    ax.set_title("Omniglot one-shot challenge: error vs training time", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.savefig(RESULTS / "omniglot_lake_error_vs_time.png", dpi=110, bbox_inches="tight")
    print((RESULTS / "omniglot_lake.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train", "eval"):
        s = sub.add_parser(name)
        s.add_argument("config")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a config key (TOML value); for eval, a test-time one")
        s.add_argument("--threads", type=int, default=0)
        if name == "eval":
            s.add_argument("--tag", required=True, help="the row's name, <config>-<tag>")
    sub.add_parser("report")
    args = p.parse_args()
    {"train": cmd_train, "eval": cmd_eval, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
