"""The inner loop: one pure function from (parameters, task objective, update rule) to adapted parameters.

Parameters are plain ``dict[str, Tensor]`` keyed as in ``module.named_parameters()``; the model is
only ever called through :func:`torch.func.functional_call`, and gradients of the inner objective
come from :func:`torch.func.grad`. Nothing is cloned or patched, so the same function runs per
task, under :func:`torch.func.vmap` over a meta-batch, and inside an outer autograd graph (second
order) or cut off from it (first order).

How a step moves the parameters is an argument: an :class:`UpdateRule`, a pure ``init`` /
``update`` pair in the manner of optax. :func:`sgd` covers plain gradient steps with fixed or
learned rates (a float, a tensor, one per parameter tensor or element, one per step), inner weight
decay, and the proximal step of iMAML (decay toward an anchor); :func:`adam` is Reptile's inner
optimiser. Meta-RL's policy-gradient step is :func:`sgd` on the policy-gradient loss.

How the gradient of each step is computed (``torch.func.grad``, or ``torch.autograd.grad`` where
several Python threads run tasks at once, optionally checkpointed) is not the inner loop's
business: the task-execution layer (:mod:`innerloop.execution`) chooses it with
:func:`differentiation`, and the values are the same either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import functional_call, grad

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
ModelLoss = Callable[[Params, Params, Tensor, Tensor], Tensor]
"""``(params, buffers, x, y) -> scalar loss``, e.g. from :func:`model_loss`."""
Objective = Callable[[Params, int], Tensor]
"""``(params, step) -> scalar``: the inner objective of one task at inner step ``step`` (0-based).
Most objectives ignore ``step``; MAML++'s per-step BatchNorm weights read it."""
Rate = float | Tensor
LearningRates = Rate | Mapping[str, Rate]
"""A float, a tensor broadcastable to every parameter, or a per-name mapping whose values
broadcast to that parameter (a scalar per tensor, or one rate per element: Meta-SGD)."""
Differentiation = Literal["func", "autograd", "checkpoint"]


def model_loss(model: nn.Module, loss_fn: LossFn) -> ModelLoss:
    """``(params, buffers, x, y) -> loss``: the model's loss as a pure function of its tensors."""

    def loss(params: Params, buffers: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, (params, buffers), (x,)), y)

    return loss


def select(names: Sequence[str], which: str | Sequence[str] | None) -> list[str]:
    """The parameter names that adapt in the inner loop.

    Args:
        names: all parameter names, in ``named_parameters()`` order.
        which: ``None`` or ``"all"`` (every parameter), or glob patterns over the names (e.g.
            ``["head.*"]`` for ANIL, ``["features.*"]`` for BOIL).
    """
    if which is None or which == "all":
        return list(names)
    patterns = [which] if isinstance(which, str) else list(which)
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(
            f"the adapt patterns {patterns} match no parameter; the model's parameters are "
            f"{list(names)}. Use 'all' or a glob such as 'head.*'."
        )
    return chosen


# -- update rules ------------------------------------------------------------------------------------
class UpdateRule(Protocol):
    """One inner step as a pure function pair (optax's ``init`` / ``update``).

    ``update(grads, state, params, step)`` returns the new parameters for every name of ``params``
    (names without a gradient pass through) and the new state. No in-place updates, so a rule runs
    under ``vmap`` and ``grad`` and keeps the outer graph where one exists.
    """

    def init(self, params: Params) -> Any: ...

    def update(self, grads: Params, state: Any, params: Params, step: int) -> tuple[Params, Any]: ...


def _rate(lr: LearningRates, name: str) -> Rate:
    return lr[name] if isinstance(lr, Mapping) else lr


