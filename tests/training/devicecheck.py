"""A checker that fails when a tensor of a computation lands off the device a run is configured for.

On a machine without a GPU every tensor is on the CPU, so a run on ``cpu`` cannot show that a tensor
would have landed elsewhere on a GPU run. The checker makes the two ways it happens visible anyway:

* a tensor *made without a device* (``torch.zeros(3)``, ``torch.tensor(x)``, ...) by code outside
  torch lands on torch's default device, which is the CPU on a GPU run: every such call from the
  checked code is recorded with its file and line (a :class:`~torch.overrides.TorchFunctionMode` on
  the factory functions). Torch's own calls are torch's business (Adam's CPU step counter), and the
  host modules (data loading, the environments' simulators) make host tensors by design.
* a tensor *on another device* in an operator: a :class:`TorchDispatchMode` sees every aten operator
  with its tensor arguments and results, and records every operator that computes with a tensor off
  ``device`` (moves such as ``_to_copy`` and ``copy_`` are how data reaches the device and are not
  counted; neither are operators of only ``meta`` tensors under the execution layer's shape probe).
  On a GPU run, ``cpu`` tensors in host code (data loading, checkpoint I/O, RNG state, statistics of
  the results) are allowed; 0-dim CPU tensors, which torch lets every device read, too.

Python threads started inside the checked block (the execution layer's task threads) are checked
too: the modes are thread-local, so each new thread enters them.

    with DeviceChecker("cpu") as check:
        meta_train(...)
    # leaving the block raises AssertionError listing every violation (file:line, what, how often)
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode

TORCH_DIR = str(Path(torch.__file__).resolve().parent)
THIS_FILE = str(Path(__file__).resolve())
HOST_MODULES = ("innerloop/data/", "innerloop/rl/envs.py", "innerloop/rl/mujoco.py")
"""Code whose tensors are host tensors by design (data loading, simulators): the loop moves them."""
HOST_ON_GPU = (*HOST_MODULES, "innerloop/training/checkpoint.py", "torch/serialization.py", "torch/random.py",
               "torch/cuda/random.py", "torch/optim/", "innerloop/training/distributed.py")
"""On a GPU run, also these compute on the CPU by design (checkpoint I/O, RNG states, the optimiser's
step counters, gathered results)."""
HOST_FUNCTIONS = {"meta_test", "mean_ci95", "meta_test_rl", "rollout_noise"}
"""On a GPU run, CPU arithmetic whose innermost caller outside torch is one of these is host work by
design (the per-task scores gathered and summarised on the CPU, the rollout noise drawn there)."""
MOVES = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize", "to", "_pin_memory", "is_pinned",
         "lift_fresh", "_local_scalar_dense", "set_", "detach", "alias", "empty_like", "resize_"}
"""Operators that move data between devices, read a scalar back, or make storage for a move."""


def _innermost(frames: list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The innermost frame outside torch and this checker."""
    for f in reversed(frames):
        path = str(Path(f.filename).resolve())
        if not path.startswith(TORCH_DIR) and path != THIS_FILE and "/threading.py" not in path:
            return f
    return None


def _where(frames: list[traceback.FrameSummary]) -> str:
    """``file:line (function)`` of the innermost frame outside torch and this checker."""
    f = _innermost(frames)
    return "torch internals" if f is None else f"{_short(str(Path(f.filename).resolve()))}:{f.lineno} ({f.name})"


def _short(path: str) -> str:
    for marker in ("/innerloop/", "/tests/", "/benchmarks/"):
        if marker in path:
            return path[path.index(marker) + 1:]
    return path


