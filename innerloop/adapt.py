"""The inner loop: a pure function from (parameters, support set) to adapted parameters.

Parameters are plain ``dict[str, Tensor]`` keyed as in ``module.named_parameters()``; the model
is only ever called through :func:`torch.func.functional_call`, and gradients of the support
loss come from :func:`torch.func.grad`. Nothing is cloned or patched, so the same function runs
per task, under :func:`torch.func.vmap` over a meta-batch, and inside an outer autograd graph
(second order) or cut off from it (first order).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import functional_call, grad

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
LRMode = Literal["fixed", "scalar", "per_tensor", "per_element"]
LR_MODES: tuple[str, ...] = ("fixed", "scalar", "per_tensor", "per_element")
LearningRates = float | Tensor | Mapping[str, float | Tensor]


def model_loss(model: nn.Module, loss_fn: LossFn) -> Callable[[Params, Params, Tensor, Tensor], Tensor]:
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


def sgd_step(
    params: Params, grads: Params, lr: LearningRates, weight_decay: LearningRates | None = None
) -> Params:
    """One inner update ``p - lr * g`` for each name in ``grads`` (the rest pass through).

    ``lr`` is a float, a tensor broadcastable to every parameter, or a per-name mapping whose
    values broadcast to that parameter (a scalar per tensor, or one rate per element: Meta-SGD).
    ``weight_decay`` (same forms; ``None``: none) makes it ``p - lr * (g + weight_decay * p)``.
    """
    out = dict(params)
    for name, g in grads.items():
        rate = lr[name] if isinstance(lr, Mapping) else lr
        if weight_decay is not None:
            g = g + (weight_decay[name] if isinstance(weight_decay, Mapping) else weight_decay) * params[name]
        # A float rate: one fused op (the same rounding as p - rate * g), half the elementwise passes.
        out[name] = torch.add(params[name], g, alpha=-rate) if isinstance(rate, float) else params[name] - rate * g
    return out


AdamState = tuple[Params, Params, int]
"""Adam's state ``(first moments, second moments, steps taken)``, moments keyed like the parameters."""


def adam_init(params: Mapping[str, Tensor]) -> AdamState:
    """The state of Adam before its first step: zero moments for every name of ``params``."""
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    return zeros, dict(zeros), 0


def adam_step(
    params: Params,
    grads: Params,
    state: AdamState,
    lr: LearningRates,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Params, AdamState]:
    """One pure Adam update (Kingma & Ba 2015) for each name in ``grads`` (the rest pass through).

    The arithmetic is that of ``torch.optim.Adam`` (no weight decay, no AMSGrad), written without
    in-place updates so that it runs under ``vmap`` and ``grad``::

        m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2;  t = t + 1
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Args:
        params: the current parameters.
        grads: gradients for the names that update (shapes as in ``params``).
        state: from :func:`adam_init` or the previous call, with moments for every name in ``grads``.
        lr: as for :func:`sgd_step`.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to the denominator.

    Returns:
        ``(new params, new state)``.
    """
    beta1, beta2 = betas
    m_old, v_old, t = state
    t += 1
    bias1, bias2_sqrt = 1 - beta1**t, math.sqrt(1 - beta2**t)
    out, m, v = dict(params), dict(m_old), dict(v_old)
    for name, g in grads.items():
        rate = lr[name] if isinstance(lr, Mapping) else lr
        m[name] = torch.lerp(m_old[name], g, 1 - beta1)
        v[name] = torch.addcmul(v_old[name] * beta2, g, g, value=1 - beta2)
        out[name] = params[name] - (rate / bias1) * m[name] / (v[name].sqrt() / bias2_sqrt + eps)
    return out, (m, v, t)