def sgd_step(
    params: Params, grads: Params, lr: LearningRates, weight_decay: LearningRates | None = None,
    anchor: Mapping[str, Tensor] | None = None,
) -> Params:
    """One step ``p - lr * (g + wd * (p - anchor))`` for each name in ``grads`` (the rest pass through).

    ``lr`` and ``weight_decay`` take the forms of :data:`LearningRates`; ``weight_decay=None``: none.
    ``anchor`` (default: zero) is the point the decay pulls toward: the meta-parameters for iMAML's
    proximal step ``p - lr * (g + lambda (p - theta))``.
    """
    out = dict(params)
    for name, g in grads.items():
        rate = _rate(lr, name)
        if weight_decay is not None:
            pull = params[name] if anchor is None else params[name] - anchor[name]
            g = g + _rate(weight_decay, name) * pull
        # A float rate: one fused op (the same rounding as p - rate * g), half the elementwise passes.
        out[name] = torch.add(params[name], g, alpha=-rate) if isinstance(rate, float) else params[name] - rate * g
    return out


@dataclass(frozen=True)
class SGD:
    """Gradient descent: ``p - lr_t * (g + wd * (p - anchor))``. Stateless.

    Attributes:
        lr: one :data:`LearningRates` for every step, or a sequence with one per step
            (per-step rates, MAML++'s LSLR).
        weight_decay: inner weight decay (forms of :data:`LearningRates`), or ``None``.
        anchor: what the weight decay pulls toward (default zero; iMAML: the meta-parameters).
    """

    lr: LearningRates | Sequence[LearningRates]
    weight_decay: LearningRates | None = None
    anchor: Mapping[str, Tensor] | None = None

    def rate(self, step: int) -> LearningRates:
        if isinstance(self.lr, Sequence):
            if step >= len(self.lr):
                raise ValueError(f"{len(self.lr)} per-step learning rates given, but inner step {step + 1} "
                                 "was taken.")
            return self.lr[step]
        return self.lr

    def init(self, params: Params) -> None:
        return None

    def update(self, grads: Params, state: None, params: Params, step: int) -> tuple[Params, None]:
        return sgd_step(params, grads, self.rate(step), self.weight_decay, self.anchor), None


def sgd(lr: LearningRates | Sequence[LearningRates], weight_decay: LearningRates | None = None,
        anchor: Mapping[str, Tensor] | None = None) -> SGD:
    """The :class:`SGD` update rule."""
    return SGD(lr, weight_decay, anchor)


AdamState = tuple[Params, Params, int]
"""Adam's state ``(first moments, second moments, steps taken)``, moments keyed like the parameters."""


def adam_init(params: Mapping[str, Tensor]) -> AdamState:
    """The state of Adam before its first step: zero moments for every name of ``params``."""
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    return zeros, dict(zeros), 0


def adam_step(
    params: Params, grads: Params, state: AdamState, lr: LearningRates,
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
) -> tuple[Params, AdamState]:
    """One pure Adam update (Kingma & Ba 2015) for each name in ``grads`` (the rest pass through).

    The arithmetic of ``torch.optim.Adam`` (no weight decay, no AMSGrad), without in-place updates::

        m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2;  t = t + 1
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """
    beta1, beta2 = betas
    m_old, v_old, t = state
    t += 1
    bias1, bias2_sqrt = 1 - beta1**t, math.sqrt(1 - beta2**t)
    out, m, v = dict(params), dict(m_old), dict(v_old)
    for name, g in grads.items():
        m[name] = torch.lerp(m_old[name], g, 1 - beta1)
        v[name] = torch.addcmul(v_old[name] * beta2, g, g, value=1 - beta2)
        out[name] = params[name] - (_rate(lr, name) / bias1) * m[name] / (v[name].sqrt() / bias2_sqrt + eps)
    return out, (m, v, t)


@dataclass(frozen=True)
class Adam:
    """Adam with fresh moments for every task (the state lives in one inner loop only)."""

    lr: LearningRates
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def init(self, params: Params) -> AdamState:
        return adam_init(params)

    def update(self, grads: Params, state: AdamState, params: Params, step: int) -> tuple[Params, AdamState]:
        return adam_step(params, grads, state, self.lr, self.betas, self.eps)


