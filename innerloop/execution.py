"""The task-execution layer: how a meta-batch of per-task computations runs.

An algorithm says what ONE task computes: a per-task function ``fn(model, params, task)`` of the
model to call (through :func:`torch.func.functional_call`), the meta-parameters and the task's
tensors ``(support_x, support_y, query_x, query_y)``. This module decides how a meta-batch of them
runs, and nothing else does:

* under :func:`torch.func.vmap` over tasks (small models: per-op overhead dominates, and
  vectorising wins), as a per-task loop (one backward per task, so memory is that of one task),
  or in several Python threads, one task each at a time with one intra-op thread each (whole tasks
  parallelise better than the small ops of one task); each thread calls its own copy of the model,
  and the inner loop differentiates with ``torch.autograd.grad`` there
  (:func:`innerloop.adapt.differentiation`), which unlike ``torch.func`` is thread-safe;
* the memory layout of the loop (channels-last images and conv weights for 2-D conv nets);
* glibc's malloc thresholds on CPU (:func:`innerloop.runtime.tune_malloc`);
* checkpointed inner steps (memory flat in the number of second-order inner steps).

Every path gives the same meta-gradient (float64 tests: vmap == loop == threads, channels-last ==
contiguous, checkpointed == stored). ``vectorize="auto"`` never picks a path with a wrong
gradient: in torch 2.13, ``vmap`` over a second-order gradient through ``batch_norm`` or
``layer_norm`` is wrong, so the layer looks at what the model *computes* (the aten operators of one
forward pass, traced on the meta device: functional calls count as much as modules) and runs such
models as a loop. Measured speeds of each path: ``benchmarks/results/speed.md`` and ``vectorize.md``.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from innerloop.adapt import Differentiation, Params, current_loss_scale, differentiation, loss_scale
from innerloop.runtime import tune_malloc
from innerloop.tasks import TaskBatch

Vectorize = Literal["auto", "vmap", "loop"]
VECTORIZE: tuple[str, ...] = ("auto", "vmap", "loop")
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
MEMORY_FORMATS: tuple[str, ...] = ("auto", "channels_last", "contiguous")
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
TaskTensors = tuple[Tensor, ...]
"""One task: ``(support_x [s, ...], support_y [s, ...], query_x [q, ...], query_y [q, ...])``."""
GradTaskFn = Callable[[nn.Module, Params, TaskTensors], tuple[Tensor, Tensor]]
"""``(model, params, task) -> (loss, aux)``: a scalar loss whose gradient is the task's share of the
meta-gradient, and detached metrics ``aux [k]`` (e.g. query loss and accuracy)."""
MapTaskFn = Callable[[nn.Module, Params, TaskTensors], Any]
"""``(model, params, task) -> pytree of tensors`` computed without an outer graph."""

UNSAFE_UNDER_VMAP: frozenset[str] = frozenset({
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm", "native_layer_norm",
})
"""aten operators whose second-order gradient under ``vmap`` is wrong in torch 2.13 (float64 tests in
``tests/test_execution.py``): every BatchNorm (modules, ``F.batch_norm``, ``F.instance_norm``) and
LayerNorm (``F.layer_norm``). ``native_group_norm`` is right, and so is normalisation written from
primitive ops."""
NORMALISATION: frozenset[str] = UNSAFE_UNDER_VMAP | {"native_group_norm"}


@dataclass(frozen=True)
class Execution:
    """How a meta-batch runs. The same values and meta-gradient on every setting.

    Attributes:
        vectorize: ``vmap`` over tasks, a per-task ``loop``, or ``auto``: ``vmap`` when the model
            computes no convolution and no normalisation (small models, where vectorising wins),
            ``loop`` otherwise (on CPU the per-task loop of convolutions is faster, and ``vmap``
            through BatchNorm or LayerNorm gives a wrong second-order gradient in torch 2.13).
            ``vmap`` with such a model and a second-order meta-gradient is refused.
        memory_format: layout of the loop's images and conv weights: ``channels_last``,
            ``contiguous`` (NCHW), or ``auto``: channels-last for models with a 2-D convolution.
        task_threads: the loop's tasks run in this many Python threads, each with one intra-op
            thread; ``None``: ``torch.get_num_threads()`` on CPU, 1 on other devices. Memory: the
            graphs of ``task_threads`` tasks are alive at once; 1 is the smallest.
        checkpoint: recompute each second-order inner step in the outer backward instead of
            storing its activations (memory grows by a set of parameters per step, not a set of
            activations; costs one more inner forward and backward per step). Runs as a loop.
        eval_chunk: tasks per ``vmap`` call when evaluating (bounds memory).
        device: where the model, every batch and every computation live: ``auto`` (CUDA when
            present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. Read by the training loop
            and the run to place the model; :func:`meta_gradient` and :func:`map_tasks` move a batch
            that arrives elsewhere to the parameters' device (see :func:`resolve_device`).
        precision: ``fp32``; ``bf16`` or ``fp16``: the per-task computation runs under
            :func:`torch.autocast` with that dtype (parameters and meta-gradients stay in their own
            dtype). ``fp16`` needs a GPU and a loss scale (:func:`loss_scale`, which the training loop
            keeps dynamically); ``bf16`` on a CPU without native bfloat16 is emulated and several
            times slower than fp32.
        reuse_features: when only one submodule's parameters adapt (a head: ANIL, a linear probe on
            a frozen body), run the body once per task and split and the inner loop on the head alone
            (:mod:`innerloop.split`; the same meta-gradient, checked on every task). ``False``: full
            forwards at every inner step.
    """

    vectorize: Vectorize = "auto"
    memory_format: MemoryFormat = "auto"
    task_threads: int | None = None
    checkpoint: bool = False
    eval_chunk: int = 200
    device: str = "auto"
    precision: Precision = "fp32"
    reuse_features: bool = True

    def __post_init__(self) -> None:
        if self.vectorize not in VECTORIZE:
            raise ValueError(f"unknown vectorize {self.vectorize!r}; choose one of {VECTORIZE}.")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"unknown memory_format {self.memory_format!r}; choose one of {MEMORY_FORMATS}.")
        threads = self.task_threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"task_threads must be None or an integer >= 1, got {threads!r}.")
        if not isinstance(self.reuse_features, bool):
            raise ValueError(f"reuse_features must be true or false, got {self.reuse_features!r}.")
        if not isinstance(self.checkpoint, bool):
            raise ValueError(f"checkpoint must be true or false, got {self.checkpoint!r}.")
        if isinstance(self.eval_chunk, bool) or not isinstance(self.eval_chunk, int) or self.eval_chunk < 1:
            raise ValueError(f"eval_chunk must be an integer >= 1, got {self.eval_chunk!r}.")
        check_device_name(self.device)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}.")
        if self.checkpoint and self.vectorize == "vmap":
            raise ValueError("checkpoint=True runs the per-task loop (torch.utils.checkpoint does not run under "
                             "vmap); use vectorize='auto' or 'loop', or checkpoint=False.")


# -- devices and precision -------------------------------------------------------------------------------
def check_device_name(name: object) -> None:
    """Refuse a device name that no machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``); whether
    this machine has it is :func:`resolve_device`'s check."""
    ok = isinstance(name, str) and (name in ("auto", "cpu", "cuda", "mps") or (
        name.startswith("cuda:") and name[5:].isdigit()))
    if not ok:
        raise ValueError(f"device = {name!r} is invalid: choose 'auto', 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) "
                         "or 'mps'.")


