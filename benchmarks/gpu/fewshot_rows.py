"""The 5-way few-shot rows of miniImageNet and CIFAR-FS (MAML conv-4, ProtoNets ResNet-12,
MetaOptNet-SVM ResNet-12; 1 and 5 shots), each trained within a wall-clock budget and meta-tested on
600 fixed test tasks, beside the published numbers.

    python benchmarks/gpu/fewshot_rows.py --out results/ --minutes 30            # every row with data
    python benchmarks/gpu/fewshot_rows.py --out results/ --minutes 30 --rows miniimagenet_maml_conv4_5w1s
    python benchmarks/gpu/fewshot_rows.py --out /tmp/x --device cpu --dry-run    # synthetic stand-ins

Usually run through ``benchmarks/gpu/fewshot_rows.sh`` (which says how to run it on a GPU box).

Each row is the config ``configs/<row>.toml``. Data (``--data-root``, else ``$INNERLOOP_DATA``, else
``shared/data`` or ``../shared/data`` or ``.cache/fewshot-data`` of this checkout): miniImageNet rows
need ``miniimagenet/images/`` (the user's images, ImageNet licence) and ``miniimagenet/splits/ravi/*.csv``;
CIFAR-FS rows need ``cifar100/`` holding CIFAR-100 (``cifar-100-binary.tar.gz``, its extracted
``cifar-100-binary/``, or the Python version). A row whose data is absent is skipped and named, never
downloaded: the script is meant for machines without network too.

Training runs in chunks (a validation at the end of each, the best-on-validation checkpoint kept)
until ``--minutes`` have passed or the config's ``train.iterations`` are done; the chunk after the
first is sized from the measured seconds per iteration so the budget is not overrun by more than
one iteration. A later invocation with the same ``--runs`` folder resumes each row from its
``last.pt``. The best-on-validation checkpoint is then tested on ``--test-tasks`` fixed tasks (mean
accuracy and 95% confidence interval). Writes ``fewshot_rows.json`` and ``fewshot_rows.md`` into
``--out`` after every row (so a run cut short keeps the rows it finished).

``--dry-run``: every row on a tiny synthetic stand-in (a generated miniImageNet-layout image folder
and a generated CIFAR-100 binary archive, both random pixels, in a temporary folder with its own
cache), with small widths, meta-batch 2, 2 iterations and 5 test tasks: a check of the script, no
accuracy.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import shlex
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from innerloop.data.archives import packaged_split
from innerloop.io import atomic_write_text
from innerloop.training.checkpoint import load_checkpoint
from innerloop.training.config import Config, load_config
from innerloop.training.evaluate import meta_test
from innerloop.training.loop import meta_train
from innerloop.training.run import build_algorithm, build_family, check_device, identity, machine

ROOT = Path(__file__).resolve().parents[2]
DATASETS = ("miniimagenet", "cifarfs")
MODELS = ("maml_conv4", "protonet_resnet12", "metaoptnet_resnet12")
ROWS: tuple[str, ...] = tuple(f"{d}_{m}_5w{s}s" for d in DATASETS for m in MODELS for s in (1, 5))
"""Every row, named as its config ``configs/<row>.toml``."""

MAML_PAPER = "Finn et al. 2017 (MAML), Table 2; also Lee et al. 2019 (MetaOptNet, CVPR), Table 1"
LEE_T1 = "Lee et al. 2019 (MetaOptNet, CVPR), Table 1"
LEE_T2 = "Lee et al. 2019 (MetaOptNet, CVPR), Table 2"
LEE_T3 = "Lee et al. 2019 (MetaOptNet, CVPR), Table 3, ResNet-12 group"
PUBLISHED: dict[str, tuple[float, float, str]] = {
    "miniimagenet_maml_conv4_5w1s": (48.70, 1.84, MAML_PAPER),
    "miniimagenet_maml_conv4_5w5s": (63.11, 0.92, MAML_PAPER),
    "miniimagenet_protonet_resnet12_5w1s": (59.25, 0.64, LEE_T3),
    "miniimagenet_protonet_resnet12_5w5s": (75.60, 0.48, LEE_T3),
    "miniimagenet_metaoptnet_resnet12_5w1s": (62.64, 0.61, LEE_T1),
    "miniimagenet_metaoptnet_resnet12_5w5s": (78.63, 0.46, LEE_T1),
    "cifarfs_maml_conv4_5w1s": (58.9, 1.9, LEE_T2 + " (Bertinetto et al. 2019's run)"),
    "cifarfs_maml_conv4_5w5s": (71.5, 1.0, LEE_T2 + " (Bertinetto et al. 2019's run)"),
    "cifarfs_protonet_resnet12_5w1s": (72.2, 0.7, LEE_T2 + ", 'ProtoNets (our backbone)'"),
    "cifarfs_protonet_resnet12_5w5s": (83.5, 0.5, LEE_T2 + ", 'ProtoNets (our backbone)'"),
    "cifarfs_metaoptnet_resnet12_5w1s": (72.0, 0.7, LEE_T2),
    "cifarfs_metaoptnet_resnet12_5w5s": (84.2, 0.5, LEE_T2),
}
"""Published test accuracy %, its 95% CI and where it is printed, per row."""

CIFAR_FORMS = ("cifar-100-binary", "cifar-100-binary.tar.gz", "cifar-100-python", "cifar-100-python.tar.gz")
DRY_IMAGES_PER_CLASS = 22  # the largest episode: 15 shots + 6 queries (MetaOptNet's miniImageNet training)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where fewshot_rows.{json,md} go")
    p.add_argument("--minutes", type=float, default=float(os.environ.get("FEWSHOT_MINUTES", "30")),
                   help="meta-training budget of each row in this invocation (default $FEWSHOT_MINUTES or 30)")
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help=f"rows to run (default: every row whose data is present); any of {', '.join(ROWS)}")
    p.add_argument("--device", default=os.environ.get("DEVICE", "cuda"), help="execution.device (default cuda)")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--data-root", type=Path, default=None, help="the folder with miniimagenet/ and cifar100/")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "fewshot_rows", help="run folders (resumable)")
    p.add_argument("--first-order", action="store_true", help="MAML rows first order (the paper's FOMAML rows)")
    p.add_argument("--list", action="store_true", help="print which data and rows are available, run nothing")
    p.add_argument("--dry-run", action="store_true", help="every row on synthetic stand-ins, a few iterations")
    args = p.parse_args(argv)
    if not args.minutes > 0:
        p.error(f"--minutes must be > 0, got {args.minutes}; give the training minutes per row, e.g. --minutes 30")
    if args.test_tasks < 1:
        p.error(f"--test-tasks must be >= 1, got {args.test_tasks}; the table uses 600")
    unknown = [r for r in args.rows or () if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    return args


def data_root(given: Path | None) -> Path | None:
    """``given``, else ``$INNERLOOP_DATA``, else the first of this checkout's data folders that exists."""
    if given is not None:
        return given
    if os.environ.get("INNERLOOP_DATA"):
        return Path(os.environ["INNERLOOP_DATA"])
    for cand in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data", ROOT / ".cache" / "fewshot-data"):
        if cand.is_dir():
            return cand
    return None


