"""Head-only adaptation at the cost of the head: the body runs once per task.

When only the parameters of one submodule adapt (ANIL's ``head``, a linear probe ``fc`` on a frozen or
meta-learned body, the last block of a network), the body's output does not change during the inner
loop: the parameters it depends on do not move. So the body need not run at every inner step: one
forward of the whole model per split (support, query) captures the head's inputs, and the inner loop
calls only the head on them. The meta-gradient is the same (float64 tests in
``tests/test_split.py``): the captured features carry the outer graph to the body's meta-parameters.

Which module is the head is derived, not declared: the deepest module whose name prefixes every
adapted parameter. The split is used only where it is provably the same function, checked on every
capture: the head is called exactly once in the forward pass and the model returns the head's output
object itself (``out is head(...)``), so ``model(x) == head(features)`` holds by construction, and no
parameter outside the head is an adapted one. Anything else (BOIL's adapted body before a head, a
head called twice, an output transformed after the head) falls back to full forwards at every step.
A body with dropout draws one mask per split instead of one per step.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

Params = dict[str, Tensor]


@dataclass
class Features:
    """What the head received in one forward pass: its positional and keyword inputs."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


_INPLACE_DUNDERS = frozenset({
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__",
    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__",
})


def _writes(func: Any, kwargs: dict[str, Any] | None) -> bool:
    """Whether a torch function call may write one of its tensor arguments in place."""
    name = getattr(func, "__name__", "")
    if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__")):
        return True
    return kwargs is not None and (kwargs.get("inplace") is True or kwargs.get("out") is not None)


def _tensor_ids(tree: Any) -> set[int]:
    return {id(t) for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)}


class _Watch(TorchFunctionMode):
    """Sees every torch function of one capture forward: flags a use of an adapted parameter before the
    head starts (the body would depend on what adapts), and any in-place write to the head's inputs or
    output once the head has started (the captured features or the returned output would then not be
    what a later call of the head gets or gives)."""

    def __init__(self, adapted: set[int]) -> None:
        super().__init__()
        self.adapted = adapted
        self.started = False
        self.watched: set[int] = set()
        self.broken = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.broken:
            ids = _tensor_ids((args, kwargs))
            early = not self.started and bool(ids & self.adapted)
            overwrite = bool(self.watched) and _writes(func, kwargs) and bool(ids & self.watched)
            self.broken = early or overwrite
        return func(*args, **(kwargs or {}))


@dataclass
class HeadSplit:
    """The head module (``prefix``) of a model whose adapted parameters (``adapted``) all live in it.

    Attributes:
        prefix: the head's name in ``model.named_modules()`` (e.g. ``head``, ``fc``, ``layer4.1``).
        adapted: the adapted parameters' names (in the whole model's naming).
    """

    prefix: str
    adapted: tuple[str, ...] = ()
    _ok: bool | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _head_state(self, state: Params) -> Params:
        start = self.prefix + "."
        return {k[len(start):]: v for k, v in state.items() if k.startswith(start)}

    def capture(self, model: nn.Module, params: Params, buffers: Params,
                x: Tensor) -> tuple[Tensor, Features] | None:
        """One forward of ``model`` on ``x [n, ...]``: ``(output, the head's inputs)``, or ``None``
        when this forward is not provably ``head(features)`` (then the caller runs full forwards):
        the head must run once, the model must return the head's output object, no adapted parameter
        may be used before the head runs, and nothing may write the head's inputs or output in place
        once it has started. The inputs are taken before any other forward pre-hook of the head (a
        later call of the head runs those again)."""
        if self._ok is False:
            return None
        head = model.get_submodule(self.prefix)
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        outputs: list[Any] = []
        watch = _Watch({id(params[n]) for n in self.adapted if n in params})

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append((args, kwargs))
            watch.started = True
            watch.watched |= _tensor_ids((args, kwargs))

        def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            outputs.append(out)
            watch.watched |= _tensor_ids(out)

        handles = [head.register_forward_pre_hook(pre, prepend=True, with_kwargs=True),
                   head.register_forward_hook(post, with_kwargs=True)]
        try:
            with watch:
                out = functional_call(model, (params, buffers), (x,))
        finally:
            for h in handles:
                h.remove()
        ok = (len(calls) == 1 and len(outputs) == 1 and outputs[0] is out and isinstance(out, Tensor)
              and not watch.broken)
        with self._lock:
            self._ok = ok if self._ok is None else (self._ok and ok)
        if not ok:
            return None
        return out, Features(calls[0][0], calls[0][1])

    def head(self, model: nn.Module, params: Params, buffers: Params, features: Features) -> Tensor:
        """The head's output at ``params`` (keyed like the whole model's) on captured ``features``."""
        state = (self._head_state(params), self._head_state(buffers))
        out: Tensor = functional_call(model.get_submodule(self.prefix), state, features.args, features.kwargs)
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> HeadSplit:
        return HeadSplit(self.prefix, self.adapted, self._ok)