def adapt_trajectory(
    loss: Callable[[Params, Params, Tensor, Tensor], Tensor],
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int,
    lr: LearningRates | Sequence[LearningRates],
    adapt_names: Sequence[str] | None = None,
    first_order: bool = False,
    weight_decay: LearningRates | None = None,
    checkpoint: bool = False,
    use_autograd: bool = False,
) -> Iterator[Params]:
    """Yield the parameters after 1, 2, ..., ``steps`` inner gradient steps.

    Args:
        loss: ``(params, buffers, x, y) -> scalar``, e.g. from :func:`model_loss`.
        params: the initial parameters (the meta-parameters, or any point to adapt from).
        buffers: the model's buffers, passed through unchanged.
        support_x: ``[support, *input_shape]``.
        support_y: ``[support, *target_shape]``.
        steps: number of inner steps (>= 0).
        lr: the inner learning rate(s); a sequence gives one entry per step.
        adapt_names: the names that adapt (default: all of ``params``).
        first_order: cut the inner gradients from the outer graph (first-order MAML): the
            adapted parameters still depend on ``params`` and ``lr``, but not through the
            Hessian of the support loss.
        weight_decay: inner weight decay ``wd`` (a float, tensor or per-name mapping, e.g. from
            :class:`InnerWeightDecay`): each step is ``p - lr * (g + wd * p)``. ``None``: none.
            Differentiable, so it can be learned by hypergradient like ``lr``.
        checkpoint: second order only: keep no activation of the support passes; the outer
            backward recomputes each inner step (:func:`torch.utils.checkpoint.checkpoint`), so
            the memory of a long inner loop grows by one set of parameters per step instead of
            one set of activations, at the cost of one more support forward and backward per
            step. The same values and meta-gradient. Ignored for ``first_order`` (its memory is
            already flat) and where gradients are off.
        use_autograd: differentiate the support loss with ``torch.autograd.grad`` instead of
            ``torch.func.grad``: the same values, and safe to run in several Python threads at
            once (torch.func transforms are not), but not under ``vmap``. Where gradients are off
            (evaluation), ``torch.func.grad`` is used regardless.
    """
    names = list(params) if adapt_names is None else list(adapt_names)
    per_step = isinstance(lr, Sequence) and not isinstance(lr, str)
    if per_step and len(lr) < steps:
        raise ValueError(f"{len(lr)} per-step learning rates given for {steps} inner steps.")

    def support_loss(adapted: Params, current: Params) -> Tensor:
        return loss({**current, **adapted}, buffers, support_x, support_y)

    current = params
    if (use_autograd or (checkpoint and not first_order)) and torch.is_grad_enabled():
        for step in range(steps):
            current = _autograd_step(
                support_loss, current, names, lr[step] if per_step else lr, weight_decay,
                first_order=first_order, checkpoint=checkpoint and not first_order,
            )
            yield current
        return
    for step in range(steps):
        grads = grad(support_loss)({n: current[n] for n in names}, current)
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        current = sgd_step(current, grads, lr[step] if per_step else lr, weight_decay)
        yield current


def _autograd_step(
    support_loss: Callable[[Params, Params], Tensor],
    current: Params,
    names: Sequence[str],
    lr: LearningRates,
    weight_decay: LearningRates | None,
    *,
    first_order: bool,
    checkpoint: bool,
) -> Params:
    """One inner step differentiated with ``torch.autograd.grad`` (``create_graph`` unless
    ``first_order``), optionally under a non-reentrant checkpoint (``torch.func.grad`` does not
    run under the saved-tensor hooks a checkpoint uses)."""
    keys = list(current)

    def step(*tensors: Tensor) -> tuple[Tensor, ...]:
        now = dict(zip(keys, tensors, strict=True))
        value = support_loss({n: now[n] for n in names}, now)
        wrt = [now[n] for n in names]
        grads = torch.autograd.grad(value, wrt, create_graph=not first_order, allow_unused=True)
        by_name = {n: torch.zeros_like(t) if g is None else g for n, t, g in zip(names, wrt, grads, strict=True)}
        new = sgd_step(now, by_name, lr, weight_decay)
        return tuple(new[k] for k in keys)

    # autograd.grad needs inputs that require grad; a tensor outside the outer graph (a frozen
    # parameter) gets a detached copy that does, and stays outside it.
    inputs = tuple(t if t.requires_grad else t.detach().requires_grad_() for t in current.values())
    out = torch.utils.checkpoint.checkpoint(step, *inputs, use_reentrant=False) if checkpoint else step(*inputs)
    return dict(zip(keys, out, strict=True))


def adapt(
    loss: Callable[[Params, Params, Tensor, Tensor], Tensor],
    params: Params,
    buffers: Params,
    support_x: Tensor,
    support_y: Tensor,
    *,
    steps: int,
    lr: LearningRates | Sequence[LearningRates],
    adapt_names: Sequence[str] | None = None,
    first_order: bool = False,
    weight_decay: LearningRates | None = None,
    checkpoint: bool = False,
    use_autograd: bool = False,
) -> Params:
    """The parameters after ``steps`` inner gradient steps on the support set.

    A pure function: see :func:`adapt_trajectory` for the arguments. Differentiable with respect
    to ``params``, ``lr`` and ``weight_decay`` (second order unless ``first_order``).
    """
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}.")
    result = params
    for result in adapt_trajectory(  # noqa: B007 - only the last one is returned
        loss, params, buffers, support_x, support_y,
        steps=steps, lr=lr, adapt_names=adapt_names, first_order=first_order, weight_decay=weight_decay,
        checkpoint=checkpoint, use_autograd=use_autograd,
    ):
        pass
    return result