def find_data(root: Path | None) -> dict[str, dict[str, Any]]:
    """Per dataset: ``{"found": bool, "where": str, "why": str}`` (``why``: what is missing, or what was found)."""
    if root is None:
        none = {"found": False, "where": None, "why": "no data folder: give --data-root or set INNERLOOP_DATA"}
        return {d: dict(none) for d in DATASETS}
    mini = root / "miniimagenet"
    csvs = [mini / "splits" / "ravi" / f"{s}.csv" for s in ("train", "val", "test")]
    images = mini / "images"
    if not all(c.is_file() for c in csvs):
        m = {"found": False, "why": f"the Ravi split CSVs are not all in {mini / 'splits' / 'ravi'}"}
    elif not images.is_dir():
        m = {"found": False, "why": f"the split CSVs are there but not the images ({images} does not exist; "
                                    "miniImageNet's images come from the user, ImageNet licence)"}
    else:
        first = _first_row(csvs[0])
        seen = first is not None and any((p / first).is_file() for p in (images / "images", images))
        note = "" if seen else " (the first listed file is not there flat; the loader also looks by class)"
        m = {"found": True, "why": f"images in {images}{note}"}
    cifar = root / "cifar100"
    forms = [f for f in CIFAR_FORMS if (cifar / f).exists()]
    c = ({"found": True, "why": f"CIFAR-100 as {', '.join(forms)} in {cifar}"} if forms else
         {"found": False, "why": f"no CIFAR-100 in {cifar} (any of {', '.join(CIFAR_FORMS)})"})
    return {"miniimagenet": {**m, "where": str(mini)}, "cifarfs": {**c, "where": str(cifar)}}