def head_split(model: nn.Module, adapt_names: Sequence[str]) -> HeadSplit | None:
    """The :class:`HeadSplit` of ``model`` when the ``adapt_names`` all live in one proper submodule,
    and that submodule shares no parameter tensor with the rest of the model; else ``None``."""
    if not adapt_names:
        return None
    paths = [n.split(".")[:-1] for n in adapt_names]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    # the module must be a prefix of every name (zip stops at the shortest path)
    if not common or any(p[: len(common)] != common for p in paths):
        return None
    prefix = ".".join(common)
    head_ids = {id(p) for p in model.get_submodule(prefix).parameters()}
    adapted_ids = {id(t) for n, t in model.named_parameters() if n in set(adapt_names)}
    outside = [t for n, t in model.named_parameters(remove_duplicate=False) if not n.startswith(prefix + ".")]
    if any(id(t) in adapted_ids or id(t) in head_ids for t in outside):  # tied weights: not a clean split
        return None
    return HeadSplit(prefix, tuple(adapt_names))


class TaskView:
    """One task's model as the inner loop sees it: predictions on the support and query inputs at any
    parameters, through the head alone on features captured once (a :class:`HeadSplit` that holds),
    or through full forwards.

    Args:
        model: the network (called through :func:`torch.func.functional_call`).
        params: the parameters adaptation starts from; the body's features are taken at them.
        buffers: the buffers of every forward (see :class:`innerloop.norm.NormState`).
        support_x: ``[support, ...]``; query_x: ``[query, ...]``.
        split: the head split, or ``None`` for full forwards.
    """

    def __init__(self, model: nn.Module, params: Params, buffers: Params, support_x: Tensor, query_x: Tensor,
                 split: HeadSplit | None = None) -> None:
        self.model, self.params, self.buffers = model, params, buffers
        self.support_x, self.query_x = support_x, query_x
        self.split = split
        self._support: Features | None = None
        self._query: Features | None = None
        if split is not None:
            got = split.capture(model, params, buffers, support_x)
            if got is None:
                self.split = None
            else:
                self._support = got[1]

    @property
    def reuses_features(self) -> bool:
        """Whether predictions run the head alone on captured features."""
        return self.split is not None

    def _full(self, params: Params, x: Tensor) -> Tensor:
        out: Tensor = functional_call(self.model, (params, self.buffers), (x,))
        return out

    def support(self, params: Params) -> Tensor:
        """``[support, ...]`` predictions at ``params`` (keyed like the model's parameters)."""
        if self.split is None or self._support is None:
            return self._full(params, self.support_x)
        return self.split.head(self.model, params, self.buffers, self._support)

    def query(self, params: Params) -> Tensor:
        """``[query, ...]`` predictions at ``params``."""
        if self.split is None:
            return self._full(params, self.query_x)
        if self._query is None:
            got = self.split.capture(self.model, self.params, self.buffers, self.query_x)
            if got is None:
                self.split = None
                return self._full(params, self.query_x)
            self._query = got[1]
        return self.split.head(self.model, params, self.buffers, self._query)
