"""Hypergradients of an ordinary training run: learning rates, weight decay and data weights.

A training run is the inner loop: :func:`innerloop.adapt.unroll` with the :func:`~innerloop.adapt.sgd`
rule on mini-batches of a training set, whose learning rates and weight decays are hyperparameters
(:class:`Hyper`), on a training loss whose per-example weights may be hyperparameters too. The
outer objective is the (unweighted) mean loss on a validation set. Two ways to its gradient:

* :func:`unrolled`: reverse-mode differentiation through the last ``truncate`` of the ``steps`` SGD
  steps (``truncate = steps``: the exact gradient of the run). Memory: the graph of ``truncate``
  steps (one set of parameters, gradients and mini-batch activations per step); the first
  ``steps - truncate`` steps run without a graph.
* :func:`implicit`: the implicit-function-theorem hypergradient at the run's end point ``w``, taken as
  the minimiser of the training loss (Lorraine et al. 2020)::

      dL_val/dh = - (dL_val/dw)^T H^{-1} d^2L_train/(dw dh),   H = d^2L_train/dw^2,

  with ``H^{-1} v`` by conjugate gradient or by the Neumann series ``alpha sum_j (I - alpha H)^j v``.
  Only for hyperparameters the training loss contains (weight decay, data weights): a learning
  rate does not move the minimiser, so it is refused. Memory: one set of parameters per vector
  of the solver, no graph of the run.

Hyperparameters are stored unconstrained, so a gradient step never makes one invalid: learning
rates and weight decays as their logarithm (``value = exp(raw)``), data weights as logits
(``weight = sigmoid(raw)``, each in ``(0, 1)``; the training loss is ``mean_i weight_i l_i``, the
mean over the batch of the weighted per-example losses). Weight decay ``wd`` enters every SGD step
as ``p - lr (g + wd p)``, the gradient of ``L(p) + wd/2 |p|^2``: the implicit method uses that
training loss.

Compute is counted per method in inner steps (gradients of a mini-batch) and Hessian-vector
products (``hvps``): the backward pass through one unrolled step counts as one Hessian-vector
product on that step's batch; an implicit solve uses ``terms`` products plus one mixed product on
the whole training set. See ``benchmarks/results/tune_vs_grid.md`` for a measured comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from innerloop.adapt import LearningRates, Params, gradient, hessian_vector_product, last, sgd, unroll
from innerloop.numerics import conjugate_gradient, dot

Granularity = Literal["scalar", "tensor", "element"]
"""How finely a hyperparameter is tuned: one for every parameter (``scalar``), one per parameter
tensor (``tensor``: per layer, a weight and its bias each), or one per parameter element (``element``)."""
GRANULARITIES: tuple[str, ...] = ("scalar", "tensor", "element")
LossName = Literal["squared", "cross_entropy"]
LOSSES: tuple[str, ...] = ("squared", "cross_entropy")
Solver = Literal["cg", "neumann"]
LR, WD, DATA = "lr", "weight_decay", "data_weights"


def per_example_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``(predictions [n, ...], targets [n, ...] or [n]) -> losses [n]``: ``squared`` is
    ``1/2 |pred - y|^2`` per example (summed over the output), ``cross_entropy`` takes logits
    ``[n, classes]`` and integer labels ``[n]``."""
    if name == "squared":
        return lambda pred, y: 0.5 * (pred - y.reshape(pred.shape)).pow(2).reshape(pred.shape[0], -1).sum(1)
    if name == "cross_entropy":
        return lambda pred, y: F.cross_entropy(pred, y, reduction="none")
    raise ValueError(f"loss {name!r} is unknown: choose one of {list(LOSSES)}.")