def _first_row(path: Path) -> str | None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[1][0].strip() if len(rows) > 1 and rows[1] else None


def make_stand_ins(root: Path, seed: int = 0) -> None:
    """Random-pixel stand-ins in ``root``: ``miniimagenet/`` (5 classes per split, 84 x 84 PNGs named in
    Ravi-style CSVs) and ``cifar100/cifar-100-binary.tar.gz`` (all 100 classes, 32 x 32 records)."""
    rng = np.random.default_rng(seed)
    mini = root / "miniimagenet"
    (mini / "images").mkdir(parents=True)
    (mini / "splits" / "ravi").mkdir(parents=True)
    for k, split in enumerate(("train", "val", "test")):
        lines = ["filename,label"]
        for c in range(5):
            label = f"n{k}{c:07d}"
            for i in range(DRY_IMAGES_PER_CLASS):
                name = f"{label}{i:08d}.png"
                Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(mini / "images" / name)
                lines.append(f"{name},{label}")
        (mini / "splits" / "ravi" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    pairs = [r.split(",") for r in packaged_split("cifar100", "classes.csv")[1:]]  # coarse,fine rows
    parent = {fine: coarse for coarse, fine in pairs}
    fine_names, coarse_names = sorted(parent), sorted(set(parent.values()))
    files = {"fine_label_names.txt": "\n".join(fine_names).encode(),
             "coarse_label_names.txt": "\n".join(coarse_names).encode()}
    for part, per_class in (("train", DRY_IMAGES_PER_CLASS - 5), ("test", 5)):
        fine = np.repeat(np.arange(100), per_class)
        coarse = np.array([coarse_names.index(parent[fine_names[f]]) for f in fine])
        pixels = rng.integers(0, 256, (len(fine), 3 * 32 * 32), dtype=np.uint8)
        records = np.concatenate([coarse[:, None], fine[:, None], pixels], axis=1).astype(np.uint8)
        files[f"{part}.bin"] = records.tobytes()
    (root / "cifar100").mkdir()
    with tarfile.open(root / "cifar100" / "cifar-100-binary.tar.gz", "w:gz", compresslevel=1) as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-100-binary/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))


def row_config(row: str, args: argparse.Namespace) -> Config:
    cfg = load_config(ROOT / "configs" / f"{row}.toml")
    changes: dict[str, Any] = {"out_dir": str(args.runs / row), "execution.device": args.device,
                               "eval.test_tasks": args.test_tasks}
    if args.first_order and cfg.algorithm.name == "maml":
        changes["algorithm.first_order"] = True
    if args.dry_run:
        changes.update({"train.meta_batch_size": 2, "train.iterations": 2, "train.validate_every": 1,
                        "train.val_tasks": 2, "train.log_every": 1, "eval.test_tasks": 5})
        if cfg.model.name == "resnet12":
            changes["model.widths"] = [8, 16, 32, 64]
        else:
            changes["model.filters"] = 8
    return cfg.override(changes)


