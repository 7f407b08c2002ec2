"""Environments stepped in worker processes: sampling on every core (``execution.workers``).

:class:`ParallelFamily` wraps any picklable :class:`~innerloop.rl.envs.EnvFamily`. Its
:meth:`~ParallelFamily.make` splits the ``n`` copies into ``workers`` contiguous chunks; each chunk is
built by the wrapped family's own ``make`` in one persistent worker process (started once, with one
torch thread each) and stepped there, so a family's
simulator reuse (:class:`~innerloop.rl.envs.SimulatorPool`) applies inside the workers too. Per
step the main process sends each worker its slice of the actions and gathers ``(obs, reward,
terminated, truncated, info)``, concatenated in order; the policy is still evaluated once on all
``n`` environments in the main process (:func:`~innerloop.rl.episodes.rollout`).

A copy of the environments receives the same reset seed and the same actions wherever it steps, and
each copy's dynamics do not depend on the others, so the episodes are bit for bit those of the
wrapped family in process, whatever the number of workers (``tests/rl/test_rl_workers.py``; the
speed is in ``benchmarks/results/rl_sampler.md``).

Tensors cross the pipes as numpy arrays (values and dtypes kept; they come back on the CPU, where
the environments step). A worker that raises sends its exception back and the main process raises
:class:`WorkerError` naming the worker and the original message (the pool stays usable); a worker
that dies or does not answer within ``timeout`` seconds is detected (``multiprocessing.connection.wait``
on its pipe and its process sentinel, never a blocking read), the pool is closed and
:class:`WorkerError` raised. :meth:`ParallelFamily.close` (also the context manager's exit, the
garbage collector and interpreter exit, through :func:`weakref.finalize`) stops the workers.

Workers start through ``multiprocessing``'s ``forkserver`` where the platform has it (a clean server
process that imports torch and this module once, then forks each worker from it: a pool starts in a
fraction of a second after the first), else ``spawn`` (each worker a fresh interpreter). Neither forks
the main process, with its threads and locks. The first pool sets the forkserver's preload list
(``multiprocessing.set_forkserver_preload``: the main module, this module and the family's module).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import signal
import time
import traceback
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from innerloop.rl.envs import EnvFamily
from innerloop.tasks import Split

DEFAULT_TIMEOUT_S = 300.0
"""How long the main process waits for a worker's answer before it declares the worker hung."""


class WorkerError(RuntimeError):
    """An environment worker raised, died or stopped answering; the message names the worker."""


def chunk_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous ``[begin, end)`` ranges covering ``range(n)``, sizes differing by at most
    one (the first ``n % workers`` one larger; empty ranges when ``workers > n``)."""
    if n < 0 or workers < 1:
        raise ValueError(f"need n >= 0 (got {n}) and workers >= 1 (got {workers}).")
    size, extra = divmod(n, workers)
    bounds, begin = [], 0
    for w in range(workers):
        end = begin + size + (w < extra)
        bounds.append((begin, end))
        begin = end
    return bounds


@dataclass(frozen=True)
class Packed:
    """A tensor on its way through a pipe: its values as a numpy array (CPU)."""

    array: np.ndarray


def pack(value: Any) -> Any:
    """``value`` with every tensor (also inside tuples, lists and dicts) replaced by :class:`Packed`."""
    if isinstance(value, Tensor):
        return Packed(value.detach().cpu().numpy())
    if isinstance(value, dict):
        return {k: pack(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(pack(v) for v in value)
    return value


def unpack(value: Any) -> Any:
    """The inverse of :func:`pack`: every :class:`Packed` back to a CPU tensor of the same dtype."""
    if isinstance(value, Packed):
        array = value.array if value.array.flags.writeable else value.array.copy()
        return torch.from_numpy(array)
    if isinstance(value, dict):
        return {k: unpack(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(unpack(v) for v in value)
    return value


def serve(conn: Connection, index: int) -> None:
    """The loop of worker ``index``: answer the main process's commands until ``close`` or until the
    pipe breaks (the main process has gone). A message is ``(command, payload, default dtype)``, the
    dtype being torch's default in the main process (what environments build their tensors in), set
    here first. Commands: ``family`` (the family to build chunks with), ``make`` (tasks
    ``[k, task_dim]``), ``reset`` (seeds or None) and ``step`` (actions ``[k, act_dim]``); answers
    ``("ok", result)`` or ``("error", "Type: message", traceback)``. Ctrl-C (SIGINT, which a terminal
    sends the whole process group) is ignored here: the main process handles it and stops the workers,
    rather than each worker dying with its own traceback mid-command."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    family: Any = None
    env: Any = None
    while True:
        try:
            command, payload, dtype = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as err:  # read whole, but it does not unpickle here (e.g. a class it cannot import)
            conn.send(("error", f"{type(err).__name__} while reading the message: {err}", traceback.format_exc()))
            continue
        if command == "close":
            conn.close()
            return
        try:
            if dtype != torch.get_default_dtype():
                torch.set_default_dtype(dtype)
            if command == "family":
                family, env, out = payload, None, None
            elif command == "make":
                env = None  # a failed make leaves no environment behind
                env = family.make(unpack(payload))
                out = int(env.num_envs)
            elif command == "reset":
                out = pack(env.reset(seed=payload))
            elif command == "step":
                out = pack(env.step(unpack(payload)))
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", out))
        except Exception as err:  # sent back: the main process raises WorkerError with it
            conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc()))