class DeviceChecker:
    """Record every tensor of the block that is made without a device or used off ``device``.

    Args:
        device: the configured device (``cpu``, ``cuda``, ``cuda:0``, ...).
        raise_on_exit: leaving the block raises ``AssertionError`` listing the violations (else read
            :attr:`violations` / :meth:`report`).
    """

    def __init__(self, device: str | torch.device, *, raise_on_exit: bool = True) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.raise_on_exit = raise_on_exit
        self.violations: Counter[str] = Counter()
        self.host: Counter[str] = Counter()
        """Tensors made without a device by host code (allowed; listed for the record)."""
        self._lock = threading.Lock()
        self._modes: list[Any] = []
        self._thread_run: Any = None

    # -- the two modes ----------------------------------------------------------------------------
    def _record(self, table: Counter[str], what: str) -> None:
        with self._lock:
            table[what] += 1

    def _host(self, frames: list[traceback.FrameSummary], modules: tuple[str, ...]) -> bool:
        """Host work by design: called from a host module, or directly by a host function."""
        inner = _innermost(frames)
        return (inner is not None and inner.name in HOST_FUNCTIONS) or any(
            m in f.filename for f in frames for m in modules)

    def made_without_device(self, func: Any, kwargs: dict[str, Any]) -> None:
        if func not in _device_constructors() or kwargs.get("device") is not None:
            return
        caller = sys._getframe(2)  # the frame that called the factory (1 is the mode's __torch_function__)
        path = str(Path(caller.f_code.co_filename).resolve())
        if path.startswith(TORCH_DIR):
            return  # torch's own choice of device (e.g. Adam's CPU step counters)
        where = f"{_short(path)}:{caller.f_lineno} ({caller.f_code.co_name})"
        if any(m in path for m in HOST_MODULES):
            self._record(self.host, f"{where}: torch.{func.__name__} without a device (host data)")
        else:
            self._record(self.violations, f"{where}: torch.{func.__name__} without a device")

    def computed(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        name = func.overloadpacket.__name__
        if name in MOVES:
            return
        tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        off = [t for t in tensors if t.device != self.device
               and not (t.device.type == "cpu" and t.dim() == 0 and self.device.type != "cpu")]
        if not off:
            return
        frames = traceback.extract_stack()
        if all(t.device.type == "meta" for t in tensors) and self.device.type != "meta" and any(
                f.name == "computed_ops" for f in frames):
            return  # the execution layer's shape probe: no data, no side effect
        host_work = all(t.device.type == "cpu" for t in off) and self._host(frames, HOST_ON_GPU)
        if self.device.type != "cpu" and host_work:
            return
        devices = sorted({str(t.device) for t in off})
        self._record(self.violations, f"{_where(frames)}: aten.{name} on {', '.join(devices)}")

    # -- the block ---------------------------------------------------------------------------------
    def _enter_modes(self) -> list[Any]:
        checker = self

        class Made(TorchFunctionMode):
            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                kwargs = kwargs or {}
                checker.made_without_device(func, kwargs)
                return func(*args, **kwargs)

        class Computed(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                checker.computed(func, args, kwargs, out)
                return out

        modes = [Made(), Computed()]
        for m in modes:
            m.__enter__()
        return modes

    @staticmethod
    def _exit_modes(modes: list[Any], *exc: Any) -> None:
        for m in reversed(modes):
            m.__exit__(*exc)

    def __enter__(self) -> DeviceChecker:
        self._modes = self._enter_modes()
        checker, original = self, threading.Thread.run
        self._thread_run = original

        def run(thread: threading.Thread) -> None:  # threads started inside the block are checked too
            modes = checker._enter_modes()
            try:
                original(thread)
            finally:
                checker._exit_modes(modes, None, None, None)

        threading.Thread.run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        threading.Thread.run = self._thread_run  # type: ignore[method-assign]
        self._exit_modes(self._modes, *exc)
        if self.raise_on_exit and self.violations and exc[0] is None:
            raise AssertionError(f"tensors off {self.device}:\n{self.report()}")

    def report(self) -> str:
        """One line per violation: ``where: what (count)``."""
        return "\n".join(f"  {k} (x{n})" for k, n in sorted(self.violations.items()))
