"""A user's network of stock ``torch.nn`` layers against innerloop's ``Conv4``, on Omniglot 5-way 1-shot.

The same architecture twice (MAML's Omniglot conv-4: 64 filters, strided 3x3 convolutions, BatchNorm,
ReLU, a linear head), from the same initial weights: innerloop's ``Conv4`` (BatchNorm with batch
statistics only) and ``StockConv4`` written with ``nn.Conv2d`` / ``nn.BatchNorm2d`` as a user writes it
(running statistics tracked, the torch default). Rows:

* ``conv4 / batch``: innerloop's model, ``batch_norm = "batch"`` (the MAML protocol);
* ``stock / batch``: the stock model under the same policy: its running buffers are never used or
  written, so it must match the row above (its float64 meta-gradient does: ``tests/test_norm.py``);
* ``stock / running``: the stock model with ``batch_norm = "running"``: running statistics accumulated
  in meta-training and used by every forward at test time (the non-transductive protocol).

MAML, 1 inner step of 0.4, meta-batch 32, Adam 1e-3 (configs/omniglot_maml_5w1s.toml) for
``--iterations`` steps; meta-test on 600 fixed test tasks (15 queries per class) after 3 steps, with
95% intervals. Each row checkpoints (``runs/stock_batchnorm/<row>``) and resumes; a finished row is
kept in the results file and skipped.

    INNERLOOP_DATA=../shared/data python benchmarks/stock_batchnorm.py [--iterations 200] [--threads 1]

Writes benchmarks/results/stock_batchnorm.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from innerloop.algorithms import MAML
from innerloop.data import task_family
from innerloop.models import Conv4
from innerloop.training import TrainConfig, meta_test, meta_train
from innerloop.training.checkpoint import load_checkpoint
from innerloop.training.evaluate import machine

RESULTS = Path(__file__).parent / "results"
ROWS = ("conv4/batch", "stock/batch", "stock/running")


class StockConv4(nn.Module):
    """MAML's Omniglot conv-4 from stock layers: ``[n, 1, 28, 28] -> [n, ways]``."""

    def __init__(self, ways: int = 5, hidden: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(1 if i == 0 else hidden, hidden, 3, stride=2, padding=1),
                          nn.BatchNorm2d(hidden), nn.ReLU()) for i in range(4)], nn.Flatten())
        self.head = nn.Linear(hidden * 2 * 2, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    ours = Conv4(1, 5, 64, 28, pool="stride")
    if kind == "conv4":
        return ours
    stock = StockConv4()
    stock.load_state_dict(ours.state_dict(), strict=False)  # the same initial weights; fresh running buffers
    return stock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test-tasks", type=int, default=600)
    ap.add_argument("--runs", type=Path, default=Path("runs/stock_batchnorm"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_json = args.out / "stock_batchnorm.json"
    done: dict[str, dict] = json.loads(out_json.read_text())["rows"] if out_json.exists() else {}
    done = {k: v for k, v in done.items() if v.get("iterations") == args.iterations}
    family = task_family("omniglot", shots=1, queries=15, ways=5, seed=0, split="vinyals")
    cfg = TrainConfig(iterations=args.iterations, meta_batch_size=32, outer_lr=1e-3, validate_every=50,
                      val_tasks=20, log_every=10)
    for row in ROWS:
        if row in done:
            continue
        kind, policy = row.split("/")
        alg = MAML(model(kind), "classification", inner_lr=0.4, inner_steps=1, batch_norm=policy,
                   task_threads=args.threads)
        t0 = time.perf_counter()
        trained = meta_train(alg, family, cfg, args.runs / row.replace("/", "_"), val_steps=1)
        result = meta_test(alg, family, "test", args.test_tasks, steps=3)
        done[row] = {"iterations": args.iterations, "accuracy_after_3": result.per_step[3].mean,
                     "ci95": result.per_step[3].ci95, "accuracy_after_0": result.per_step[0].mean,
                     "train_wall_s": trained.wall_time_s, "row_wall_s": time.perf_counter() - t0,
                     "batch_norm": policy, "model": kind}
        print(row, done[row], file=sys.stderr, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        given = sys.argv[1:] if argv is None else argv
        payload = {"command": "python benchmarks/stock_batchnorm.py " + " ".join(given),
                   "date": datetime.date.today().isoformat(), "machine": machine(), "rows": done,
                   "setting": {"family": "omniglot vinyals", "ways": 5, "shots": 1, "queries": 15, "algorithm":
                               "maml", "inner_lr": 0.4, "inner_steps": 1, "meta_batch_size": 32, "outer_lr": 1e-3,
                               "seed": 0, "test_tasks": args.test_tasks, "test_steps": 3}}
        out_json.write_text(json.dumps(payload, indent=2) + "\n")
    # Running statistics fix the normalisation at test time, so the inner step of 0.4 (chosen for batch
    # statistics, whose normalisation rescales every step) overshoots: the same final weights scored with
    # smaller test-time inner rates.
    row = done.get("stock/running")
    if row is not None and "test_inner_lr" not in row:
        alg = MAML(model("stock"), "classification", inner_lr=0.4, inner_steps=1, batch_norm="running")
        alg.load_state_dict(load_checkpoint(args.runs / "stock_running" / "last.pt")["state"])
        row["test_inner_lr"] = {}
        for lr in (0.1, 0.04, 0.01):
            probe = MAML(alg.model, "classification", inner_lr=lr, inner_steps=1, batch_norm="running")
            r = meta_test(probe, family, "test", args.test_tasks, steps=3)
            row["test_inner_lr"][str(lr)] = {"accuracy_after_3": r.per_step[3].mean, "ci95": r.per_step[3].ci95}
            print("stock/running at test inner lr", lr, r.per_step[3], file=sys.stderr, flush=True)
        payload = json.loads(out_json.read_text())
        payload["rows"] = done
        out_json.write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# A stock-torch.nn conv-4 against innerloop's Conv4 (Omniglot 5-way 1-shot, MAML)", "",
             f"`python benchmarks/stock_batchnorm.py --iterations {args.iterations} --threads {args.threads}`, "
             f"{machine()['cpu']}, torch {machine()['torch']}; same initial weights (seed 0), task seed 0, "
             f"{args.iterations} iterations x 32 tasks, {args.test_tasks} fixed test tasks, 15 queries per "
             "class.", "",
             "| model | batch_norm | accuracy % after 3 steps (95% CI) | after 0 steps | train wall time |",
             "|---|---|---|---|---|"]
    for row in ROWS:
        if row in done:
            r = done[row]
            lines.append(f"| {r['model']} | {r['batch_norm']} | {100 * r['accuracy_after_3']:.2f} ± "
                         f"{100 * r['ci95']:.2f} | {100 * r['accuracy_after_0']:.2f} | "
                         f"{r['train_wall_s'] / 60:.1f} min |")
    sweep = done.get("stock/running", {}).get("test_inner_lr", {})
    if sweep:
        lines += ["", "The `stock / running` weights at the end of training, scored with another test-time inner "
                  "learning rate (trained with 0.4; running statistics fix the normalisation, so 0.4 "
                  "overshoots):", "", "| test-time inner lr | accuracy % after 3 steps (95% CI) |", "|---|---|"]
        lines += [f"| {lr} | {100 * r['accuracy_after_3']:.2f} ± {100 * r['ci95']:.2f} |"
                  for lr, r in sweep.items()]
    (args.out / "stock_batchnorm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