def resolve_device(name: str = "auto") -> torch.device:
    """The :class:`torch.device` named by ``name`` (see :class:`Execution`), checked to exist here:
    ``auto`` is ``cuda`` when CUDA is available, else ``cpu``. A device this machine lacks is refused
    with what it has."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device = {name!r}, but this machine has no CUDA device (torch {torch.__version__}, "
                             "CUDA build: " + str(torch.version.cuda) + "); use device = 'cpu' or 'auto'.")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device = {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}); choose one of those or 'auto'.")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("device = 'mps', but MPS (Apple GPU) is not available here; use 'cpu' or 'auto'.")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run: ``fp16`` autocast needs CUDA (or MPS)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}.")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision = 'fp16' on the CPU is refused (float16 autocast is slow and poorly supported "
                         "there); use 'fp32', or 'bf16' (emulated on CPUs without native bfloat16), or a GPU.")


@contextlib.contextmanager
def autocast_for(precision: str, device: torch.device | str) -> Iterator[None]:
    """:func:`torch.autocast` with ``precision``'s dtype on ``device``'s type; nothing for ``fp32``."""
    if precision == "fp32":
        yield
        return
    kind = torch.device(device).type
    check_precision(precision, torch.device(kind))
    with torch.autocast(kind, dtype=AUTOCAST_DTYPES[precision]):
        yield


@contextlib.contextmanager
def twice_differentiable(second_order: bool) -> Iterator[None]:
    """Kernels with a second derivative where one is taken: the fused attention kernels of
    :func:`torch.nn.functional.scaled_dot_product_attention` (flash, memory-efficient, cuDNN) have no
    double backward, so second-order meta-gradients select its math kernel (the same function, written
    from matmul and softmax). Nothing changes in first order."""
    sdp = torch.backends.cuda  # the switches of every device's fused kernels (the CPU's flash one too)
    fused = (sdp.flash_sdp_enabled(), sdp.mem_efficient_sdp_enabled(),  # type: ignore[no-untyped-call]
             sdp.cudnn_sdp_enabled())  # type: ignore[no-untyped-call]
    if not second_order or not any(fused):
        yield
        return
    # plain flag switches: torch.nn.attention.sdpa_kernel does the same at several times the cost, which
    # shows on small models (tens of microseconds per meta-gradient)
    sdp.enable_flash_sdp(False)
    sdp.enable_mem_efficient_sdp(False)
    sdp.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        sdp.enable_flash_sdp(fused[0])
        sdp.enable_mem_efficient_sdp(fused[1])
        sdp.enable_cudnn_sdp(fused[2])


def place_batch(batch: TaskBatch, params: Params) -> TaskBatch:
    """``batch`` on the parameters' device, floating tensors in their floating dtype (a float64 model
    takes float32 data; labels stay int64). The same object when nothing changes."""
    ref = next((t for t in params.values() if t.is_floating_point()), None)
    if ref is None:
        return batch
    x = batch.support_x
    moves = x.device != ref.device
    casts = x.is_floating_point() and x.dtype != ref.dtype
    if not (moves or casts or (batch.support_y.is_floating_point() and batch.support_y.dtype != ref.dtype)):
        return batch
    return batch.to(ref.device, ref.dtype)


# -- what a model computes -------------------------------------------------------------------------------
class _OpRecorder(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's base class is untyped
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        self.ops.add(name)
        if "convolution" in name and args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            self.ops.add("conv2d")
        return func(*args, **(kwargs or {}))


_PROBES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], frozenset[str] | None]] = (
    weakref.WeakKeyDictionary())
_PROBE_LOCK = threading.Lock()


def computed_ops(model: nn.Module, example_x: Tensor | torch.Size, dtype: torch.dtype | None = None,
                 ) -> frozenset[str] | None:
    """The aten operators one forward pass of ``model`` on ``example_x [examples, ...]`` runs (plus
    ``conv2d`` for a convolution of a 4-D input), traced with meta tensors: no arithmetic and no side
    effect (running statistics are not touched). ``None`` when the model cannot run on the meta
    device (then callers assume the worst). ``example_x`` may be a shape (with ``dtype``). Cached per
    model object, train/eval mode, input shape and dtype (a model whose layers are replaced after
    its first meta-batch needs a new algorithm)."""
    shape = tuple(example_x.shape) if isinstance(example_x, Tensor) else tuple(example_x)
    dtype = example_x.dtype if isinstance(example_x, Tensor) else (dtype or torch.get_default_dtype())
    key = (model.training, shape, dtype)
    with _PROBE_LOCK:
        cached = _PROBES.setdefault(model, {})
        if key in cached:
            return cached[key]
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    meta = {n: torch.empty_like(t, device="meta") for n, t in tensors.items()}
    recorder = _OpRecorder()
    try:
        with torch.no_grad(), recorder:
            functional_call(model, meta, (torch.empty(shape, dtype=dtype, device="meta"),))
        result: frozenset[str] | None = frozenset(recorder.ops)
    except Exception:
        result = None
    with _PROBE_LOCK:
        _PROBES.setdefault(model, {})[key] = result
    return result


def vmap_safe(ops: frozenset[str] | None, second_order: bool) -> bool:
    """Whether ``vmap`` over tasks gives the right meta-gradient for a model computing ``ops``."""
    if not second_order:
        return True
    return ops is not None and not (ops & UNSAFE_UNDER_VMAP)


# -- layout ----------------------------------------------------------------------------------------------
def to_channels_last(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every 4-D tensor (conv weights ``[out, in, kh, kw]``, images ``[batch, C, H, W]``) in the
    channels-last memory format; a differentiable copy where the layout changes, else the same
    tensor. Values, and so results, are unchanged."""
    return {k: _channels_last(t) if t.dim() == 4 else t for k, t in tensors.items()}