def adam(lr: LearningRates, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Adam:
    """The :class:`Adam` update rule."""
    return Adam(lr, betas, eps)


# -- how gradients are taken (chosen by the execution layer) ----------------------------------------------
_DIFFERENTIATION: contextvars.ContextVar[Differentiation] = contextvars.ContextVar(
    "innerloop_differentiation", default="func")


@contextlib.contextmanager
def differentiation(mode: Differentiation) -> Iterator[None]:
    """Within the block, inner steps differentiate with ``torch.func.grad`` (``func``, the default;
    runs under ``vmap``), ``torch.autograd.grad`` (``autograd``: the same values, and safe in several
    Python threads at once, which torch.func transforms are not), or ``torch.autograd.grad`` under a
    non-reentrant :func:`torch.utils.checkpoint.checkpoint` (``checkpoint``: second order keeps no
    activation of the inner steps; the outer backward recomputes each step, so memory grows by one
    set of parameters per step instead of one set of activations). Context-local (per thread)."""
    token = _DIFFERENTIATION.set(mode)
    try:
        yield
    finally:
        _DIFFERENTIATION.reset(token)


def differentiation_mode() -> Differentiation:
    """The mode set by the innermost :func:`differentiation` block (``func`` outside any)."""
    return _DIFFERENTIATION.get()


_LOSS_SCALE: contextvars.ContextVar[float] = contextvars.ContextVar("innerloop_loss_scale", default=1.0)


@contextlib.contextmanager
def loss_scale(scale: float) -> Iterator[None]:
    """Within the block, every backward of :func:`innerloop.execution.meta_gradient` and of the inner loop's
    gradients (:func:`gradient`) runs on
    ``scale`` times its loss, and the gradients are divided by ``scale`` again (exact for a power of two):
    small fp16 gradients do not underflow in the backward pass. The values returned are the unscaled
    gradients; a non-finite one means the scale was too large (the training loop then skips the step and
    halves it). Context-local, as :func:`differentiation`."""
    if not (isinstance(scale, int | float) and 0 < scale < float("inf")):
        raise ValueError(f"loss scale must be a finite number > 0, got {scale!r}.")
    token = _LOSS_SCALE.set(float(scale))
    try:
        yield
    finally:
        _LOSS_SCALE.reset(token)


def current_loss_scale() -> float:
    """The scale of the innermost :func:`loss_scale` block (1 outside any)."""
    return _LOSS_SCALE.get()



@overload
def gradient(f: Callable[[Params], Tensor], params: Params, *, create_graph: bool,
             has_aux: Literal[False] = False) -> Params: ...


@overload
def gradient(f: Callable[[Params], tuple[Tensor, Any]], params: Params, *, create_graph: bool,
             has_aux: Literal[True]) -> tuple[Params, Any]: ...


def gradient(f: Callable[[Params], Any], params: Params, *, create_graph: bool,
             has_aux: bool = False) -> Params | tuple[Params, Any]:
    """``grad f`` at ``params`` in the current :func:`differentiation` mode. ``create_graph``: keep
    the graph of the gradient (second order); without it the result is detached. ``has_aux``: ``f``
    returns ``(value, aux)``, and the result is ``(grad, aux)`` (one call of ``f`` for both)."""
    scale = current_loss_scale()
    if scale != 1.0:  # fp16: the backward runs on scale * f (no underflow), the gradient is divided again
        inner = f

        def f(p: Params) -> Any:
            out = inner(p)
            return (out[0] * scale, out[1]) if has_aux else out * scale

    if differentiation_mode() == "func":
        out = grad(f, has_aux=has_aux)(params)
        g, aux = out if has_aux else (out, None)
    else:
        with torch.enable_grad():
            inputs = {n: t if t.requires_grad else t.detach().requires_grad_() for n, t in params.items()}
            value, aux = f(inputs) if has_aux else (f(inputs), None)
            got = torch.autograd.grad(value, list(inputs.values()), create_graph=create_graph, allow_unused=True)
        g = {n: torch.zeros_like(t) if gi is None else gi for (n, t), gi in zip(inputs.items(), got, strict=True)}
    if scale != 1.0:
        g = {n: t / scale for n, t in g.items()}
    if not create_graph:
        g = {n: t.detach() for n, t in g.items()}
    return (g, aux) if has_aux else g


def hessian_vector_product(f: Callable[[Params], Tensor], params: Params) -> Callable[[Params], Params]:
    """``v -> H v`` with ``H`` the Hessian of the scalar ``f`` at ``params``, in the current
    :func:`differentiation` mode. The graph of ``grad f`` is built once and reused by every product
    (reverse over reverse: ``H`` is symmetric, so ``v^T H = (H v)^T``). Forward over reverse (``jvp``
    of ``grad``) fails on ``F.mse_loss`` in torch 2.13 ("ZeroTensors are immutable")."""
    scale = current_loss_scale()
    if differentiation_mode() == "func":
        def scaled(p: Params) -> Tensor:
            return f(p) * scale

        vjp_fn = torch.func.vjp(grad(scaled), params)[1]

        def product(v: Params) -> Params:
            hv: Params = vjp_fn(v)[0]
            return hv if scale == 1.0 else {n: h / scale for n, h in hv.items()}

        return product
    with torch.enable_grad():
        inputs = {n: t.detach().requires_grad_() for n, t in params.items()}
        first = torch.autograd.grad(f(inputs) * scale, list(inputs.values()), create_graph=True,
                                    allow_unused=True)
    # a parameter the loss does not use (or uses linearly) has no second derivative: zeros
    g = {n: gi for n, gi in zip(inputs, first, strict=True) if gi is not None and gi.requires_grad}

    def hvp(v: Params) -> Params:
        if not g:
            return {n: torch.zeros_like(t) for n, t in inputs.items()}
        with torch.enable_grad():
            zero = next(iter(g.values())).new_zeros(())
            dot = sum(((gi * v[n]).sum() for n, gi in g.items()), zero)
            got = torch.autograd.grad(dot, list(inputs.values()), retain_graph=True, allow_unused=True)
        pairs = zip(inputs.items(), got, strict=True)
        return {n: torch.zeros_like(t) if h is None else h.detach() / scale for (n, t), h in pairs}

    return hvp


# -- the inner loop -------------------------------------------------------------------------------------
def unroll(
    objective: Objective,
    params: Params,
    *,
    steps: int,
    rule: UpdateRule,
    adapt_names: Sequence[str] | None = None,
    first_order: bool = False,
) -> Iterator[Params]:
    """Yield the parameters after 1, 2, ..., ``steps`` inner steps of ``rule`` on ``objective``.

    Args:
        objective: ``(params, step) -> scalar``; ``params`` holds every name (the adapted ones at
            their current values, the others as given).
        params: the initial parameters (the meta-parameters, or any point to adapt from).
        steps: number of inner steps (>= 0).
        rule: the update rule (:func:`sgd`, :func:`adam`, or any :class:`UpdateRule`).
        adapt_names: the names that adapt (default: all of ``params``); the others are constants
            of the inner problem but stay differentiable for the outer one.
        first_order: cut the inner gradients from the outer graph (first-order MAML): the adapted
            parameters still depend on ``params`` and the rule's tensors, but not through the
            Hessian of the objective.

    Every yielded dict is keyed like ``params``. Differentiable with respect to ``params`` and the
    tensors of ``rule`` (second order unless ``first_order``) where gradients are enabled. A generator:
    the grad mode and the :func:`differentiation` mode are read when the first step is taken.
    """
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}.")
    names = list(params) if adapt_names is None else list(adapt_names)
    mode = differentiation_mode()
    create_graph = torch.is_grad_enabled() and not first_order
    current, state = params, rule.init({n: params[n] for n in names})
    for step in range(steps):
        if mode == "checkpoint" and create_graph:
            current, state = _checkpointed_step(objective, current, state, rule, names, step)
        else:
            def inner(adapted: Params, now: Params = current, j: int = step) -> Tensor:
                return objective({**now, **adapted}, j)

            grads = gradient(inner, {n: current[n] for n in names}, create_graph=create_graph)
            current, state = rule.update(grads, state, current, step)
        yield current


