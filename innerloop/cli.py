"""The ``innerloop`` command line: ``train``, ``eval``, ``rl train`` and ``rl eval``.

The top layer: it reads configs, runs, prints the tables and draws the figures of a run (training
returns what the figures need and imports no plotting).
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
import sys
from pathlib import Path
from typing import Any

import torch.distributed

from innerloop.data.download import DataError
from innerloop.data.images import deferred_cache_writes
from innerloop.execution import PRECISIONS
from innerloop.plotting import plot_run
from innerloop.rl.config import RLConfig, RLEvalConfig, load_rl_config
from innerloop.rl.metaworld import MissingMetaWorldError
from innerloop.rl.mujoco import MissingMuJoCoError
from innerloop.rl.plots import plot_rl_run
from innerloop.rl.train import (
    batch_text,
    load_rl_checkpoint,
    lr_text,
    meta_test_lr,
    meta_test_rl_scores,
    rl_eval_settings,
    run_rl,
)
from innerloop.rl.workers import WorkerError
from innerloop.tasks import SPLITS
from innerloop.training.checkpoint import CheckpointError, load_checkpoint
from innerloop.training.config import Config, ConfigError, load_config, read_config_file
from innerloop.training.device import place
from innerloop.training.distributed import DistributedError, barrier, init_from_env, rank
from innerloop.training.evaluate import EvalResult, StepStats, format_table, meta_test, run_note
from innerloop.training.lock import RunLockedError
from innerloop.training.loggers import LOGGER_NAMES, MissingExtraError
from innerloop.training.loop import DivergenceError
from innerloop.training.predict import INK, Predictor
from innerloop.training.run import (
    batch_norm_of,
    build_family,
    checkpoint_config,
    dataset_title,
    load_for_eval,
    refine_steps_of,
    run,
    run_eval_settings,
    tta_of,
)
from innerloop.training.settings import cli_changes, describe_fields, to_toml
from innerloop.tuning.tune import TuneConfig, load_tune_config, run_tune

DESCRIPTION = """\
innerloop: meta-learning on PyTorch.

  innerloop train                      MAML on sinusoid regression (the embedded default):
                                       meta-trains MAML and the pre-trained baseline, tests
                                       both on 600 fixed tasks, prints the table and writes
                                       plots to runs/sinusoid-maml/
  innerloop train --config FILE.toml   the same for any configured run (see configs/)
  innerloop train --set KEY=VALUE      change any config key (repeatable; `innerloop train --help`
                                       lists them all), e.g. --set algorithm.inner_lr=0.1
  innerloop config show [--config F]   print the resolved config (with --set too) as TOML
  innerloop eval CHECKPOINT            meta-test a saved checkpoint as its run did (--ways, --shots,
                                       --queries, --split, --within-alphabet, --set to change it)
  innerloop predict CHECKPOINT --support DIR --query DIR
                                       label new images with a trained model: it adapts to the
                                       support folder's class folders and labels each query image
  innerloop rl train [--config FILE]   meta-RL: MAML + TRPO on 2D navigation or HalfCheetah

  torchrun --nproc_per_node=N -m innerloop train --config FILE
                                       data-parallel meta-training on N processes
"""

RL_DESCRIPTION = """\
Meta-reinforcement learning: MAML with a vanilla policy-gradient inner step and a TRPO outer step.

  innerloop rl train                                2D navigation with the MAML paper's set-up
  innerloop rl train --config configs/rl_nav2d.toml
  innerloop rl train --config configs/rl_cheetah_vel.toml   (needs: pip install 'innerloop[rl]')
  innerloop rl eval runs/rl-nav2d/last.pt           returns after 0..3 steps on fixed test tasks
