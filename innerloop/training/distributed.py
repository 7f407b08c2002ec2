"""Data-parallel meta-training on ``torch.distributed`` (launched by ``torchrun``).

Each rank takes a contiguous, disjoint shard of every meta-batch (task indices are global, so
the tasks are the same whatever the number of ranks), computes the meta-gradient of its shard,
and one all-reduce sums the shard gradients weighted by shard size: the result is exactly the
mean over the whole meta-batch, as one process would compute it (up to float rounding). The
outer optimiser then takes the same step on every rank.

Why an explicit all-reduce and not ``DistributedDataParallel``: DDP hooks ``loss.backward()``
on the output of its wrapped ``forward``; the inner loop calls the model through
``torch.func.functional_call`` and the meta-gradient comes from ``torch.autograd.grad``, so
DDP's hooks never fire. One flat all-reduce per iteration is all that is needed; its volume is
the number of meta-parameters times 4 bytes.

Faults: every collective runs under the process group's timeout; a rank that died or hangs
makes the others raise :class:`DistributedError` (naming the step and the way to resume)
instead of waiting forever.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died or hangs."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK`` of ``torchrun``; 0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def backend() -> str:
    """The process group's backend (``nccl`` or ``gloo``); ``""`` in one process."""
    return str(dist.get_backend()) if is_distributed() else ""


def init_from_env(timeout_s: float = 300.0, device: str = "auto") -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when CUDA is available and the run's ``device``
    (``execution.device``) is not the CPU, each rank then on its own GPU ``cuda:LOCAL_RANK``; gloo
    otherwise. Returns whether this is a multi-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return is_distributed()
    nccl = torch.cuda.is_available() and device not in ("cpu", "mps")
    dist.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if nccl:
        torch.cuda.set_device(local_rank())
    return is_distributed()


def _comm_device() -> torch.device:
    """Where a collective on ``t`` runs: NCCL on this rank's GPU, gloo on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's contiguous share of ``indices`` (shares differ in size by at most one)."""
    n, w, r = len(indices), world_size(), rank()
    return list(indices[r * n // w : (r + 1) * n // w])


def _collective(what: str, step: int | None, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as err:  # gloo raises RuntimeError / DistBackendError on a dead or slow peer
        at = f" at step {step}" if step is not None else ""
        raise DistributedError(
            f"rank {rank()} of {world_size()}: the {what}{at} failed ({type(err).__name__}: {err}). "
            "Another rank died or hangs. Rerun the same command to resume from the last checkpoint "
            "(on the same or a different number of ranks)."
        ) from err


def reduce_meta_gradient(
    grads: dict[str, Tensor], metrics: dict[str, float], shard_size: int, batch_size: int, step: int
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Combine per-shard means into the mean over the whole meta-batch, on every rank.

    ``grads`` and ``metrics`` are means over this rank's ``shard_size`` tasks; the result is
    ``sum_r shard_size_r / batch_size * value_r``, with one all-reduce for all of it.
    """
    if not is_distributed():
        return grads, metrics
    weight = shard_size / batch_size
    names, keys = list(grads), list(metrics)
    first = grads[names[0]]
    comm = _comm_device()  # NCCL needs CUDA tensors, gloo takes CPU ones
    flat = torch.cat([grads[n].reshape(-1).to(comm) for n in names]
                     + [torch.tensor([metrics[k] for k in keys], dtype=first.dtype, device=comm)]) * weight
    _collective("all-reduce of the meta-gradient", step, dist.all_reduce, flat)
    out, offset = {}, 0
    for n in names:
        size = grads[n].numel()
        out[n] = flat[offset : offset + size].view_as(grads[n]).to(grads[n].device)
        offset += size
    return out, {k: float(v) for k, v in zip(keys, flat[offset:].tolist(), strict=True)}


def reduce_statistics(module: torch.nn.Module, shard_size: int, batch_size: int, step: int) -> None:
    """Make the floating-point buffers of ``module`` (BatchNorm running statistics, which each rank
    accumulated from its own shard: ``batch_norm = "running"`` or ``"per_step"``) the shard-size
    weighted mean over the ranks, as one process would have them; integer buffers (the counts) are the
    same on every rank. Nothing without ranks or without floating buffers."""
    if not is_distributed():
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    comm = _comm_device()
    flat = torch.cat([b.reshape(-1).to(comm, torch.float64) for b in bufs]) * (shard_size / batch_size)
    _collective("all-reduce of the running statistics", step, dist.all_reduce, flat)
    offset = 0
    with torch.no_grad():
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's meta-parameters and buffers."""
    if not is_distributed():
        return
    for t in [*module.parameters(), *module.buffers()]:
        comm = _comm_device()
        if t.device == comm:
            _collective("broadcast of the initial parameters", None, dist.broadcast, t.data, 0)
        else:  # e.g. CUDA parameters over gloo: through a copy on the CPU
            buf = t.data.to(comm)
            _collective("broadcast of the initial parameters", None, dist.broadcast, buf, 0)
            t.data.copy_(buf)


def gather_rows(rows: Tensor, step: int | None = None) -> Tensor:
    """Concatenate each rank's ``rows [n_r, ...]`` in rank order (every rank gets the result, on the
    CPU: the rows travel as pickled CPU tensors, whatever the backend)."""
    if not is_distributed():
        return rows
    parts: list[Any] = [None] * world_size()
    _collective("gather of evaluation results", step, dist.all_gather_object, parts, rows.cpu())
    return torch.cat(parts)


def barrier(what: str = "barrier") -> None:
    if is_distributed():
        _collective(what, None, dist.barrier)