def _checkpointed_step(
    objective: Objective, current: Params, state: Any, rule: UpdateRule, names: Sequence[str], step: int,
) -> tuple[Params, Any]:
    """One second-order step under a non-reentrant checkpoint (``torch.func.grad`` does not run
    under the saved-tensor hooks a checkpoint uses, so this differentiates with autograd). For
    stateless rules (SGD), the ones a long second-order inner loop uses."""
    if state is not None:
        raise ValueError(f"checkpointed inner steps need a stateless update rule (sgd); got {rule!r}.")
    keys = list(current)
    scale = current_loss_scale()  # read now: the recomputation in the outer backward runs outside the block

    def step_fn(*tensors: Tensor) -> tuple[Tensor, ...]:
        now = dict(zip(keys, tensors, strict=True))
        adapted = {n: now[n] for n in names}
        value = objective(now, step) * scale  # the fp16 loss scale, as in gradient()
        got = torch.autograd.grad(value, list(adapted.values()), create_graph=True, allow_unused=True)
        pairs = zip(adapted.items(), got, strict=True)
        grads = {n: torch.zeros_like(t) if g is None else g / scale for (n, t), g in pairs}
        new, _ = rule.update(grads, None, now, step)
        return tuple(new[k] for k in keys)

    # autograd.grad needs inputs that require grad; a tensor outside the outer graph (a frozen
    # parameter) gets a detached copy that does, and stays outside it.
    inputs = [t if t.requires_grad else t.detach().requires_grad_() for t in current.values()]
    out = torch.utils.checkpoint.checkpoint(step_fn, *inputs, use_reentrant=False)
    return dict(zip(keys, out, strict=True)), None