"""


def add_device_arguments(t: argparse.ArgumentParser, precision: bool = True) -> None:
    """``--device`` (and ``--precision``): overrides of ``execution.device`` / ``execution.precision``."""
    t.add_argument("--device", help="override execution.device: auto (CUDA when present), cpu, cuda, cuda:N, mps")
    if precision:
        t.add_argument("--precision", choices=PRECISIONS,
                       help="override execution.precision (fp16 needs a GPU; bf16 is slow on most CPUs)")


def add_set_argument(t: argparse.ArgumentParser, command: str) -> None:
    """``--set KEY=VALUE``, repeatable: any config key (:func:`innerloop.training.settings.cli_changes`)."""
    t.add_argument("--set", action="append", dest="settings", metavar="KEY=VALUE", default=[],
                   help="set any config key, e.g. --set algorithm.inner_lr=0.1 --set task.family=omniglot "
                   f"(repeatable; VALUE in TOML syntax; `{command} --help` lists the keys)")


def add_run_arguments(t: argparse.ArgumentParser, config_kind: str = "config", precision: bool = True,
                      command: str = "innerloop train") -> None:
    """The options of every training command (``innerloop train``, ``innerloop rl train``)."""
    t.add_argument("--config", type=Path, help=f"a .toml or .json {config_kind}; omitted keys keep defaults")
    add_set_argument(t, command)
    t.add_argument("--out", help="run folder (default: the config's out_dir)")
    t.add_argument("--iterations", type=int, help="override train.iterations")
    t.add_argument("--logger", action="append", choices=LOGGER_NAMES, metavar="NAME",
                   help=f"where the metrics go, repeatable: {', '.join(LOGGER_NAMES)} (sets train.loggers; "
                   "default: the config's, jsonl)")
    add_device_arguments(t, precision)
    t.add_argument("--overwrite", action="store_true", help="discard checkpoints in the run folder")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_rl_parser(sub: Any) -> None:
    """``rl`` and its subcommands on the main parser's subparsers."""
    rl = sub.add_parser("rl", help="meta-RL: MAML + TRPO on 2D navigation and HalfCheetah",
                        description=RL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = rl.add_subparsers(dest="rl_command", required=True, metavar="{train,eval}")
    t = rsub.add_parser("train", help="meta-train, then test MAML, the pre-trained policy and a random init",
                        description="Meta-train, then report returns after 0..k adaptation steps with 95% CIs. "
                        "A run resumes from OUT/last.pt when it exists and matches the config.",
                        epilog=describe_fields(RLConfig(), "innerloop rl train"),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(t, "RL config", precision=False, command="innerloop rl train")
    e = rsub.add_parser("eval", help="test a checkpoint on fixed test tasks")
    e.add_argument("checkpoint", type=Path, help="a last.pt written by `innerloop rl train`")
    add_device_arguments(e, precision=False)
    e.description = ("Rebuild the policy a checkpoint was trained with and test it. Every setting not given "
                     "defaults to the run's own: the config the checkpoint stores, else (an older checkpoint) "
                     "the results.json beside it when that is the run's, else the defaults "
                     f"({RLEvalConfig().test_tasks} tasks, {RLEvalConfig().steps} steps, "
                     f"{RLEvalConfig().rollouts} episodes per step).")
    e.add_argument("--tasks", type=int, help="test tasks (default: the run's eval.test_tasks)")
    e.add_argument("--steps", type=int, help="adaptation steps (default: the run's eval.steps)")
    e.add_argument("--rollouts", type=int, help="episodes per step (default: the run's eval.rollouts); with "
                   "--batch-steps, the most episodes a batch may have")
    e.add_argument("--lr", type=float, help="step size of the adaptation (default: the run's eval.inner_lr, else "
                   "its algorithm.inner_lr)")
    e.add_argument("--later-lr", type=float, help="step size of the steps after the first (default: the run's "
                   "eval.later_lr, else as the first)")
    e.add_argument("--batch-steps", type=int, help="each step's batch: the first episodes holding this many "
                   "environment steps (the MAML paper's test script: 4000); default: the run's eval.batch_steps")


def _add_tune_parser(sub: Any) -> None:
    """``tune``: hypergradient tuning of a training run (:mod:`innerloop.tuning`)."""
    t = sub.add_parser("tune", help="tune the learning rates, weight decay or data weights of a training run by "
                       "hypergradients", description="Gradient descent on the hyperparameters of an SGD training "
                       "run (unrolled or implicit hypergradient of the validation loss), then a fresh run with "
                       "the tuned values; writes OUT/results.json. A run resumes from OUT/last.pt when it exists "
                       "and matches the config.", epilog=describe_fields(TuneConfig(), "innerloop tune"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", type=Path, help="a .toml or .json tuning config; omitted keys keep defaults")
    add_set_argument(t, "innerloop tune")
    t.add_argument("--out", help="run folder (default: the config's out_dir)")
    t.add_argument("--overwrite", action="store_true", help="discard checkpoints in the run folder")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _tune(args: argparse.Namespace) -> None:
    cfg = load_tune_config(args.config) if args.config is not None else TuneConfig()
    changes = cli_changes(cfg, args.settings, "innerloop tune")
    if args.out is not None:
        changes["out_dir"] = args.out
    cfg = cfg.override(changes)
    done = run_tune(cfg, progress=not args.no_progress, overwrite=args.overwrite,
                    command="innerloop " + " ".join(sys.argv[1:]))
    tuned = {k: v if isinstance(v, float) else f"[{len(v)} values]" for k, v in done.results["tuned"].items()}
    print(f"tuned ({cfg.method.name}): {tuned}")
    print(f"validation loss {done.start_val_loss:.4f} -> {done.val_loss:.4f}; held-out test loss "
          f"{done.results['start_test_loss']:.4f} -> {done.test_loss:.4f}")
    print(f"results in {cfg.out_dir}/results.json")


def _add_predict_parser(sub: Any) -> None:
    """``predict``: label new images with a trained checkpoint (:class:`~innerloop.training.predict.Predictor`)."""
    pr = sub.add_parser("predict", help="label new images with a trained model (no training data needed)",
                        description="Rebuild the model a checkpoint was trained with (from the checkpoint alone), "
                        "adapt it to the support images and print the predicted label and its probability for "
                        "every query image. Images of any size, grey or RGB, are preprocessed as the run's "
                        "training images were.")
    pr.add_argument("checkpoint", type=Path, help="a best.pt or last.pt written by `innerloop train`")
    pr.add_argument("--support", type=Path, required=True,
                    help="a folder with one sub-folder of images per class, named by the class's label")
    pr.add_argument("--query", type=Path, required=True, help="a folder of the image files to label")
    pr.add_argument("--steps", type=int, help="adaptation steps (default: the run's eval.steps)")
    pr.add_argument("--ink", choices=INK, default="auto", help="ink drawings (Omniglot models): dark ink on "
                    "light paper, light on dark, or auto (detected per image; default)")
    pr.add_argument("--format", choices=("table", "json", "csv"), default="table",
                    help="output format (default %(default)s; json and csv hold every class's probability)")
    add_device_arguments(pr, precision=False)


def _predict(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 0:
        raise ConfigError(f"--steps {args.steps} is invalid: it must be >= 0.")
    for flag in ("support", "query"):
        folder = getattr(args, flag)
        if not folder.is_dir():
            raise DataError(f"--{flag} {str(folder)!r} is not a folder; give "
                            + ("a folder with one sub-folder of images per class." if flag == "support"
                               else "a folder of image files."))
    predictor = Predictor.load(args.checkpoint, device=args.device)  # a device this machine lacks: ConfigError
    try:
        pred = predictor.predict(args.support, None, args.query, steps=args.steps, ink=args.ink)
    except ValueError as err:  # the support's way count, labels: the user's folders
        if isinstance(err, DataError):
            raise
        raise ConfigError(str(err)) from err
    rows = pred.rows()
    for row in rows:
        row["name"] = Path(row["name"]).relative_to(args.query).as_posix()
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["image", "label", "score", *(f"score_{c}" for c in pred.classes)])
        for row in rows:
            writer.writerow([row["name"], row["label"], f"{row['score']:.6f}",
                             *(f"{v:.6f}" for v in row["scores"].values())])
    else:
        steps = predictor.steps if args.steps is None else args.steps
        print(f"{predictor.algorithm.name}, {len(pred.classes)}-way ({', '.join(map(str, pred.classes))}), "
              f"{steps} adaptation step{'s' * (steps != 1)}, {len(rows)} query images:")
        width = max(len("image"), *(len(r["name"]) for r in rows))
        lwidth = max(len("label"), *(len(str(r["label"])) for r in rows))
        print(f"{'image':<{width}}  {'label':<{lwidth}}  score")
        for row in rows:
            print(f"{row['name']:<{width}}  {row['label']!s:<{lwidth}}  {row['score']:.3f}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="innerloop", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,predict,config,rl,tune}")
    t = sub.add_parser("train", help="meta-train, meta-test and report (default: MAML on sinusoids)",
                       description="Meta-train, then meta-test with 95% CIs. A run resumes from "
                       "OUT/last.pt when it exists and matches the config.",
                       epilog=describe_fields(Config()), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(t)
    e = sub.add_parser("eval", help="meta-test a checkpoint on fixed test tasks",
                       description="Rebuild the model a checkpoint was trained with and meta-test it. Every "
                       "setting not given (flags, --set) defaults to the run's own: the config the checkpoint "
                       "stores (its [eval] section), else (a checkpoint of innerloop 0.1) its results.json "
                       "beside the checkpoint when that is the run's, else the checkpoint's training tasks "
                       "(classification) or the 5-shot, 100-query protocol (regression). The table's title "
                       "names the source used. --device and --precision are this machine's (default: auto, "
                       "fp32). Accuracy is printed in percent.")
    e.add_argument("checkpoint", type=Path, help="a best.pt or last.pt written by `innerloop train`")
    e.add_argument("--tasks", type=int, help="test tasks (default: the run's eval.test_tasks)")
    e.add_argument("--steps", type=int, help="adaptation steps (default: the run's eval.steps)")
    e.add_argument("--ways", type=int, help="classes per task, N (default: the run's)")
    e.add_argument("--shots", type=int, help="support examples per class (per task for regression), K "
                   "(default: the run's)")
    e.add_argument("--queries", type=int, help="query examples per class (per task for regression) "
                   "(default: the run's)")
    e.add_argument("--split", choices=SPLITS, default="test", help="the split whose tasks are used "
                   "(default %(default)s)")
    e.add_argument("--within-alphabet", action=argparse.BooleanOptionalAction, default=None,
                   help="draw each task's classes from one alphabet (Omniglot) / group (default: the "
                   "config's task.sampling.<split>.within_alphabet)")
    add_set_argument(e, "innerloop train")
    add_device_arguments(e)
    _add_predict_parser(sub)
    c = sub.add_parser("config", help="print the resolved config",
                       description="Print the config a run would use: the defaults, --config FILE, then each "
                       "--set.")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="{show}")
    show = csub.add_parser("show", help="print the resolved config (TOML: a config file; JSON keeps nulls)")
    show.add_argument("--config", type=Path, help="a .toml or .json config (a meta-RL one too)")
    show.add_argument("--rl", action="store_true", help="the meta-RL config (without --config)")
    show.add_argument("--format", choices=("toml", "json"), default="toml", help="output format "
                      "(default %(default)s; TOML has no null: such a key is written as a comment)")
    add_set_argument(show, "innerloop train")
    _add_rl_parser(sub)
    _add_tune_parser(sub)
    return p


def _device_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys that ``--device`` and ``--precision`` set."""
    changes: dict[str, Any] = {}
    if args.device is not None:
        changes["execution.device"] = args.device
    if getattr(args, "precision", None) is not None:
        changes["execution.precision"] = args.precision
    return changes


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys that ``--out``, ``--iterations``, ``--logger``, ``--device`` and ``--precision`` set."""
    changes: dict[str, Any] = {}
    if args.out:
        changes["out_dir"] = args.out
    if args.iterations is not None:
        changes["train.iterations"] = args.iterations
    if args.logger:
        changes["train.loggers"] = list(dict.fromkeys(args.logger))
    return {**changes, **_device_overrides(args)}


def _resolved(base: Any, args: argparse.Namespace, command: str) -> Any:
    """``base`` with every ``--set`` and then the named flags (``--out``, ...) applied, checked."""
    return base.override({**cli_changes(base, args.settings, command), **_run_overrides(args)})


def _train(args: argparse.Namespace) -> None:
    cfg = _resolved(load_config(args.config) if args.config else Config(), args, "innerloop train")
    # under torchrun: join the process group (NCCL on GPUs, gloo for a CPU run)
    distributed = init_from_env(cfg.train.dist_timeout_s, cfg.execution.device)
    lead = rank() == 0
    try:
        result = run(cfg, progress=not args.no_progress, overwrite=args.overwrite)
        if lead:
            plot_run(result, cfg)
        # rank 0 still writes results and plots: the others wait for it, so no rank tears down
        # gloo while a peer still holds the connection (which aborts the process)
        barrier("barrier at the end of the run")
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if lead:
        print()
        print(result.table)
        print(f"\nresults, checkpoints and plots in {cfg.out_dir}/")


def _percent(res: EvalResult) -> EvalResult:
    """An accuracy result in percent (``98.70 ± 0.40``), as papers and the README quote it."""
    def pct(s: StepStats) -> StepStats:
        return _PercentStats(100 * s.mean, 100 * s.ci95)

    return EvalResult("accuracy (%)", res.tasks, [pct(s) for s in res.per_step], res.loss_per_step)


class _PercentStats(StepStats):
    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.ci95:.2f}"


def _eval(args: argparse.Namespace) -> None:
    for flag in ("tasks", "ways", "shots", "queries"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} {value} is invalid: it must be >= 1.")
    if args.steps is not None and args.steps < 0:
        raise ConfigError(f"--steps {args.steps} is invalid: it must be >= 0.")
    payload = load_checkpoint(args.checkpoint)
    saved = checkpoint_config(payload, None, str(args.checkpoint))
    defaults, source = run_eval_settings(args.checkpoint, payload, saved)
    changes = {**cli_changes(saved, args.settings, "innerloop train"), **_device_overrides(args)}
    # --set eval.KEY beats the run's own settings (and the flags beat --set); null: the training tasks'
    training = {"ways": saved.task.ways, "shots": saved.task.shots, "queries": saved.task.queries}
    for key in ("ways", "shots", "queries", "test_tasks", "steps"):
        if f"eval.{key}" in changes:
            value = changes[f"eval.{key}"]
            defaults[key] = training[key] if value is None and key in training else value
    split = args.split
    if args.within_alphabet is not None:
        changes[f"task.sampling.{split}.within_alphabet"] = args.within_alphabet
    classification = saved.objective_kind == "classification"
    if args.ways is not None and not classification:
        raise ConfigError(f"--ways {args.ways} is invalid: {saved.task.family} tasks are regression (no classes).")
    ways = args.ways or defaults["ways"]
    shots, queries = args.shots or defaults["shots"], args.queries or defaults["queries"]
    tasks = args.tasks or defaults["test_tasks"]
    steps = defaults["steps"] if args.steps is None else args.steps
    with deferred_cache_writes():  # a failed evaluation leaves no preprocessed cache behind
        cfg, algorithm = load_for_eval(args.checkpoint, changes, payload=payload)
        shown = sorted({0, min(1, steps), min(5, steps), steps})
        # the sizes asked for, checked as a config's are (the head's ways; this machine's memory) before any work
        cfg = cfg.override({"eval.shots": shots, "eval.queries": queries, "eval.test_tasks": tasks,
                            "eval.ways": ways, "eval.steps": steps, "eval.report_steps": shown})
        family = build_family(cfg, shots, queries, ways, splits=(split,), tta=True)
    device = place(algorithm, cfg.execution.device)  # the device and precision were checked by load_for_eval
    res = meta_test(algorithm, family, split, tasks, steps, device=device)
    if res.metric == "accuracy":
        res = _percent(res)
    size = f"{ways}-way {shots}-shot" if classification else f"{shots}-shot"
    title = (f"{dataset_title(cfg, split)}: {size} {res.metric}, {queries} queries"
             f"{' per class' if classification else ''}, {tasks} {split} tasks (settings not given: from "
             f"{source})")
    print(format_table({algorithm.name: res}, shown, title,
                       run_note(device, cfg.execution.precision, batch_norm_of(cfg), tta_of(cfg),
                                refine_steps_of(cfg))))


def _config_show(args: argparse.Namespace) -> None:
    rl = args.rl
    if args.config is not None:
        data = read_config_file(args.config)
        rl = rl or "env" in data or "policy" in data
    base: Any
    if rl:
        base = load_rl_config(args.config) if args.config else RLConfig()
    else:
        base = load_config(args.config) if args.config else Config()
    cfg = base.override(cli_changes(base, args.settings, "innerloop rl train" if rl else "innerloop train"))
    print(to_toml(cfg.to_dict()) if args.format == "toml" else json.dumps(cfg.to_dict(), indent=2), end="")
    if args.format == "json":
        print()


def _rl_train(args: argparse.Namespace) -> None:
    cfg = _resolved(load_rl_config(args.config) if args.config else RLConfig(), args, "innerloop rl train")
    result = run_rl(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    plot_rl_run(result, cfg)
    print()
    print(result.table)
    print(f"\nresults, checkpoints and plots in {cfg.out_dir}/")


def _rl_eval(args: argparse.Namespace) -> None:
    for flag, low in (("tasks", 2), ("rollouts", 2), ("steps", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise ConfigError(f"--{flag} {value} is invalid: it must be >= {low}.")
    payload = load_checkpoint(args.checkpoint)
    cfg, algorithm, family = load_rl_checkpoint(args.checkpoint, _device_overrides(args), payload=payload)
    run_eval, source = rl_eval_settings(args.checkpoint, payload, cfg)
    tasks = run_eval.test_tasks if args.tasks is None else args.tasks
    steps = run_eval.steps if args.steps is None else args.steps
    rollouts = run_eval.rollouts if args.rollouts is None else args.rollouts
    first = args.lr if args.lr is not None else (run_eval.inner_lr or cfg.algorithm.inner_lr)
    later = run_eval.later_lr if args.later_lr is None else args.later_lr
    batch_steps = run_eval.batch_steps if args.batch_steps is None else args.batch_steps
    cfg = cfg.override({"eval.test_tasks": tasks, "eval.rollouts": rollouts, "eval.steps": steps,
                        "eval.inner_lr": first, "eval.later_lr": later,
                        "eval.batch_steps": batch_steps})  # checked as a config's are, before any work
    lr = meta_test_lr(cfg)
    try:  # a device this machine lacks: refused before the test starts
        place(algorithm, cfg.execution.device)
    except ValueError as err:
        raise ConfigError(f"execution.{err}") from err
    tested = meta_test_rl_scores(algorithm, family, tasks, steps, rollouts, lr, device=cfg.execution.device,
                                 batch_steps=batch_steps)
    print(format_table({str(args.checkpoint): tested.returns}, list(range(steps + 1)),
                       f"{cfg.env.name}: return after 0..{steps} policy-gradient steps ({lr_text(lr)}, "
                       f"{batch_text(cfg.eval)} per step), {tasks} test tasks (mean ± 95% CI; settings not "
                       f"given: from {source})"))
    if tested.success is not None:  # Meta-World: the share of episodes with any successful step
        print()
        print(format_table({str(args.checkpoint): tested.success}, list(range(steps + 1)),
                           f"{cfg.env.name}: success rate after 0..{steps} steps, the same tasks and episodes "
                           "(mean ± 95% CI)"))


def _rl(args: argparse.Namespace) -> None:
    {"train": _rl_train, "eval": _rl_eval}[args.rl_command](args)


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"train": _train, "eval": _eval, "predict": _predict, "rl": _rl, "config": _config_show,
         "tune": _tune}[args.command](args)
    except (ConfigError, CheckpointError, DataError, DistributedError, MissingMuJoCoError, MissingMetaWorldError,
            DivergenceError, RunLockedError, MissingExtraError, WorkerError) as err:
        print(f"innerloop: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk, not innerloop: one line with the file and what to do
        if err.errno not in _DISK_ERRORS:
            raise
        where = f" writing {err.filename!r}" if err.filename else ""
        print(f"innerloop: error: {err.strerror}{where}. The run's checkpoints written before are intact; free "
              "space (or fix the folder's permissions) and run the same command again to resume, or choose "
              "another folder with --out.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