def _channels_last(t: Tensor) -> Tensor:
    """``t`` (4-D) with channels-last strides. With one channel (Omniglot) the two layouts hold the
    same memory and ``contiguous(memory_format=channels_last)`` keeps the NCHW strides, which torch
    reads as NCHW, so the first block would run the slow NCHW kernels; explicit channels-last
    strides (a copy) keep the whole network channels-last."""
    if t.size(1) == 1 and t.stride(1) != 1:
        return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
    return t.contiguous(memory_format=torch.channels_last)


# -- the plan for one call ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How one meta-batch runs: under ``vmap`` or as a loop over ``threads`` threads."""

    vmap: bool
    threads: int
    channels_last: bool
    differentiation: Differentiation


def plan(execution: Execution, model: nn.Module, batch: TaskBatch, *, second_order: bool,
         graph: bool = True, stateful: bool = False) -> Plan:
    """Decide how ``batch`` runs (see :class:`Execution`). ``graph``: whether the per-task function
    builds an outer graph (meta-gradients) or runs without one (evaluation, Reptile, iMAML).
    ``stateful``: the per-task function records running statistics (:mod:`innerloop.norm`), which
    ``vmap`` cannot (it would write a shared tensor from batched values): a loop."""
    ops = computed_ops(model, batch.support_x.shape[1:], batch.support_x.dtype)
    safe = vmap_safe(ops, second_order)
    if stateful and execution.vectorize == "vmap":
        raise ValueError("vectorize='vmap' cannot accumulate BatchNorm running statistics (batch_norm='running' "
                         "or 'per_step' in meta-training); use vectorize='auto' or 'loop', or batch_norm='batch'.")
    if stateful:
        use_vmap = False
    elif execution.vectorize == "vmap":
        if not safe and ops is None:
            raise ValueError(
                "vectorize='vmap' with a second-order meta-gradient needs to know what the model computes "
                "(vmap over grad through batch_norm or layer_norm is wrong in torch 2.13), but the model does not "
                "run on the meta device; use vectorize='loop' or 'auto', or first_order=True."
            )
        if not safe:
            raise ValueError(
                "vectorize='vmap' with a model that computes batch_norm or layer_norm (a norm module or a "
                "torch.nn.functional call) and a second-order meta-gradient gives a wrong gradient in torch "
                "2.13 (vmap over grad through normalisation); use vectorize='loop' or 'auto', or first_order=True."
            )
        use_vmap = True
    elif execution.vectorize == "loop" or (execution.checkpoint and graph):
        use_vmap = False
    else:
        use_vmap = ops is not None and not (ops & NORMALISATION) and not any("convolution" in o for o in ops)
    if use_vmap:
        return Plan(True, 1, False, "func")
    device = batch.support_x.device.type
    wanted = execution.task_threads
    if wanted is None:
        wanted = torch.get_num_threads() if device == "cpu" else 1
    threads = max(1, min(wanted, len(batch)))
    if execution.memory_format == "auto":
        channels_last = ops is not None and "conv2d" in ops
    else:
        channels_last = execution.memory_format == "channels_last"
    checkpointed = execution.checkpoint and graph and second_order
    mode: Differentiation = "checkpoint" if checkpointed else ("autograd" if threads > 1 else "func")
    return Plan(False, threads, channels_last, mode)


