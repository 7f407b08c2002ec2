"""Where a run computes and in which precision: the device resolved once before work starts, batches
moved there, and the dynamic loss scale of float16 training.

* :func:`run_device` resolves ``execution.device`` (:func:`innerloop.execution.resolve_device`); under
  ``torchrun`` with NCCL every rank runs on its own GPU, ``cuda:LOCAL_RANK``.
* :func:`place` resolves the device and checks the precision once (a missing device or ``fp16`` on a
  CPU fails here, before any training), and moves a module there.
* :func:`to_device` moves a meta-batch: through pinned memory and an asynchronous copy to a GPU, a
  plain ``.to`` otherwise (on the CPU, nothing moves).
* :class:`LossScaler`: the dynamic loss scale of ``precision = "fp16"`` (as ``torch.amp.GradScaler``:
  halve it and skip the step when a meta-gradient is not finite, double it after a run of good steps);
  its state is checkpointed, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from innerloop.execution import check_precision, resolve_device
from innerloop.tasks import TaskBatch
from innerloop.training.distributed import backend, is_distributed, local_rank

BF16_CPU_WARNING = ("precision = 'bf16' on the CPU: bfloat16 autocast is emulated (and several times slower than "
                    "fp32) on CPUs without native bfloat16 (AVX512-BF16 / AMX); use 'fp32' there, or a GPU.")


def run_device(name: str) -> torch.device:
    """The device a run with ``execution.device = name`` computes on, with its index (``cuda`` is the
    current CUDA device, e.g. ``cuda:0``). Under ``torchrun`` with NCCL each rank computes on its own GPU,
    ``cuda:LOCAL_RANK``, when ``name`` is ``auto`` or ``cuda``; another device is refused there. A name
    this machine lacks is refused with what it has (:func:`~innerloop.execution.resolve_device`)."""
    if is_distributed() and backend() == "nccl":
        mine = torch.device("cuda", local_rank())
        if name in ("auto", "cuda") or torch.device(name) == mine:
            return mine
        raise ValueError(f"device = {name!r} under torchrun with NCCL: each rank computes on its own GPU, "
                         f"cuda:LOCAL_RANK (here {mine}); use device = 'auto' or 'cuda' (or 'cpu' for every rank, "
                         "which makes the ranks talk over gloo).")
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_run_precision(precision: str, device: torch.device) -> None:
    """:func:`~innerloop.execution.check_precision` (``fp16`` on a CPU is refused), and one warning per
    process that ``bf16`` on a CPU is emulated and slow."""
    check_precision(precision, device)
    if precision == "bf16" and device.type == "cpu":
        warnings.warn(BF16_CPU_WARNING, stacklevel=1)  # one place: the warnings module prints it once


def place(module: nn.Module, name: str, precision: str = "fp32") -> torch.device:
    """Resolve ``execution.device = name`` (:func:`run_device`), check ``precision`` for it, and move
    ``module`` (parameters and buffers, in place: the parameter objects stay the same) there when it is
    elsewhere. Returns the device. Raises ``ValueError`` before any work for a device this machine lacks
    or a precision it cannot run."""
    device = run_device(name)
    check_run_precision(precision, device)
    if any(t.device != device for t in (*module.parameters(), *module.buffers())):
        module.to(device)
    return device


def to_device(batch: TaskBatch, device: torch.device) -> TaskBatch:
    """``batch`` on ``device``: to a GPU through pinned memory with an asynchronous copy (the copy
    overlaps with compute), a plain ``.to`` otherwise. The same object when it is there already."""
    if batch.support_x.device == device and batch.query_x.device == device:
        return batch
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def all_finite(grads: dict[str, Tensor]) -> bool:
    """Whether every entry of every gradient is finite (one synchronisation)."""
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all())


@dataclass
class LossScaler:
    """The dynamic loss scale of float16 training (``torch.amp.GradScaler``'s rule).

    The meta-gradient is computed on ``scale`` times the loss (:func:`innerloop.adapt.loss_scale`, which
    returns it unscaled): small float16 gradients do not underflow. After each step :meth:`update` is
    told whether every meta-gradient was finite: if not, the step is skipped and the scale halved; after
    ``growth_interval`` finite steps in a row it doubles.

    Attributes:
        scale: the current scale (a power of two, so scaling and unscaling are exact).
        growth_interval: finite steps in a row before the scale doubles.
        good_steps: finite steps since the last change of the scale.
    """

    scale: float = 2.0**16
    growth_interval: int = 2000
    good_steps: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"loss scale must be a finite number > 0, got {self.scale!r}.")
        if self.growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {self.growth_interval}.")

    def update(self, finite: bool) -> bool:
        """Record one step; returns whether its optimiser step is to be taken (``finite``)."""
        if not finite:
            self.scale, self.good_steps = max(self.scale / 2, 2.0**-24), 0
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = min(self.scale * 2, 2.0**64), 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_interval": self.growth_interval, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.growth_interval = int(state.get("growth_interval", self.growth_interval))


__all__ = ["BF16_CPU_WARNING", "LossScaler", "all_finite", "check_run_precision", "module_device", "place",
           "run_device", "to_device"]
