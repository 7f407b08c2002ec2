"""``innerloop rl train`` and ``innerloop rl eval``: the meta-RL commands of the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from innerloop.cli import add_run_arguments
from innerloop.rl.config import RLConfig, RLEvalConfig, load_rl_config
from innerloop.training.config import ConfigError

DESCRIPTION = """\
Meta-reinforcement learning: MAML with a vanilla policy-gradient inner step and a TRPO outer step.

  innerloop rl train                                2D navigation with the MAML paper's set-up
  innerloop rl train --config configs/rl_nav2d.toml
  innerloop rl train --config configs/rl_cheetah_vel.toml   (needs: pip install 'innerloop[rl]')
  innerloop rl eval runs/rl-nav2d/last.pt           returns after 0..3 steps on fixed test tasks
"""


def add_parser(sub: Any) -> None:
    """Register ``rl`` and its subcommands on the main parser's subparsers."""
    rl = sub.add_parser("rl", help="meta-RL: MAML + TRPO on 2D navigation and HalfCheetah",
                        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = rl.add_subparsers(dest="rl_command", required=True, metavar="{train,eval}")
    t = rsub.add_parser("train", help="meta-train, then test MAML, the pre-trained policy and a random init",
                        description="Meta-train, then report returns after 0..k adaptation steps with 95% CIs. "
                        "A run resumes from OUT/last.pt when it exists and matches the config.")
    add_run_arguments(t, "RL config")
    e = rsub.add_parser("eval", help="test a checkpoint on fixed test tasks")
    e.add_argument("checkpoint", type=Path, help="a last.pt written by `innerloop rl train`")
    defaults = RLEvalConfig()
    e.add_argument("--tasks", type=int, default=defaults.test_tasks, help="test tasks (default %(default)s)")
    e.add_argument("--steps", type=int, default=defaults.steps, help="adaptation steps (default %(default)s)")
    e.add_argument("--rollouts", type=int, default=defaults.rollouts,
                   help="episodes per step (default %(default)s)")


def run_command(args: argparse.Namespace) -> None:
    from innerloop.rl.train import format_table, load_rl_checkpoint, meta_test_rl, run_rl

    if args.rl_command == "train":
        cfg = load_rl_config(args.config) if args.config else RLConfig()
        if args.out:
            cfg.out_dir = args.out
        if args.iterations is not None:
            cfg.train.iterations = args.iterations
        report = run_rl(cfg.validate(), progress=not args.no_progress, overwrite=args.overwrite)
        print()
        print(report["table"])
        print(f"\nresults, checkpoints and plots in {cfg.out_dir}/")
        return
    if args.tasks < 2 or args.steps < 0 or args.rollouts < 2:
        raise ConfigError(f"--tasks ({args.tasks}) and --rollouts ({args.rollouts}) must be >= 2 and --steps "
                          f"({args.steps}) >= 0.")
    cfg, algorithm, family = load_rl_checkpoint(args.checkpoint)
    res = meta_test_rl(algorithm, family, args.tasks, args.steps, args.rollouts)
    print(format_table({str(args.checkpoint): res}, list(range(args.steps + 1)),
                       f"{cfg.env.name}: return, {args.tasks} test tasks (mean ± 95% CI)"))