def _key(name: str) -> str:
    return name.replace(".", "__")


class InnerLR(nn.Module):
    """Inner-loop learning rates, fixed or learned as meta-parameters.

    Modes:
        ``fixed``: a constant, not learned (plain MAML).
        ``scalar``: one learned rate shared by every adapted parameter.
        ``per_tensor``: one learned rate per parameter tensor.
        ``per_element``: one learned rate per parameter element (Meta-SGD, Li et al. 2017).

    Learned rates are trained by the outer optimiser with the meta-gradient: this is
    hyperparameter optimisation by hypergradient, with the inner learning rate as the
    hyperparameter.

    Args:
        params: the adapted parameters (names and shapes).
        init: the initial (or fixed) learning rate.
        mode: one of ``LR_MODES``.
    """

    def __init__(self, params: Mapping[str, Tensor], init: float, mode: LRMode = "fixed") -> None:
        super().__init__()
        if mode not in LR_MODES:
            raise ValueError(f"unknown inner {self.what} mode {mode!r}; choose one of {LR_MODES}.")
        self._check_init(init)
        self.mode, self.init, self.names = mode, float(init), list(params)
        self.rates = nn.ParameterDict()
        if mode == "scalar":
            self.rates["all"] = nn.Parameter(torch.tensor(float(init)))
        elif mode == "per_tensor":
            for n in self.names:
                self.rates[_key(n)] = nn.Parameter(torch.tensor(float(init)))
        elif mode == "per_element":
            for n, p in params.items():
                self.rates[_key(n)] = nn.Parameter(torch.full_like(p.detach(), float(init)))

    what = "learning-rate"

    @staticmethod
    def _check_init(init: float) -> None:
        if not init > 0:
            raise ValueError(f"the inner learning rate must be > 0, got {init}.")

    def as_dict(self, rates: Mapping[str, Tensor] | None = None) -> dict[str, float | Tensor]:
        """Per-parameter learning rates. ``rates`` substitutes functional values for
        ``self.rates`` (keys as in ``self.rates``), e.g. inside ``vmap`` or ``grad``."""
        r = dict(self.rates) if rates is None else rates
        if self.mode == "fixed":
            return dict.fromkeys(self.names, self.init)
        if self.mode == "scalar":
            return dict.fromkeys(self.names, r["all"])
        return {n: r[_key(n)] for n in self.names}

    def extra_repr(self) -> str:
        return f"mode={self.mode}, init={self.init}"


class InnerWeightDecay(InnerLR):
    """Inner-loop weight decay ``wd`` (each inner step is ``p - lr * (g + wd * p)``), fixed or
    learned as a meta-parameter: hyperparameter optimisation by hypergradient, as
    :class:`InnerLR` does for the learning rate.

    Modes as :class:`InnerLR`: ``fixed`` (a constant; 0 means no weight decay at all), or learned
    ``scalar``, ``per_tensor``, ``per_element``, starting from ``init`` (>= 0; a learned value may
    leave that range, as a learned rate may).

    Args:
        params: the adapted parameters (names and shapes).
        init: the initial (or fixed) weight decay, >= 0.
        mode: one of ``LR_MODES``.
    """

    what = "weight-decay"

    @staticmethod
    def _check_init(init: float) -> None:
        if not init >= 0:
            raise ValueError(f"the inner weight decay must be >= 0, got {init}.")

    def __init__(self, params: Mapping[str, Tensor], init: float = 0.0, mode: LRMode = "fixed") -> None:
        super().__init__(params, init, mode)

    @property
    def enabled(self) -> bool:
        """False for the fixed weight decay 0 (the inner update is then exactly plain SGD)."""
        return self.mode != "fixed" or self.init != 0

    def as_dict(self, rates: Mapping[str, Tensor] | None = None) -> dict[str, float | Tensor] | None:  # type: ignore[override]
        """Per-parameter weight decay, or ``None`` when disabled (see :attr:`enabled`)."""
        return super().as_dict(rates) if self.enabled else None