@dataclass(frozen=True)
class Hyper:
    """The hyperparameters of a training run as a dict of unconstrained tensors.

    Keys of :attr:`tensors` (the tuned ones): ``"lr"`` (one log learning rate, shape ``[]``) or
    ``"lr/<param>"`` (one per parameter tensor: shape ``[]``; or per element: the parameter's shape);
    the same for ``"weight_decay"``; ``"data_weights"``: logits ``[n_train]``. What is not tuned is
    the fixed float :attr:`lr` / :attr:`weight_decay` (``None``: no weight decay). Build one with
    :meth:`create`.
    """

    tensors: dict[str, Tensor]
    lr: float | None = None
    """The learning rate of every parameter when learning rates are not tuned."""
    weight_decay: float | None = None
    """The weight decay of every parameter when weight decays are not tuned (None: none)."""

    @staticmethod
    def create(
        params: Mapping[str, Tensor], *, lr: float, weight_decay: float | None = None,
        tune_lr: Granularity | None = None, tune_weight_decay: Granularity | None = None,
        data_weights: int | None = None, init_data_weight: float = 0.5,
    ) -> Hyper:
        """Hyperparameters starting at learning rate ``lr`` and weight decay ``weight_decay`` for every
        parameter; ``tune_lr`` / ``tune_weight_decay``: tune them at that :data:`Granularity`
        (``None``: keep them fixed); ``data_weights``: tune one weight per training example (the
        number of examples), each starting at ``init_data_weight`` in ``(0, 1)``. Tensors in the
        parameters' dtype and device."""
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        if weight_decay is not None and not weight_decay > 0 and tune_weight_decay is not None:
            raise ValueError(f"a tuned weight decay starts > 0 (it is stored as its log), got {weight_decay}.")
        if weight_decay is not None and weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0 (or None), got {weight_decay}.")
        if not 0 < init_data_weight < 1:
            raise ValueError(f"init_data_weight must be in (0, 1) (a sigmoid of a logit), got {init_data_weight}.")
        if data_weights is not None and data_weights < 1:
            raise ValueError(f"data_weights is the number of training examples (>= 1), got {data_weights}.")
        if not params:
            raise ValueError("no parameters: give the model's named parameters.")
        ref = next(iter(params.values()))
        tensors: dict[str, Tensor] = {}
        for key, value, how in ((LR, lr, tune_lr), (WD, weight_decay, tune_weight_decay)):
            if how is None:
                continue
            if how not in GRANULARITIES:
                raise ValueError(f"granularity {how!r} of {key} is unknown: choose one of {list(GRANULARITIES)}.")
            if value is None:
                raise ValueError(f"tune_{key}={how!r} needs a starting {key} > 0, got None.")
            raw = float(torch.log(torch.tensor(value, dtype=torch.float64)))
            if how == "scalar":
                tensors[key] = torch.full((), raw, dtype=ref.dtype, device=ref.device)
            for name, p in params.items() if how != "scalar" else ():
                shape = p.shape if how == "element" else ()
                tensors[f"{key}/{name}"] = torch.full(shape, raw, dtype=p.dtype, device=p.device)
        if data_weights is not None:
            logit = float(torch.logit(torch.tensor(init_data_weight, dtype=torch.float64)))
            tensors[DATA] = torch.full((data_weights,), logit, dtype=ref.dtype, device=ref.device)
        return Hyper(tensors, lr=None if tune_lr is not None else lr,
                     weight_decay=None if tune_weight_decay is not None else weight_decay)

    def with_tensors(self, tensors: Mapping[str, Tensor]) -> Hyper:
        """The same hyperparameters with other raw tensors (same keys)."""
        if set(tensors) != set(self.tensors):
            raise ValueError(f"hyperparameter keys {sorted(tensors)} differ from {sorted(self.tensors)}.")
        return replace(self, tensors={k: tensors[k] for k in self.tensors})

    def kinds(self) -> set[str]:
        """Which of ``lr``, ``weight_decay``, ``data_weights`` are tuned."""
        return {k.split("/", 1)[0] for k in self.tensors}

    def _rates(self, key: str, fixed: float | None, names: Sequence[str]) -> LearningRates | None:
        if key in self.tensors:
            return self.tensors[key].exp()
        if any(k.startswith(f"{key}/") for k in self.tensors):
            return {n: self.tensors[f"{key}/{n}"].exp() for n in names}
        return fixed

    def learning_rates(self, names: Sequence[str]) -> LearningRates:
        """The SGD learning rates of the parameters ``names``: a float, a tensor or one per name."""
        rates = self._rates(LR, self.lr, names)
        assert rates is not None  # create() keeps lr when it is not tuned
        return rates

    def weight_decays(self, names: Sequence[str]) -> LearningRates | None:
        """The weight decays of the parameters ``names`` (None: no weight decay)."""
        return self._rates(WD, self.weight_decay, names)

    def data_weights(self) -> Tensor | None:
        """The per-example weights ``sigmoid(logits)`` ``[n_train]`` in ``(0, 1)``, or None (all one)."""
        return self.tensors[DATA].sigmoid() if DATA in self.tensors else None

    def values(self) -> dict[str, Tensor]:
        """The hyperparameters themselves (``exp`` / ``sigmoid`` of the raw tensors), detached."""
        return {k: (t.sigmoid() if k == DATA else t.exp()).detach() for k, t in self.tensors.items()}


