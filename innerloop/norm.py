"""BatchNorm as a declared policy, for innerloop's layers and stock ``torch.nn`` modules alike.

A meta-learner calls its model through :func:`torch.func.functional_call` with a dict of buffers;
this module decides what a BatchNorm layer finds there, so no forward pass ever writes a buffer of
the user's module in place (which crashes under ``torch.func.grad`` and races in task threads):

* ``batch``: every forward normalises with the statistics of the batch it is given, in training and
  at test time (the MAML protocol; transductive at test time: a task's query set is normalised with
  its own statistics). The running-statistics buffers are passed as ``None``, so a stock
  ``nn.BatchNorm2d`` (``track_running_stats=True``) computes exactly what innerloop's
  ``track_running_stats=False`` layers compute, and its buffers are never touched.
* ``running``: meta-training normalises with batch statistics (as above) and accumulates running
  statistics; evaluation (``model.eval()``, as :func:`~innerloop.training.meta_test` sets it) uses
  them for every forward, support and query (the non-transductive protocol). Accumulation is
  functional: each meta-training task runs one forward of its adapted network on its query set,
  without gradient, against a private copy of the running statistics (BatchNorm's own momentum
  update); after the meta-batch, the model's statistics become the mean of the tasks' copies (summed
  in float64, so the result does not depend on the order in which threads finish).
* ``per_step``: MAML++'s per-step statistics (and, with its ``per_step_bn``, weights): one set of
  running statistics per inner step, accumulated as ``running`` accumulates its one set, and used at
  test time by the forwards of that step. Only :class:`~innerloop.algorithms.MAMLPlusPlus` has it.

Layers without running statistics (innerloop's ``Conv4``, any ``track_running_stats=False``) always
use batch statistics; ``running`` and ``per_step`` need at least one layer with them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

BatchNormPolicy = Literal["batch", "running", "per_step"]
BATCH_NORM_POLICIES: tuple[str, ...] = ("batch", "running", "per_step")
Buffers = dict[str, Tensor | None]
STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def running_stat_names(model: nn.Module) -> list[str]:
    """Names (as in ``named_buffers()``) of the running statistics of every BatchNorm layer (the
    ``torch.nn`` ``_BatchNorm`` subclasses, innerloop's ``BatchNorm2d`` and ``SyncBatchNorm`` included)."""
    names: list[str] = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for suffix in STAT_SUFFIXES:
                if getattr(module, suffix, None) is not None:
                    names.append(f"{prefix}.{suffix}" if prefix else suffix)
    return names


def check_policy(policy: str, model: nn.Module, algorithm: str = "this algorithm") -> None:
    """Refuse a policy the model cannot follow, naming the way out."""
    if policy not in BATCH_NORM_POLICIES:
        raise ValueError(f"batch_norm = {policy!r} is invalid: choose one of {BATCH_NORM_POLICIES}.")
    tracked = [n for n, m in model.named_modules()
               if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats]
    if tracked:
        raise ValueError(
            f"instance normalisation with track_running_stats=True ({tracked[:4]}) is not supported: its running "
            "statistics are used at test time, but meta-learning normalises each forward with its own. Build it "
            "with track_running_stats=False (torch's default for InstanceNorm).")
    if policy != "batch" and not running_stat_names(model):
        raise ValueError(
            f"batch_norm = {policy!r} keeps running statistics, but the model has no BatchNorm layer that tracks "
            "them (innerloop's Conv4 normalises with batch statistics only). Build the layers with "
            "track_running_stats=True (Conv4(..., track_running_stats=True), or stock nn.BatchNorm2d), or use "
            "batch_norm = 'batch'.")


class NormState:
    """What the BatchNorm layers of ``model`` see under ``policy``, and the running statistics that
    meta-training accumulates (``running``; ``per_step`` keeps ``sets`` of them, one per inner step).

    Args:
        model: the network (its buffers are read, and written only by :meth:`commit`).
        policy: ``batch``, ``running`` or ``per_step``.
        sets: sets of running statistics kept (``per_step``: the inner steps; else 1).
    """

    def __init__(self, model: nn.Module, policy: BatchNormPolicy = "batch", sets: int = 1) -> None:
        check_policy(policy, model)
        self.policy: BatchNormPolicy = policy
        self.names = running_stat_names(model)
        self.sets = sets if policy == "per_step" else 1
        self._records: list[tuple[int, dict[str, Tensor]]] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:  # copies (deepcopy, pickle) start with no records
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_records")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._records, self._lock = [], threading.Lock()

    @property
    def keeps_statistics(self) -> bool:
        """Whether meta-training accumulates running statistics (``running``, ``per_step``)."""
        return self.policy != "batch" and bool(self.names)

    def buffers(self, model: nn.Module, stats: Mapping[str, Tensor] | None = None) -> Buffers:
        """The buffers of a forward of ``model``: its own, with the running statistics as ``None``
        (batch statistics, nothing written) unless the policy uses them now (``model.eval()`` under
        ``running`` / ``per_step``); ``stats`` replaces the model's statistics (a per-step set)."""
        own: Buffers = dict(model.named_buffers())
        if self.policy == "batch" or model.training:
            own.update({n: None for n in self.names})
        elif stats is not None:
            own.update(stats)
        return own

    def record(self, model: nn.Module, params: Mapping[str, Tensor], x: Tensor, which: int = 0,
               start: Mapping[str, Tensor] | None = None) -> None:
        """Accumulate the statistics of one forward of ``model`` at ``params`` on ``x [n, ...]``
        into set ``which`` (no gradient, a private copy of the statistics: safe under task threads).
        Nothing happens under ``batch``, in evaluation (``model.eval()``), or without statistics.
        ``start``: the statistics the copy starts from (default: the model's own)."""
        if not self.keeps_statistics or not model.training:
            return
        base = dict(model.named_buffers()) if start is None else dict(start)
        copies = {n: base[n].detach().clone() for n in self.names}
        with torch.no_grad():
            functional_call(model, ({k: v.detach() for k, v in params.items()},
                                    {**dict(model.named_buffers()), **copies}), (x,))
        with self._lock:
            self._records.append((which, copies))

    def pending(self) -> bool:
        return bool(self._records)

    def commit(self, targets: list[dict[str, Tensor]]) -> None:
        """Write the mean of the recorded copies of each set ``j`` into ``targets[j]`` (the model's
        buffers for set 0 of ``running``; MAML++'s per-step buffers), in place, and forget them. A set
        nothing was recorded for keeps its values."""
        with self._lock:
            records, self._records = self._records, []
        # a non-finite record (an overflowing fp16 step: the step is skipped) must not poison the statistics
        records = [(w, r) for w, r in records if all(bool(torch.isfinite(t).all()) for t in r.values())]
        for j, target in enumerate(targets):
            mine = [r for w, r in records if w == j]
            if not mine:
                continue
            with torch.no_grad():
                for n in self.names:
                    if n.endswith("num_batches_tracked"):
                        target[n].copy_(mine[0][n])
                        continue
                    total = torch.zeros_like(mine[0][n], dtype=torch.float64)
                    for r in mine:
                        total += r[n].double()
                    target[n].copy_((total / len(mine)).to(target[n].dtype))

    def discard(self) -> None:
        """Forget what was recorded (a meta-gradient that failed)."""
        with self._lock:
            self._records = []