def shutdown(processes: list[BaseProcess], conns: list[Connection], grace_s: float = 5.0) -> None:
    """Ask every worker to stop, wait ``grace_s`` seconds in all, then terminate (and kill) the rest."""
    for conn in conns:
        with contextlib.suppress(OSError, ValueError):  # a dead worker or a pipe already closed
            conn.send(("close", None, None))
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(0.5)
        if p.is_alive():
            p.kill()
            p.join(1.0)
    for conn in conns:
        conn.close()


def merge_info(infos: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The workers' ``info`` dicts as one: a key whose values are all tensors with a leading dimension
    is concatenated over the chunks (``[n, ...]``); any other key keeps a list of the workers' values."""
    keys = list(dict.fromkeys(k for info in infos for k in info))
    out: dict[str, Any] = {}
    for key in keys:
        values = [info.get(key) for info in infos]
        tensors = [v for v in values if isinstance(v, Tensor) and v.dim() >= 1]
        if len(tensors) == len(values):
            out[key] = torch.cat(tensors)
        else:
            out[key] = values
    return out


class ParallelVectorEnv:
    """The ``n`` environments of one :meth:`ParallelFamily.make`, stepped in the family's workers
    (gymnasium's batched API on tensors, as :class:`~innerloop.rl.envs.VectorEnv`).

    It owns the workers' environments until the next :meth:`ParallelFamily.make`; then stepping or
    resetting it raises.
    """

    def __init__(self, owner: ParallelFamily, bounds: list[tuple[int, int]], active: list[int],
                 lease: int) -> None:
        self.owner, self.bounds, self.active, self.lease = owner, bounds, active, lease
        self.num_envs = bounds[-1][1]

    def _check(self) -> None:
        if self.owner.lease != self.lease:
            raise RuntimeError("this environment was built by an earlier make() of its ParallelFamily, whose "
                               "workers now hold a later one: step one environment of a family at a time "
                               "(as rollout does).")

    def reset(self, seed: Sequence[int] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Reset every copy, copy ``j`` with ``seed[j]``: ``(obs [n, obs_dim], info)``."""
        self._check()
        if seed is not None and len(seed) != self.num_envs:
            raise ValueError(f"give one seed per environment ({self.num_envs}), got {len(seed)}.")
        chunks = [self.bounds[w] for w in self.active]
        seeds = [None if seed is None else [int(s) for s in seed[b:e]] for b, e in chunks]
        replies = self.owner.call(self.active, "reset", seeds)
        return torch.cat([obs for obs, _ in replies]), merge_info([info for _, info in replies])

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """``action [n, act_dim]`` -> ``(obs [n, obs_dim], reward [n], terminated [n], truncated [n], info)``,
        each the workers' chunks concatenated in order (info: see :func:`merge_info`)."""
        self._check()
        if action.dim() < 1 or action.shape[0] != self.num_envs:
            raise ValueError(f"action must have one row per environment ({self.num_envs}), got shape "
                             f"{tuple(action.shape)}.")
        replies = self.owner.call(self.active, "step", [pack(action[b:e]) for b, e in
                                                        (self.bounds[w] for w in self.active)])
        obs, reward, terminated, truncated = (torch.cat([r[k] for r in replies]) for k in range(4))
        return obs, reward, terminated, truncated, merge_info([r[4] for r in replies])


class ParallelFamily:
    """An :class:`~innerloop.rl.envs.EnvFamily` whose environments step in ``workers`` processes.

    The wrapped family's attributes (``name``, ``obs_dim``, ``act_dim``, ``task_dim``, ``horizon``,
    ``seed``; any other public one through attribute access) and :meth:`tasks` are its own, so the tasks,
    the rollout noise and hence the episodes are those of ``family`` in process.

    Args:
        family: the family to wrap; it must pickle (it is sent to every worker).
        workers: worker processes (>= 1), started here, once.
        timeout: seconds to wait for a worker's answer (its start-up included) before the pool is closed
            and :class:`WorkerError` raised.
        context: the ``multiprocessing`` start method, ``forkserver`` or ``spawn`` (``None``: ``forkserver``
            where the platform has it, else ``spawn``).

    Use it as a context manager, or call :meth:`close`: the workers stop (they also stop when the family
    is garbage-collected, when the interpreter exits, or when the main process dies and their pipe breaks).
    As for any ``spawn`` / ``forkserver`` pool, a script that builds one guards its entry point with
    ``if __name__ == "__main__":`` (the workers import the main module).
    """

    def __init__(self, family: EnvFamily, workers: int, *, timeout: float = DEFAULT_TIMEOUT_S,
                 context: str | None = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers = {workers!r} is invalid: give an int >= 1 (without workers, use the "
                             "family itself, in process).")
        if not timeout > 0:
            raise ValueError(f"timeout = {timeout!r} is invalid: give seconds > 0.")
        if context is None:
            context = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        if context not in ("spawn", "forkserver"):
            raise ValueError(f"context = {context!r} is invalid: choose 'spawn' or 'forkserver' (a forked worker "
                             "would inherit the parent's threads and locks).")
        try:
            pickle.dumps(family)
        except Exception as err:
            raise TypeError(f"ParallelFamily sends the family to its worker processes, and "
                            f"{type(family).__name__} does not pickle ({type(err).__name__}: {err}). Drop what "
                            "does not pickle in its __getstate__, or sample in process (execution.workers = 0)."
                            ) from err
        self.family = family
        self.name, self.seed, self.horizon = family.name, family.seed, family.horizon
        self.obs_dim, self.act_dim, self.task_dim = family.obs_dim, family.act_dim, family.task_dim
        self.workers, self.timeout, self.lease = workers, float(timeout), 0
        self.closed = False
        ctx: Any = multiprocessing.get_context(context)
        if context == "forkserver":  # takes effect when the server starts (the first pool of the process)
            ctx.set_forkserver_preload(["__main__", __name__, type(family).__module__])
        self._processes: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, shutdown, self._processes, self._conns)
        try:
            for i in range(workers):
                parent, child = ctx.Pipe()
                process = ctx.Process(target=serve, args=(child, i), name=f"innerloop-env-worker-{i}", daemon=True)
                process.start()
                child.close()
                self._processes.append(process)
                self._conns.append(parent)
            self.call(range(workers), "family", [family] * workers)
        except BaseException:
            self.close()
            raise

    # -- the EnvFamily protocol ------------------------------------------------------------------------

    def tasks(self, split: Split, indices: Sequence[int]) -> Tensor:
        """``[len(indices), task_dim]``: the wrapped family's tasks."""
        return self.family.tasks(split, indices)

    def make(self, tasks: Tensor) -> ParallelVectorEnv:
        """One environment per row of ``tasks [n, task_dim]``, rows ``begin:end`` of worker ``w`` built
        there by the wrapped family's ``make`` (see :func:`chunk_bounds`). The environment this returned
        before can then no longer be stepped."""
        if tasks.dim() < 1:
            raise ValueError(f"tasks must be [n, task_dim], got shape {tuple(tasks.shape)}.")
        bounds = chunk_bounds(int(tasks.shape[0]), self.workers)
        active = [w for w, (b, e) in enumerate(bounds) if e > b] or [0]
        self.lease += 1  # first: a make that fails still ends the previous environment's lease
        self.call(active, "make", [pack(tasks[b:e]) for b, e in (bounds[w] for w in active)])
        return ParallelVectorEnv(self, bounds, active, self.lease)

    def __getattr__(self, name: str) -> Any:
        """Other public attributes of the wrapped family (e.g. its options)."""
        family = self.__dict__.get("family")
        if name.startswith("_") or family is None:
            raise AttributeError(name)
        return getattr(family, name)

    def __reduce__(self) -> Any:
        raise TypeError("a ParallelFamily holds worker processes and does not pickle; pickle its .family.")

    # -- the workers --------------------------------------------------------------------------------------

    @property
    def processes(self) -> list[BaseProcess]:
        """The worker processes (worker ``i`` steps chunk ``i``)."""
        return list(self._processes)

    def _describe(self, i: int) -> str:
        return f"environment worker {i} of {self.workers} (pid {self._processes[i].pid}, {self.name})"

    def _fail(self, message: str) -> WorkerError:
        """Close the pool (its state is unknown; a worker that stopped answering is not waited for long)
        and return the error to raise."""
        self.close(grace_s=1.0)
        return WorkerError(message + " The worker pool is closed; build a new one to continue.")

    def call(self, indices: Sequence[int] | range, command: str, payloads: Sequence[Any]) -> list[Any]:
        """Send ``(command, payloads[k])`` to worker ``indices[k]`` each and gather their results, in
        order; raises :class:`WorkerError` when one raises (after all have answered), dies or hangs."""
        if self.closed:
            raise RuntimeError(f"this ParallelFamily ({self.name}, {self.workers} workers) is closed.")
        indices, dtype = list(indices), torch.get_default_dtype()
        for i, payload in zip(indices, payloads, strict=True):
            try:
                self._conns[i].send((command, payload, dtype))
            except (OSError, ValueError) as err:
                code = self._processes[i].exitcode
                raise self._fail(f"{self._describe(i)} cannot be reached ({type(err).__name__}: {err}; exit code "
                                 f"{code}) to {command}.") from err
        pending = {self._conns[i]: i for i in indices}
        sentinels = {self._processes[i].sentinel: i for i in indices}
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = ", ".join(self._describe(i) for i in pending.values())
                raise self._fail(f"{late} did not answer {command!r} within {self.timeout:g} s (raise the "
                                 "ParallelFamily's timeout if its environments are that slow).")
            waiting: list[Any] = [*pending, *(s for s, i in sentinels.items() if i in pending.values())]
            for ready in wait(waiting, timeout=remaining):
                if isinstance(ready, int):  # a sentinel: the process has ended
                    i = sentinels[ready]
                    conn = self._conns[i]
                    if conn not in pending or conn.poll():  # answered before it ended: read below
                        continue
                    raise self._fail(f"{self._describe(i)} died (exit code {self._processes[i].exitcode}) while "
                                     f"answering {command!r}.")
                conn = ready  # type: ignore[assignment]
                if conn not in pending:
                    continue
                i = pending.pop(conn)
                try:
                    replies[i] = conn.recv()
                except (EOFError, OSError) as err:
                    raise self._fail(f"{self._describe(i)} died (exit code {self._processes[i].exitcode}) while "
                                     f"answering {command!r}.") from err
        for i in indices:
            if replies[i][0] == "error":
                _, message, trace = replies[i]
                raise WorkerError(f"{self._describe(i)} raised in {command}: {message}\n\nThe worker's "
                                  f"traceback:\n{trace}")
        return [unpack(replies[i][1]) for i in indices]

    def close(self, grace_s: float = 5.0) -> None:
        """Stop the workers (idempotent): each is asked to, and the ones still running after ``grace_s``
        seconds are terminated. The family cannot be used after."""
        self.closed = True
        pending = self._finalizer.detach()
        if pending is not None:
            _, _, (processes, conns), _ = pending
            shutdown(processes, conns, grace_s)

    def __enter__(self) -> ParallelFamily:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running"
        return f"ParallelFamily({self.family!r}, workers={self.workers}, {state})"