@dataclass(frozen=True)
class TrainingRun:
    """The inner problem: ``steps`` SGD steps of ``model`` on ``(train_x, train_y)``.

    Attributes:
        model: the network; called through :func:`torch.func.functional_call` with the parameters.
        init: the parameters the run starts from (``{name: tensor}``, detached).
        train_x: ``[n_train, *input_shape]``.
        train_y: ``[n_train, *target_shape]`` (or ``[n_train]`` labels for ``cross_entropy``).
        steps: SGD steps of the run (>= 1).
        batch_size: examples per step (None or >= n_train: the whole training set every step).
        loss: the per-example loss (:func:`per_example_loss`).
        seed: the mini-batches of step ``t`` are fixed by ``(seed, t)``: a run is deterministic.
    """

    model: nn.Module
    init: dict[str, Tensor]
    train_x: Tensor
    train_y: Tensor
    steps: int
    batch_size: int | None = None
    loss: str = "squared"
    seed: int = 0
    buffers: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or None: the whole set), got {self.batch_size}.")
        if self.train_x.shape[0] != self.train_y.shape[0]:
            raise ValueError(f"train_x has {self.train_x.shape[0]} examples, train_y {self.train_y.shape[0]}.")
        per_example_loss(self.loss)  # an unknown name is refused here

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    def batch(self, step: int) -> Tensor | None:
        """The example indices ``[batch_size]`` of step ``step`` (None: the whole set): a permutation
        of the training set per epoch, drawn from ``(seed, epoch)``."""
        n, b = self.n_train, self.batch_size
        if b is None or b >= n:
            return None
        per_epoch = n // b
        epoch, slot = divmod(step, per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
        return order[slot * b:(slot + 1) * b].to(self.train_x.device)

    def data_loss(self, params: Params, weights: Tensor | None, index: Tensor | None) -> Tensor:
        """``mean_i weight_i l_i`` over the examples ``index`` (None: all): the data term of the training loss."""
        x = self.train_x if index is None else self.train_x[index]
        y = self.train_y if index is None else self.train_y[index]
        losses = per_example_loss(self.loss)(functional_call(self.model, (params, self.buffers), (x,)), y)
        if weights is not None:
            losses = losses * (weights if index is None else weights[index])
        return losses.mean()

    def training_loss(self, hyper: Hyper) -> Callable[[Params], Tensor]:
        """``params -> mean_i weight_i l_i + sum_p wd_p / 2 |p|^2`` on the whole training set: the loss
        whose gradient the SGD steps follow (its minimiser is what :func:`implicit` differentiates)."""
        weights = hyper.data_weights()

        def loss(params: Params) -> Tensor:
            value = self.data_loss(params, weights, None)
            decay = hyper.weight_decays(list(params))
            for name, p in params.items() if decay is not None else ():
                assert decay is not None
                wd = decay[name] if isinstance(decay, Mapping) else decay
                value = value + 0.5 * (wd * p.pow(2)).sum()
            return value

        return loss

    def trajectory(self, hyper: Hyper, start: Params | None = None, *, steps: int | None = None,
                   offset: int = 0) -> Iterator[Params]:
        """:func:`~innerloop.adapt.unroll` of ``steps`` (default: all) SGD steps from ``start``
        (default: :attr:`init`), taking the mini-batches of steps ``offset, offset + 1, ...``.
        Differentiable in ``hyper``'s tensors where gradients are enabled."""
        params = dict(self.init if start is None else start)
        names = list(params)
        weights = hyper.data_weights()
        rule = sgd(hyper.learning_rates(names), hyper.weight_decays(names))

        def objective(p: Params, step: int) -> Tensor:
            return self.data_loss(p, weights, self.batch(offset + step))

        return unroll(objective, params, steps=self.steps if steps is None else steps, rule=rule)

    def train(self, hyper: Hyper, start: Params | None = None) -> Params:
        """The parameters after the whole run, without a graph."""
        with torch.no_grad():
            detached = hyper.with_tensors({k: t.detach() for k, t in hyper.tensors.items()})
            start = dict(self.init if start is None else start)
            return {n: t.detach() for n, t in last(self.trajectory(detached, start), start).items()}


def mean_loss(run: TrainingRun, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """The unweighted mean loss of ``params`` on ``(x [n, ...], y [n, ...])`` (the validation objective)."""
    pred = functional_call(run.model, (params, run.buffers), (x,))
    return per_example_loss(run.loss)(pred, y).mean()


@dataclass(frozen=True)
class Hypergradient:
    """What one hypergradient computation returns.

    Attributes:
        grads: ``d val_loss / d raw`` keyed like :attr:`Hyper.tensors` (shapes alike).
        val_loss: the validation loss at :attr:`params`.
        params: the run's end point (detached).
        inner_steps: SGD steps taken (mini-batch gradients).
        hvps: Hessian-vector products (unrolled: one per differentiated step).
    """

    grads: dict[str, Tensor]
    val_loss: float
    params: dict[str, Tensor]
    inner_steps: int
    hvps: int


def _leaves(hyper: Hyper) -> Hyper:
    return hyper.with_tensors({k: t.detach().requires_grad_() for k, t in hyper.tensors.items()})


def unrolled(run: TrainingRun, hyper: Hyper, val_x: Tensor, val_y: Tensor, *, truncate: int | None = None,
             start: Params | None = None) -> Hypergradient:
    """The hypergradient by reverse-mode differentiation through the last ``truncate`` steps of the run.

    Args:
        run: the training run (``run.steps`` SGD steps).
        hyper: the hyperparameters (any of lr, weight decay, data weights).
        val_x: ``[n_val, *input_shape]``; val_y: ``[n_val, ...]``.
        truncate: differentiate through this many final steps (1..steps; None: all, the exact
            gradient). The first ``steps - truncate`` steps run without a graph, so memory holds
            ``truncate`` steps' graphs.
        start: where the run starts (default ``run.init``).
    """
    k = run.steps if truncate is None else truncate
    if not 1 <= k <= run.steps:
        raise ValueError(f"truncate must be in 1..{run.steps} (the run's steps), got {truncate}.")
    if not hyper.tensors:
        raise ValueError("no hyperparameter is tuned: give tune_lr, tune_weight_decay or data_weights.")
    h = _leaves(hyper)
    params = dict(run.init if start is None else start)
    if k < run.steps:
        with torch.no_grad():
            params = last(run.trajectory(h, params, steps=run.steps - k), params)
        params = {n: t.detach() for n, t in params.items()}
    with torch.enable_grad():
        end = last(run.trajectory(h, params, steps=k, offset=run.steps - k), params)
        val = mean_loss(run, end, val_x, val_y)
        keys = list(h.tensors)
        got = torch.autograd.grad(val, [h.tensors[key] for key in keys], allow_unused=True)
    grads = {key: torch.zeros_like(h.tensors[key]) if g is None else g for key, g in zip(keys, got, strict=True)}
    return Hypergradient(grads, float(val.detach()), {n: t.detach() for n, t in end.items()}, run.steps, k)


def implicit(run: TrainingRun, hyper: Hyper, val_x: Tensor, val_y: Tensor, *, method: Solver = "cg",
             terms: int = 20, alpha: float | None = None, start: Params | None = None,
             params: Params | None = None) -> Hypergradient:
    """The implicit-function-theorem hypergradient at the end of the run (Lorraine et al. 2020).

    Args:
        run: as :func:`unrolled`.
        hyper: as :func:`unrolled`, but tuning weight decay and data weights only, not learning
            rates (refused: they do not move the minimiser).
        val_x: as :func:`unrolled`.
        val_y: as :func:`unrolled`.
        method: ``cg`` (conjugate gradient on ``H q = dL_val/dw``; exact in as many iterations as
            parameters) or ``neumann`` (``q = alpha sum_{j=0}^{terms} (I - alpha H)^j dL_val/dw``;
            converges when ``alpha`` times the largest eigenvalue of ``H`` is below 2).
        terms: Hessian-vector products of the solver (>= 1).
        alpha: the Neumann step (default: the fixed learning rate of the run).
        start: where the run starts (default ``run.init``).
        params: the point to differentiate at instead of training (then ``inner_steps`` is 0).
    """
    if method not in ("cg", "neumann"):
        raise ValueError(f"method {method!r} is unknown: choose 'cg' or 'neumann'.")
    if terms < 1:
        raise ValueError(f"terms must be >= 1, got {terms}.")
    if LR in hyper.kinds():
        raise ValueError("the implicit hypergradient cannot tune learning rates: a learning rate does not "
                         "change the minimiser of the training loss, so its implicit gradient is zero. Keep "
                         "the learning rate fixed (tune_lr=None) or use the unrolled method.")
    if not hyper.tensors:
        raise ValueError("no hyperparameter is tuned: give tune_weight_decay or data_weights.")
    step = alpha if alpha is not None else hyper.lr
    if method == "neumann" and (step is None or not step > 0):
        raise ValueError(f"the Neumann series needs a step alpha > 0, got {step}.")
    steps_taken = 0
    if params is None:
        params, steps_taken = run.train(hyper, start), run.steps
    w = {n: t.detach() for n, t in params.items()}
    with torch.enable_grad():
        w_leaf = {n: t.requires_grad_() for n, t in ((n, t.clone()) for n, t in w.items())}
        val = mean_loss(run, w_leaf, val_x, val_y)
        v = dict(zip(w_leaf, torch.autograd.grad(val, list(w_leaf.values())), strict=True))
    fixed = hyper.with_tensors({k: t.detach() for k, t in hyper.tensors.items()})
    hvp = hessian_vector_product(run.training_loss(fixed), w)
    if method == "cg":
        q = conjugate_gradient(hvp, v, steps=terms)
    else:
        assert step is not None
        term, total = dict(v), dict(v)
        for _ in range(terms):
            hv = hvp(term)
            term = {n: term[n] - step * hv[n] for n in term}
            total = {n: total[n] + term[n] for n in total}
        q = {n: step * t for n, t in total.items()}
    h = _leaves(hyper)
    q = {n: t.detach() for n, t in q.items()}
    with torch.enable_grad():
        g = gradient(run.training_loss(h), w, create_graph=True)
        mixed = dot(g, q)
        keys = list(h.tensors)
        got = torch.autograd.grad(mixed, [h.tensors[k] for k in keys], allow_unused=True)
    grads = {k: torch.zeros_like(h.tensors[k]) if gk is None else -gk for k, gk in zip(keys, got, strict=True)}
    return Hypergradient(grads, float(val.detach()), w, steps_taken, terms + 1)


__all__ = [
    "GRANULARITIES", "LOSSES", "Granularity", "Hyper", "Hypergradient", "LossName", "Solver", "TrainingRun",
    "implicit", "mean_loss", "per_example_loss", "unrolled",
]