def run_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``row`` within ``args.minutes`` (resuming its run folder), test its best checkpoint."""
    cfg = row_config(row, args)
    device = check_device(cfg)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    family = build_family(cfg, ways=cfg.task.train_ways)
    val_family = build_family(cfg, cfg.eval.shots, cfg.eval.queries, cfg.eval.ways)  # chosen for the test set-up
    test_family = val_family
    prep_s = time.perf_counter() - t0
    algorithm = build_algorithm(cfg, family)
    ident = identity(cfg, cfg.algorithm.name)
    last = run_dir / "last.pt"
    done = first = int(load_checkpoint(last)["step"]) if last.exists() else 0
    started = time.perf_counter()
    deadline = started + args.minutes * 60
    chunk, per_iter, result = min(cfg.train.validate_every, 20), None, None
    while done < cfg.train.iterations:
        if per_iter is not None:  # the rest of the budget, in whole iterations (validation included)
            chunk = min(cfg.train.validate_every, int((deadline - time.perf_counter()) / per_iter))
        if chunk < 1 or (not args.dry_run and time.perf_counter() >= deadline):
            break
        target = min(cfg.train.iterations, done + chunk)
        t_chunk = time.perf_counter()
        result = meta_train(algorithm, family, dataclasses.replace(cfg.train, iterations=target), run_dir,
                            identity=ident, val_steps=algorithm.validation_steps, resume=True, progress=False,
                            desc=row, val_family=val_family, loggers=cfg.train.loggers)
        per_iter = (time.perf_counter() - t_chunk) / max(1, result.steps - done)
        done = result.steps
        print(f"{row}: {done} iterations, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - started
    best = load_checkpoint(run_dir / "best.pt")
    algorithm.load_state_dict(best["state"])
    t1 = time.perf_counter()
    test = meta_test(algorithm, test_family, "test", cfg.eval.test_tasks, steps=cfg.eval.steps, progress=False)
    final = test.per_step[-1]
    published = PUBLISHED[row]
    return {
        "config": f"configs/{row}.toml", "algorithm": cfg.algorithm.name, "dataset": cfg.task.family,
        "model": cfg.model.name, "ways": cfg.eval.ways, "shots": cfg.eval.shots, "train_shots": cfg.task.shots,
        "first_order": bool(getattr(cfg.algorithm.options, "first_order", False)),
        "accuracy": 100 * final.mean, "ci95": 100 * final.ci95, "test_tasks": cfg.eval.test_tasks,
        "published": {"accuracy": published[0], "ci95": published[1], "source": published[2]},
        "iterations": done, "iterations_this_invocation": done - first, "config_iterations": cfg.train.iterations,
        "best_step": int(best["step"]), "minutes_budget": args.minutes, "train_s": train_s,
        "s_per_iteration": train_s / (done - first) if done > first else None,
        "test_s": time.perf_counter() - t1, "data_prep_s": prep_s, "device": str(device),
        "task_seed": cfg.task.seed, "init_seed": cfg.train.seed, "run_dir": str(run_dir),
    }


def write(out: Path, report: dict[str, Any]) -> None:
    atomic_write_text(out / "fewshot_rows.json", json.dumps(report, indent=2, default=str) + "\n")
    budget = ("dry run: 2 iterations a row" if report["dry_run"] else
              f"budget {report['minutes_per_row']:g} min of meta-training per row")
    lines = [
        "# 5-way few-shot rows: miniImageNet and CIFAR-FS" + (" (DRY RUN: synthetic data, no accuracy)"
                                                            if report["dry_run"] else ""),
        "",
        f"Command: `{report['command']}`; device {report['device']} ({report['machine'].get('gpu') or 'CPU'}); "
        f"{budget}; wall time {report['wall_s']:.0f} s.",
        "Each row trains its config within the budget (resuming its run folder), then tests the best-on-"
        "validation checkpoint on fixed test tasks: mean accuracy % and 95% confidence interval. Published: "
        "the paper's number and table (tested on 600-1000 episodes, trained to the end).",
        "",
        "| row | test accuracy % | published % | test tasks | iterations (best) / config's | train s | "
        "s / iteration | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, r in report["rows"].items():
        if "error" in r:
            lines.append(f"| {row} | failed: {r['error']} | | | | | | |")
            continue
        p = r["published"]
        spi = f"{r['s_per_iteration']:.3f}" if r["s_per_iteration"] else "-"
        lines.append(f"| {row} | {r['accuracy']:.2f} ± {r['ci95']:.2f} | {p['accuracy']:.2f} ± {p['ci95']:.2f} | "
                     f"{r['test_tasks']} | {r['iterations']} ({r['best_step']}) / {r['config_iterations']} | "
                     f"{r['train_s']:.0f} | {spi} | {p['source']} |")
    for row, why in report["skipped"].items():
        lines.append(f"| {row} | skipped: {why} | {PUBLISHED[row][0]:.2f} ± {PUBLISHED[row][1]:.2f} | | | | | "
                     f"{PUBLISHED[row][2]} |")
    lines += ["", "Data: " + "; ".join(f"{d}: {'found' if v['found'] else 'absent'} ({v['why']})"
                                       for d, v in report["data"].items())]
    atomic_write_text(out / "fewshot_rows.md", "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    wall0 = time.perf_counter()
    stand_in = tempfile.TemporaryDirectory(prefix="fewshot_dry_") if args.dry_run else None
    try:
        if stand_in is not None:  # its own data, cache and run folders: nothing outside is read or written
            base = Path(stand_in.name)
            make_stand_ins(base / "data")
            os.environ["INNERLOOP_CACHE"] = str(base / "cache")
            args.data_root, args.runs = base / "data", base / "runs"
        root = data_root(args.data_root)
        if root is not None:
            os.environ["INNERLOOP_DATA"] = str(root)  # the loaders' default folder
        data = find_data(root)
        for d, v in data.items():
            print(f"data {d}: {'found' if v['found'] else 'absent'}: {v['why']}", flush=True)
        wanted = args.rows or list(ROWS)
        available = [r for r in wanted if data[r.split("_")[0]]["found"]]
        skipped = {r: f"no {r.split('_')[0]} data ({data[r.split('_')[0]]['why']})" for r in wanted
                   if r not in available}
        print(f"rows to run: {', '.join(available) or 'none'}", flush=True)
        if args.list:
            return 0
        if not available:
            print("no row has its data here; see benchmarks/gpu/fewshot_rows.sh for where the data goes",
                  file=sys.stderr)
        args.out.mkdir(parents=True, exist_ok=True)
        given = sys.argv[1:] if argv is None else list(argv)
        report: dict[str, Any] = {
            "command": f"python benchmarks/gpu/fewshot_rows.py {shlex.join(given)}",
            "device": args.device, "machine": machine(args.device), "minutes_per_row": args.minutes,
            "dry_run": args.dry_run, "data_root": str(root) if root else None, "data": data,
            "rows": {}, "skipped": skipped, "wall_s": 0.0,
            "load_1_5_15min_at_start": os.getloadavg(),
        }
        failed = False
        for row in available:
            try:
                report["rows"][row] = run_row(row, args)
                r = report["rows"][row]
                print(f"{row}: {r['accuracy']:.2f} ± {r['ci95']:.2f} % on {r['test_tasks']} tasks after "
                      f"{r['iterations']} iterations (published {r['published']['accuracy']:.2f})", flush=True)
            except Exception as err:  # one row's failure is recorded; the other rows still run
                failed = True
                why = f"{type(err).__name__}: {err}"
                report["rows"][row] = {"error": why.replace("|", "/").replace("\n", " ")}
                print(f"{row} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            report["wall_s"] = time.perf_counter() - wall0
            write(args.out, report)
        report["wall_s"] = time.perf_counter() - wall0
        write(args.out, report)
        print((args.out / "fewshot_rows.md").read_text(), flush=True)
        return 1 if failed else 0
    finally:
        if stand_in is not None:
            stand_in.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
