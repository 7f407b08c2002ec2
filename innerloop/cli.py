"""The ``innerloop`` command line: ``train``, ``eval``, ``rl train`` and ``rl eval``.

The top layer: it reads configs, runs, prints the tables and draws the figures of a run (training
returns what the figures need and imports no plotting).
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Any

import torch.distributed

from innerloop.data.download import DataError
from innerloop.execution import PRECISIONS
from innerloop.plotting import plot_run
from innerloop.rl.config import RLConfig, RLEvalConfig, load_rl_config
from innerloop.rl.mujoco import MissingMuJoCoError
from innerloop.rl.plots import plot_rl_run
from innerloop.rl.train import load_rl_checkpoint, meta_test_rl, run_rl
from innerloop.training.checkpoint import CheckpointError
from innerloop.training.config import Config, ConfigError, load_config
from innerloop.training.device import place
from innerloop.training.distributed import DistributedError, barrier, init_from_env, rank
from innerloop.training.evaluate import format_table, meta_test, run_note
from innerloop.training.lock import RunLockedError
from innerloop.training.loop import DivergenceError
from innerloop.training.run import batch_norm_of, build_family, load_for_eval, run

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


def add_run_arguments(t: argparse.ArgumentParser, config_kind: str = "config", precision: bool = True) -> None:
    """The options of every training command (``innerloop train``, ``innerloop rl train``)."""
    t.add_argument("--config", type=Path, help=f"a .toml or .json {config_kind}; omitted keys keep defaults")
    t.add_argument("--out", help="run folder (default: the config's out_dir)")
    t.add_argument("--iterations", type=int, help="override train.iterations")
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
                        "A run resumes from OUT/last.pt when it exists and matches the config.")
    add_run_arguments(t, "RL config", precision=False)
    e = rsub.add_parser("eval", help="test a checkpoint on fixed test tasks")
    e.add_argument("checkpoint", type=Path, help="a last.pt written by `innerloop rl train`")
    add_device_arguments(e, precision=False)
    defaults = RLEvalConfig()
    e.add_argument("--tasks", type=int, default=defaults.test_tasks, help="test tasks (default %(default)s)")
    e.add_argument("--steps", type=int, default=defaults.steps, help="adaptation steps (default %(default)s)")
    e.add_argument("--rollouts", type=int, default=defaults.rollouts,
                   help="episodes per step (default %(default)s)")


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
    add_device_arguments(e)
    _add_rl_parser(sub)
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
    """The config keys that ``--out``, ``--iterations``, ``--device`` and ``--precision`` set."""
    changes: dict[str, Any] = {}
    if args.out:
        changes["out_dir"] = args.out
    if args.iterations is not None:
        changes["train.iterations"] = args.iterations
    return {**changes, **_device_overrides(args)}


def _train(args: argparse.Namespace) -> None:
    cfg = (load_config(args.config) if args.config else Config()).override(_run_overrides(args))
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


def _eval(args: argparse.Namespace) -> None:
    if args.tasks < 1 or args.steps < 0 or args.shots < 1 or args.queries < 1:
        raise ConfigError(f"--tasks ({args.tasks}), --shots ({args.shots}) and --queries "
                          f"({args.queries}) must be >= 1 and --steps ({args.steps}) >= 0.")
    cfg, algorithm = load_for_eval(args.checkpoint, _device_overrides(args))
    # the sizes asked for, checked as a config's are (against this machine's memory) before any allocation
    cfg.override({"eval.shots": args.shots, "eval.queries": args.queries, "eval.test_tasks": args.tasks})
    device = place(algorithm, cfg.execution.device)  # the device and precision were checked by load_for_eval
    res = meta_test(algorithm, build_family(cfg, args.shots, args.queries), "test", args.tasks, args.steps,
                    device=device)
    steps = sorted({0, min(1, args.steps), min(5, args.steps), args.steps})
    print(format_table({algorithm.name: res}, steps,
                       f"{cfg.task.family}: {args.shots}-shot {res.metric}, {args.tasks} test tasks",
                       run_note(device, cfg.execution.precision, batch_norm_of(cfg))))


def _rl_train(args: argparse.Namespace) -> None:
    cfg = (load_rl_config(args.config) if args.config else RLConfig()).override(_run_overrides(args))
    result = run_rl(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    plot_rl_run(result, cfg)
    print()
    print(result.table)
    print(f"\nresults, checkpoints and plots in {cfg.out_dir}/")


def _rl_eval(args: argparse.Namespace) -> None:
    if args.tasks < 2 or args.steps < 0 or args.rollouts < 2:
        raise ConfigError(f"--tasks ({args.tasks}) and --rollouts ({args.rollouts}) must be >= 2 and --steps "
                          f"({args.steps}) >= 0.")
    cfg, algorithm, family = load_rl_checkpoint(args.checkpoint, _device_overrides(args))
    cfg.override({"eval.test_tasks": args.tasks, "eval.rollouts": args.rollouts, "eval.steps": args.steps})
    try:  # a device this machine lacks: refused before the test starts
        place(algorithm, cfg.execution.device)
    except ValueError as err:
        raise ConfigError(f"execution.{err}") from err
    res = meta_test_rl(algorithm, family, args.tasks, args.steps, args.rollouts, device=cfg.execution.device)
    print(format_table({str(args.checkpoint): res}, list(range(args.steps + 1)),
                       f"{cfg.env.name}: return, {args.tasks} test tasks (mean ± 95% CI)"))


def _rl(args: argparse.Namespace) -> None:
    {"train": _rl_train, "eval": _rl_eval}[args.rl_command](args)


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"train": _train, "eval": _eval, "rl": _rl}[args.command](args)
    except (ConfigError, CheckpointError, DataError, DistributedError, MissingMuJoCoError, DivergenceError,
            RunLockedError) as err:
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
