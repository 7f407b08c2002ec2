"""Outer learning-rate schedules: the outer step size as a pure function of the iteration.

Being a function of the step only (no scheduler state), a schedule resumes exactly: the loop
sets the rate of iteration ``step`` before every outer step.
"""

from __future__ import annotations

import math

import torch

from innerloop.training.config import TrainConfig

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


def outer_lr_at(cfg: TrainConfig, step: int) -> float:
    """The outer learning rate of iteration ``step`` (0-based) of ``cfg.iterations``.

    With ``t = step / iterations`` and ``lr0 = outer_lr``, ``lr1 = final_outer_lr``:

    * ``constant``: ``lr0``;
    * ``linear``: ``lr0 + (lr1 - lr0) t``, Reptile's annealed outer step size
      (Nichol et al. 2018: ``eps (1 - t)`` with ``lr1 = 0``);
    * ``cosine``: ``lr1 + (lr0 - lr1) (1 + cos(pi t)) / 2``, MAML++'s cosine-annealed meta
      learning rate (Antoniou et al. 2019, after Loshchilov & Hutter 2017).
    """
    if cfg.lr_schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose one of {SCHEDULES}.")
    if cfg.lr_schedule == "constant":
        return cfg.outer_lr
    t = step / cfg.iterations
    lr0, lr1 = cfg.outer_lr, cfg.final_outer_lr
    if cfg.lr_schedule == "linear":
        return lr0 + (lr1 - lr0) * t
    return lr1 + (lr0 - lr1) * (1 + math.cos(math.pi * t)) / 2


def set_outer_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> None:
    """Set every parameter group's rate to :func:`outer_lr_at`; nothing for ``constant``."""
    if cfg.lr_schedule == "constant":
        return
    lr = outer_lr_at(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