def adapt_trajectory(
    loss: ModelLoss,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int,
    lr: LearningRates | Sequence[LearningRates] | None = None,
    rule: UpdateRule | None = None,
    adapt_names: Sequence[str] | None = None,
    first_order: bool = False,
    weight_decay: LearningRates | None = None,
) -> Iterator[Params]:
    """:func:`unroll` on a support set: yield the parameters after 1..``steps`` steps.

    Args:
        loss: ``(params, buffers, x, y) -> scalar``, e.g. from :func:`model_loss`.
        params: the initial parameters.
        buffers: the model's buffers, passed through unchanged.
        support_x: ``[support, *input_shape]``.
        support_y: ``[support, *target_shape]``.
        steps: number of inner steps (>= 0).
        lr: the inner learning rate(s) of plain SGD (a sequence gives one entry per step); or
        rule: any update rule instead (then ``lr`` and ``weight_decay`` must be ``None``).
        adapt_names: the names that adapt (default: all of ``params``).
        first_order: see :func:`unroll`.
        weight_decay: SGD's inner weight decay ``wd``: each step is ``p - lr * (g + wd * p)``.
    """
    if rule is None:
        if lr is None:
            raise ValueError("give the inner learning rate `lr` (plain SGD) or an update `rule`.")
        rule = sgd(lr, weight_decay)
    elif lr is not None or weight_decay is not None:
        raise ValueError("give either `rule` or `lr`/`weight_decay` (the SGD rule), not both.")

    def objective(p: Params, step: int) -> Tensor:
        return loss(p, buffers, support_x, support_y)

    return unroll(objective, params, steps=steps, rule=rule, adapt_names=adapt_names, first_order=first_order)


def adapt(
    loss: ModelLoss,
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int,
    lr: LearningRates | Sequence[LearningRates] | None = None,
    rule: UpdateRule | None = None,
    adapt_names: Sequence[str] | None = None,
    first_order: bool = False,
    weight_decay: LearningRates | None = None,
) -> Params:
    """The parameters after ``steps`` inner steps on the support set (arguments as
    :func:`adapt_trajectory`). Differentiable with respect to ``params`` and the rule's tensors."""
    return last(adapt_trajectory(loss, params, buffers, support_x, support_y, steps=steps, lr=lr, rule=rule,
                                 adapt_names=adapt_names, first_order=first_order, weight_decay=weight_decay),
                params)


def last(trajectory: Iterator[Params], start: Params) -> Params:
    """The final parameters of ``trajectory`` (``start`` when it is empty)."""
    result = start
    for result in trajectory:  # noqa: B007 - only the last one is returned
        pass
    return result
