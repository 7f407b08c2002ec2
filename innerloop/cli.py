"""The ``innerloop`` command line: ``train`` and ``eval``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from innerloop.data.download import DataError
from innerloop.training.checkpoint import CheckpointError
from innerloop.training.config import Config, ConfigError, load_config
from innerloop.training.distributed import DistributedError

DESCRIPTION = """\
innerloop: meta-learning on PyTorch.

  innerloop train                      MAML on sinusoid regression (the embedded default):
                                       meta-trains MAML and the pre-trained baseline, tests
                                       both on 600 fixed tasks, prints the table and writes
                                       plots to runs/sinusoid-maml/
  innerloop train --config FILE.toml   the same for any configured run (see configs/)
  innerloop eval CHECKPOINT            meta-test a saved checkpoint
  innerloop rl train [--config FILE]   meta-RL: MAML + TRPO on 2D navigation or HalfCheetah

  torchrun --nproc_per_node=N -m innerloop train --config FILE
                                       data-parallel meta-training on N processes
"""


def add_run_arguments(t: argparse.ArgumentParser, config_kind: str = "config") -> None:
    """The options of every training command (``innerloop train``, ``innerloop rl train``)."""
    t.add_argument("--config", type=Path, help=f"a .toml or .json {config_kind}; omitted keys keep defaults")
    t.add_argument("--out", help="run folder (default: the config's out_dir)")
    t.add_argument("--iterations", type=int, help="override train.iterations")
    t.add_argument("--overwrite", action="store_true", help="discard checkpoints in the run folder")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="innerloop", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,rl}")
    t = sub.add_parser("train", help="meta-train, meta-test and report (default: MAML on sinusoids)",
                       description="Meta-train, then meta-test with 95% CIs. A run resumes from "
                       "OUT/last.pt when it exists and matches the config.")
    add_run_arguments(t)
    e = sub.add_parser("eval", help="meta-test a checkpoint on fixed test tasks",
                       description="Rebuild the model a checkpoint was trained with and meta-test it.")
    e.add_argument("checkpoint", type=Path, help="a best.pt or last.pt written by `innerloop train`")
    defaults = Config().eval
    e.add_argument("--tasks", type=int, default=defaults.test_tasks, help="test tasks (default %(default)s)")
    e.add_argument("--steps", type=int, default=defaults.steps, help="adaptation steps (default %(default)s)")
    e.add_argument("--shots", type=int, default=defaults.shots, help="support size (default %(default)s)")
    e.add_argument("--queries", type=int, default=defaults.queries, help="query size (default %(default)s)")
    from innerloop.rl.cli import add_parser as add_rl_parser

    add_rl_parser(sub)
    return p


def _train(args: argparse.Namespace) -> None:
    import torch.distributed

    from innerloop.training.distributed import barrier, init_from_env, rank
    from innerloop.training.run import run

    cfg = load_config(args.config) if args.config else Config()
    if args.out:
        cfg.out_dir = args.out
    if args.iterations is not None:
        cfg.train.iterations = args.iterations
    cfg.validate()
    distributed = init_from_env(cfg.train.dist_timeout_s)  # under torchrun: join the process group
    lead = rank() == 0
    try:
        report = run(cfg, progress=not args.no_progress, overwrite=args.overwrite)
        # rank 0 still writes results and plots: the others wait for it, so no rank tears down
        # gloo while a peer still holds the connection (which aborts the process)
        barrier("barrier at the end of the run")
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if lead:
        print()
        print(report["table"])
        print(f"\nresults, checkpoints and plots in {cfg.out_dir}/")


def _eval(args: argparse.Namespace) -> None:
    from innerloop.training.evaluate import meta_test
    from innerloop.training.run import build_family, format_table, load_for_eval

    if args.tasks < 1 or args.steps < 0 or args.shots < 1 or args.queries < 1:
        raise ConfigError(f"--tasks ({args.tasks}), --shots ({args.shots}) and --queries "
                          f"({args.queries}) must be >= 1 and --steps ({args.steps}) >= 0.")
    cfg, algorithm = load_for_eval(args.checkpoint)
    res = meta_test(algorithm, build_family(cfg, args.shots, args.queries), "test", args.tasks, args.steps)
    steps = sorted({0, min(1, args.steps), min(5, args.steps), args.steps})
    print(format_table({algorithm.name: res}, steps,
                       f"{cfg.task.family}: {args.shots}-shot {res.metric}, {args.tasks} test tasks"))


def _rl(args: argparse.Namespace) -> None:
    from innerloop.rl.cli import run_command

    run_command(args)


def main(argv: list[str] | None = None) -> int:
    from innerloop.rl.mujoco import MissingMuJoCoError

    args = _parser().parse_args(argv)
    try:
        {"train": _train, "eval": _eval, "rl": _rl}[args.command](args)
    except (ConfigError, CheckpointError, DataError, DistributedError, MissingMuJoCoError) as err:
        print(f"innerloop: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