def _task(tensors: Sequence[Tensor], i: int, channels_last: bool) -> TaskTensors:
    task = tuple(t[i] for t in tensors)
    if not channels_last:
        return task
    laid = to_channels_last({str(k): t for k, t in enumerate(task)})
    return tuple(laid[str(k)] for k in range(len(task)))


def _tensors(batch: TaskBatch) -> TaskTensors:
    return batch.support_x, batch.support_y, batch.query_x, batch.query_y


def _in_threads(threads: int, n: int, model: nn.Module, work: Callable[[nn.Module, range], Any],
                mode: Differentiation) -> list[Any]:
    """Run ``work(model copy, share of range(n))`` in ``threads`` Python threads (interleaved shares),
    each with one intra-op thread. Grad mode, autocast, the loss scale and the differentiation mode are
    thread- or context-local (a new thread starts with none of the caller's), so each thread is given
    the caller's grad mode, autocast, loss scale and ``mode``. Returns the results in thread order; re-raises the
    first error."""
    results: list[Any] = [None] * threads
    errors: list[BaseException] = []
    grad_enabled = torch.is_grad_enabled()
    device = next((p.device.type for p in model.parameters()), "cpu")
    autocast = torch.is_autocast_enabled(device)
    autocast_dtype = torch.get_autocast_dtype(device)

    scale = current_loss_scale()

    def run(j: int, module: nn.Module) -> None:
        try:
            torch.set_num_threads(1)
            with torch.set_grad_enabled(grad_enabled), loss_scale(scale), \
                    torch.autocast(device, dtype=autocast_dtype, enabled=autocast), differentiation(mode):
                results[j] = work(module, range(j, n, threads))
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    before = torch.get_num_threads()
    # each thread calls its own module objects (functional_call swaps their tensors for the call's), which
    # share the model's parameter and buffer tensors: nothing the size of the model is copied
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    workers = [threading.Thread(target=run, args=(j, copy.deepcopy(model, dict(shared)))) for j in range(threads)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(before)
    if errors:
        raise errors[0]
    return results


@contextlib.contextmanager
def _loop_context(p: Plan, device: str) -> Iterator[None]:
    if device == "cpu":
        tune_malloc()  # see innerloop.runtime: reuse freed activation memory
    with differentiation(p.differentiation):
        yield


def grads_of(loss: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """``d loss / d targets`` keyed like ``targets`` (zeros for a target the loss does not use)."""
    got = torch.autograd.grad(loss, list(targets.values()), allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(targets.items(), got, strict=True)}


def vmap_over_tasks(fn: Callable[..., Any], params: Params, *per_task: Tensor, params_per_task: bool) -> Any:
    """``fn(params, *task_tensors)`` for every task at once under ``vmap``: ``per_task`` tensors carry a
    leading ``tasks`` dimension, and so does ``params`` when ``params_per_task`` (one adapted set per
    task), else it is shared. For meta-RL's policy MLPs (no convolution, no normalisation: vmap is
    both the fast path and a right one; a policy that normalises would need :func:`meta_gradient`)."""
    return vmap(fn, in_dims=(0 if params_per_task else None, *(0,) * len(per_task)))(params, *per_task)


# -- the two entry points -----------------------------------------------------------------------------------
def meta_gradient(
    fn: GradTaskFn, model: nn.Module, params: Params, batch: TaskBatch, targets: dict[str, Tensor],
    execution: Execution, *, second_order: bool, stateful: bool = False,
) -> tuple[dict[str, Tensor], Tensor]:
    """The gradient of ``mean_i loss_i`` with respect to ``targets`` and ``mean_i aux_i``, with
    ``(loss_i, aux_i) = fn(model, params, task_i)`` over the tasks of ``batch``.

    ``params`` are what ``fn`` adapts from (usually the model's live parameters; laid out for the
    loop here, differentiably); other meta-parameters (learned rates) reach ``fn`` by closure.
    ``stateful``: ``fn`` records running statistics (see :func:`plan`).
    Returns ``(grads keyed like targets, aux [k])``.
    """
    batch = place_batch(batch, params)
    p = plan(execution, model, batch, second_order=second_order, stateful=stateful)
    tensors, n = _tensors(batch), len(batch)
    scale = current_loss_scale()
    device = batch.support_x.device
    if p.vmap:
        with autocast_for(execution.precision, device), twice_differentiable(second_order):
            losses, aux = vmap(lambda *task: fn(model, params, task))(*tensors)
        return _unscaled(grads_of(losses.mean() * scale, targets), scale), aux.mean(0)

    def work(module: nn.Module, indices: range) -> tuple[dict[str, Tensor], Tensor | None]:
        grads = {k: torch.zeros_like(v) for k, v in targets.items()}
        aux_sum: Tensor | None = None
        laid = to_channels_last(params) if p.channels_last else params
        for i in indices:
            loss, aux = fn(module, laid, _task(tensors, i, p.channels_last))
            for k, g in grads_of(loss * (scale / n), targets).items():
                grads[k] += g
            aux_sum = aux.detach() if aux_sum is None else aux_sum + aux.detach()
        return grads, aux_sum

    with _loop_context(p, device.type), autocast_for(execution.precision, device), \
            twice_differentiable(second_order):
        parts = ([work(model, range(n))] if p.threads == 1 else
                 _in_threads(p.threads, n, model, work, p.differentiation))
    grads = {k: sum((part[0][k] for part in parts[1:]), parts[0][0][k]) for k in targets}
    sums = [part[1] for part in parts if part[1] is not None]
    return _unscaled(grads, scale), sum(sums[1:], sums[0]) / n


def _unscaled(grads: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    return grads if scale == 1.0 else {k: g / scale for k, g in grads.items()}


def pooled_gradient(
    fn: Callable[[TaskBatch], tuple[Tensor, Tensor]], params: Params, batch: TaskBatch, targets: dict[str, Tensor],
    execution: Execution,
) -> tuple[dict[str, Tensor], Tensor]:
    """The gradient of ``loss`` with respect to ``targets`` and the detached ``aux``, with
    ``(loss, aux) = fn(batch)`` for learners that train on a pooled batch rather than per task (the
    Baseline's pre-training): ``batch`` placed like ``params``, the precision's autocast and the loss
    scale applied as in :func:`meta_gradient`."""
    batch = place_batch(batch, params)
    scale = current_loss_scale()
    with autocast_for(execution.precision, batch.support_x.device):
        loss, aux = fn(batch)
    return _unscaled(grads_of(loss * scale, targets), scale), aux.detach()


def map_tasks(
    fn: MapTaskFn, model: nn.Module, params: Params, batch: TaskBatch, execution: Execution, *,
    reduce: Literal["stack", "mean"] = "stack", second_order: bool = False, stateful: bool = False,
) -> Any:
    """``fn(model, params, task_i)`` for every task of ``batch``, without an outer graph, stacked along
    a new leading ``tasks`` dimension (``reduce="stack"``) or averaged over tasks (``"mean"``, summed as
    it goes, so the loop keeps one task's outputs at a time). ``second_order``: whether ``fn`` itself
    differentiates twice (iMAML's Hessian-vector products), which rules out ``vmap`` through norms."""
    batch = place_batch(batch, params)
    p = plan(execution, model, batch, second_order=second_order, graph=False, stateful=stateful)
    tensors, n = _tensors(batch), len(batch)
    with torch.no_grad(), autocast_for(execution.precision, batch.support_x.device), \
            twice_differentiable(second_order):
        if p.vmap:
            chunk = execution.eval_chunk

            def one(*task: Tensor) -> Any:
                return fn(model, params, task)

            if n <= chunk:  # one call: no slicing, no concatenation
                out = vmap(one)(*tensors)
            else:
                parts = [vmap(one)(*(t[i : i + chunk] for t in tensors)) for i in range(0, n, chunk)]
                out = pytree.tree_map(lambda *xs: torch.cat(xs), *parts)
            return pytree.tree_map(lambda x: x.mean(0), out) if reduce == "mean" else out

        def work(module: nn.Module, indices: range) -> list[Any] | Any:
            laid = to_channels_last(params) if p.channels_last else params
            outs = (fn(module, laid, _task(tensors, i, p.channels_last)) for i in indices)
            if reduce == "stack":
                return list(outs)
            total = None
            for o in outs:
                total = o if total is None else pytree.tree_map(torch.add, total, o)
            return total

        with _loop_context(p, batch.support_x.device.type):
            parts = ([work(model, range(n))] if p.threads == 1 else
                     _in_threads(p.threads, n, model, work, p.differentiation))
        if reduce == "mean":
            found = [q for q in parts if q is not None]
            total = found[0]
            for q in found[1:]:
                total = pytree.tree_map(torch.add, total, q)
            return pytree.tree_map(lambda x: x / n, total)
        ordered: list[Any] = [None] * n
        for j, q in enumerate(parts):
            for k, o in zip(range(j, n, p.threads), q, strict=True):
                ordered[k] = o
        return pytree.tree_map(lambda *xs: torch.stack(xs), *ordered)
