"""The small interface every algorithm implements, its typed options, and what gradient-based
learners share.

An algorithm is an :class:`torch.nn.Module` whose parameters are its meta-parameters (the model's
initial weights, learned inner learning rates, ...). The training loop only ever calls

* :meth:`Algorithm.meta_gradient` -- the outer-loop gradient of one meta-batch, and
* :meth:`Algorithm.evaluate` -- the query metric of each task after 0, 1, ..., k adaptation steps,

so one loop, one checkpoint format and one evaluation protocol serve every algorithm. Each
algorithm declares its options as a frozen dataclass (:attr:`Algorithm.Options`, valid by
construction) and what it can do (:attr:`Algorithm.capabilities`); the registry and the config
are derived from those declarations. How a meta-batch of tasks runs (vmap, loop, threads, memory
layout) is :mod:`innerloop.execution`'s business, not the algorithm's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast, get_type_hints

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from innerloop.adapt import Params, UpdateRule, select, sgd, unroll
from innerloop.algorithms.rates import InnerLR, InnerWeightDecay
from innerloop.execution import Execution, TaskTensors, check_precision, map_tasks, resolve_device
from innerloop.norm import BATCH_NORM_POLICIES, BatchNormPolicy, NormState
from innerloop.split import TaskView, head_split
from innerloop.tasks import Objective, TaskBatch, TaskFamily
from innerloop.typecheck import typed

Targets = Literal["values", "labels", "any"]
TARGETS: tuple[str, ...] = ("values", "labels", "any")


def check_shapes(targets: str, pred: Tensor, target: Tensor, what: str = "loss") -> None:
    """Refuse a prediction and target that do not fit ``targets``: ``values`` needs the same shape
    (regression: a ``[n]`` target against a ``[n, 1]`` prediction would broadcast to ``[n, n]``),
    ``labels`` needs ``pred [n, classes]`` and integer ``target [n]``; ``any`` checks nothing."""
    if targets == "values" and pred.shape != target.shape:
        raise ValueError(
            f"the {what} got a prediction of shape {tuple(pred.shape)} and a target of shape "
            f"{tuple(target.shape)}; "
            "regression needs the same shape (a [n] target against [n, 1] predictions would broadcast). Give "
            "targets shaped like the model's output (e.g. y.unsqueeze(-1)), or a model with that output.")
    if targets == "labels" and (pred.dim() != target.dim() + 1 or pred.shape[:-1] != target.shape
                                or target.is_floating_point()):
        raise ValueError(
            f"the {what} got a prediction of shape {tuple(pred.shape)} and a target of shape "
            f"{tuple(target.shape)} ({target.dtype}); classification needs [n, classes] scores and [n] "
            "integer labels.")


@dataclass(frozen=True)
class ObjectiveFns:
    """The loss to train with and the metric to report, for one kind of task.

    Attributes:
        loss: ``(pred, target) -> scalar`` to minimise (differentiable, twice for second order).
        metric: ``(pred, target) -> scalar`` reported after adaptation (need not be differentiable).
        metric_name: the metric's name in logs and tables.
        higher_is_better: whether a higher metric is better (it picks the best checkpoint).
        kind: which task families it fits (``regression`` or ``classification``; algorithms that only
            classify, such as ProtoNets, refuse ``regression``).
        targets: shape rule checked on every call (:func:`check_shapes`): ``values``, ``labels`` or ``any``.
    """

    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], Tensor]
    metric_name: str
    higher_is_better: bool
    kind: Objective = "regression"
    targets: Targets = "any"

    def __post_init__(self) -> None:
        for key in ("loss", "metric"):
            if not callable(getattr(self, key)):
                raise TypeError(f"objective {key} must be a callable (pred, target) -> scalar tensor, "
                                f"got {getattr(self, key)!r}.")
        if not isinstance(self.metric_name, str) or not self.metric_name.isidentifier():
            raise ValueError(f"metric_name = {self.metric_name!r} is invalid: give a name such as 'mae'.")
        if self.kind not in ("regression", "classification"):
            raise ValueError(f"objective kind = {self.kind!r} is invalid: choose 'regression' or "
                             "'classification'.")
        if self.targets not in TARGETS:
            raise ValueError(f"objective targets = {self.targets!r} is invalid: choose one of {TARGETS}.")
        if self.targets != "any":
            raw_loss, raw_metric, rule = self.loss, self.metric, self.targets

            def loss(pred: Tensor, target: Tensor) -> Tensor:
                check_shapes(rule, pred, target, "loss")
                return raw_loss(pred, target)

            def metric(pred: Tensor, target: Tensor) -> Tensor:
                check_shapes(rule, pred, target, self.metric_name)
                return raw_metric(pred, target)

            object.__setattr__(self, "loss", loss)
            object.__setattr__(self, "metric", metric)


def custom_objective(
    loss: Callable[[Tensor, Tensor], Tensor], metric: Callable[[Tensor, Tensor], Tensor] | None = None, *,
    kind: Objective, metric_name: str | None = None, higher_is_better: bool | None = None,
    targets: Targets | None = None,
) -> ObjectiveFns:
    """A user's loss (and metric) for ``kind`` tasks. Without ``metric`` the loss is the metric
    (lower is better). ``targets`` defaults to the kind's rule (``values`` for regression, ``labels``
    for classification); give ``any`` for predictions and targets of other shapes."""
    if metric is None:
        if higher_is_better:
            raise ValueError("higher_is_better=True needs a metric: the loss is minimised.")
        metric, higher_is_better = loss, False
    if higher_is_better is None:
        raise ValueError("say whether the metric is better higher or lower: higher_is_better=True or False.")
    name = str(metric_name or getattr(metric, "__name__", "metric"))
    rule: Targets = targets or ("labels" if kind == "classification" else "values")
    return ObjectiveFns(loss, metric, name, higher_is_better, kind, rule)


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


OBJECTIVES: dict[str, ObjectiveFns] = {
    "regression": ObjectiveFns(F.mse_loss, F.mse_loss, "mse", False, "regression", "values"),
    "classification": ObjectiveFns(F.cross_entropy, _accuracy, "accuracy", True, "classification", "labels"),
}


def check(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise ``ValueError("<key> = <value> is invalid: <rule>.")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key} = {value!r} is invalid: {rule}.")


def resolve_aliases(options: type[AlgorithmOptions], values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` keyed by field names (older names translated); a field given twice, under its name
    and an alias, is refused."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = options.aliases.get(key, key)
        if name in out:
            raise ValueError(f"{name} is given twice (as {name!r} and as its older name "
                             f"{next(k for k, v in options.aliases.items() if v == name)!r}); give it once.")
        out[name] = value
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class AlgorithmOptions:
    """Base of every algorithm's options: a frozen dataclass checked when built (so an invalid one
    cannot exist). Subclasses add fields (with a docstring each) and extend :meth:`check`."""

    aliases: ClassVar[dict[str, str]] = {}
    """Older names of fields (config keys and keyword arguments of innerloop 0.1.0) -> field names."""

    batch_norm: BatchNormPolicy = "batch"
    """What BatchNorm layers normalise with (:mod:`innerloop.norm`): ``batch`` statistics (the MAML
    protocol, transductive at test time), ``running`` statistics accumulated in meta-training and used
    at test time (non-transductive), or ``per_step`` statistics (MAML++ only)."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, typed(getattr(self, f.name), hints[f.name], f.name))
        self.check()

    def check(self) -> None:
        """Range checks; raise ``ValueError`` naming the field, its value and what is allowed."""
        check(self.batch_norm in BATCH_NORM_POLICIES, "batch_norm", self.batch_norm,
              f"choose one of {list(BATCH_NORM_POLICIES)}")


@dataclass(frozen=True)
class GradientOptions(AlgorithmOptions):
    """Options of every learner that adapts by gradient steps."""

    inner_lr: float = 0.01
    """The inner (adaptation) learning rate (initial value where it is learned)."""
    inner_steps: int = 1
    """Inner steps per task in meta-training and validation."""

    def check(self) -> None:
        super().check()
        check(isinstance(self.inner_lr, int | float) and 0 < self.inner_lr < float("inf"), "inner_lr",
              self.inner_lr, "must be > 0 (and finite)")
        check(_is_int(self.inner_steps) and self.inner_steps >= 1, "inner_steps", self.inner_steps,
              "steps must be >= 1 (an integer)")


def check_adapt(options: AlgorithmOptions, key: str = "adapt") -> None:
    """Check the glob patterns of ``options.<key>`` (a list becomes a tuple: options are frozen)."""
    adapt = getattr(options, key)
    if isinstance(adapt, list):
        adapt = tuple(adapt)
        object.__setattr__(options, key, adapt)
    ok = (isinstance(adapt, str) and adapt != "") or (
        isinstance(adapt, tuple) and len(adapt) > 0 and all(isinstance(a, str) and a for a in adapt))
    check(ok, key, adapt, "give 'all' or a non-empty list of glob patterns such as ['head.*']")


@dataclass(frozen=True)
class Capabilities:
    """What an algorithm can do, declared once and read by the config and the model builder."""

    objectives: tuple[Objective, ...] = ("regression", "classification")
    """The kinds of task families it learns on."""
    head: Literal["ways", "none", "train_classes"] = "ways"
    """The model's output size: one per way, none (an embedding network), one per training class."""
    any_test_ways: bool = False
    """Whether test tasks may have another number of ways than training tasks."""
    more_train_ways: bool = False
    """Whether meta-training tasks may have more ways than test tasks (ProtoNets' higher way)."""


class Algorithm(nn.Module):
    """The interface: how to compute a meta-gradient, and how to score adaptation to a task.

    Args:
        model: the network that is adapted to each task.
        objective: ``regression`` (MSE), ``classification`` (cross-entropy, accuracy), or a user's
            loss and metric (:func:`custom_objective`).
        options: the algorithm's :attr:`Options` (default: its defaults);
        execution: how meta-batches run (:class:`~innerloop.execution.Execution`);
        **overrides: any field of the options or of the execution by keyword
            (``MAML(model, "regression", inner_lr=0.1, task_threads=1)``).
    """

    name: ClassVar[str] = "algorithm"
    Options: ClassVar[type[AlgorithmOptions]] = AlgorithmOptions
    per_step_statistics: ClassVar[bool] = False
    """Whether ``batch_norm = 'per_step'`` is supported (MAML++)."""
    capabilities: ClassVar[Capabilities] = Capabilities()
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    """Other registered names for this class with fixed option values (``fomaml`` is MAML with
    ``first_order = True``)."""

    def __init__(self, model: nn.Module, objective: Objective | ObjectiveFns = "classification",
                 options: AlgorithmOptions | None = None, execution: Execution | None = None,
                 **overrides: Any) -> None:
        super().__init__()
        exec_names = [f.name for f in dataclasses.fields(Execution)]
        exec_over = {k: overrides.pop(k) for k in list(overrides) if k in exec_names}
        self.execution = dataclasses.replace(execution or Execution(), **exec_over)
        # a device this machine lacks, or a precision its device cannot run, fails here, before any work
        check_precision(self.execution.precision, resolve_device(self.execution.device))
        if isinstance(objective, ObjectiveFns):
            fns = objective
        elif isinstance(objective, str) and objective in OBJECTIVES:
            fns = OBJECTIVES[objective]
        else:
            raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}, or give "
                             "innerloop.custom_objective(loss, metric, kind=...).")
        if fns.kind not in self.capabilities.objectives:
            raise ValueError(f"{self.name} learns {' or '.join(self.capabilities.objectives)} tasks, "
                             f"not {fns.kind}.")
        self.model = model
        self.objective: Objective = fns.kind
        self.fns = fns
        self.options = self.make_options(options, overrides)
        policy = self.options.batch_norm
        if policy == "per_step" and not self.per_step_statistics:
            raise ValueError(f"batch_norm = 'per_step' is MAML++'s per-step statistics, which {self.name} does "
                             "not have; use 'batch' or 'running', or the algorithm 'mamlpp'.")
        self.norm = NormState(model, policy, self.statistics_sets())

    def __getattr__(self, key: str) -> Any:
        """Options read as attributes (``maml.first_order``), after the module's own attributes."""
        try:
            return super().__getattr__(key)
        except AttributeError:
            options = self.__dict__.get("options")
            if options is not None and hasattr(options, key):
                return getattr(options, key)
            raise

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.Options)]

    @classmethod
    def make_options(cls, options: AlgorithmOptions | None, overrides: Mapping[str, Any]) -> Any:
        """``options`` (or the defaults) with ``overrides`` applied; unknown names are refused."""
        base = cls.Options() if options is None else options
        if not isinstance(base, cls.Options):
            raise TypeError(f"{cls.name} takes {cls.Options.__name__}, got {type(base).__name__}.")
        names = cls.option_names()
        fixed = resolve_aliases(cls.Options, overrides)
        unknown = [k for k in fixed if k not in names]
        if unknown:
            raise ValueError(f"{cls.name} has no option {unknown[0]!r}; its options are: "
                             f"{', '.join(names) or 'none'}.")
        return dataclasses.replace(base, **fixed) if fixed else base

    @property
    def metric_name(self) -> str:
        return self.fns.metric_name

    @property
    def higher_is_better(self) -> bool:
        return self.fns.higher_is_better

    @property
    def validation_steps(self) -> int:
        """Adaptation steps before scoring validation tasks (the options' ``inner_steps``, else 1)."""
        return int(getattr(self.options, "inner_steps", 1))

    def statistics_sets(self) -> int:
        """Sets of running statistics the BatchNorm policy keeps (MAML++'s ``per_step``: one per step)."""
        return 1

    def buffers_dict(self) -> Params:
        """The buffers a functional forward of the model gets under the BatchNorm policy: the model's,
        with the running statistics as ``None`` where batch statistics are used (:class:`NormState`)."""
        return cast(Params, self.norm.buffers(self.model))

    @property
    def stateful(self) -> bool:
        """Whether this meta-gradient accumulates running statistics (the execution layer then runs
        the tasks as a loop)."""
        return self.norm.keeps_statistics and self.model.training

    def commit_statistics(self) -> None:
        """Write the running statistics recorded by the last meta-batch's tasks into the model."""
        if self.norm.pending():
            self.norm.commit([dict(self.model.named_buffers())])

    def trainable(self) -> dict[str, Tensor]:
        """The meta-parameters: ``named_parameters()`` that require grad (a frozen parameter, with
        ``requires_grad=False``, is neither meta-learned nor adapted and gets no gradient)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The gradient of the outer objective on ``batch``, keyed like :meth:`trainable` (the
        parameters that require grad), and scalar training metrics (``loss`` and the objective's metric)."""
        raise NotImplementedError

    def evaluate(self, batch: TaskBatch, steps: int) -> dict[str, Tensor]:
        """Query ``loss`` and metric of each task after 0..``steps`` adaptation steps.

        Returns:
            ``{"loss": [tasks, steps + 1], metric_name: [tasks, steps + 1]}``.
        """
        raise NotImplementedError

    def set_progress(self, step: int, total: int) -> None:
        """Called by the training loop before outer iteration ``step`` (0-based) of ``total``.

        Algorithms whose meta-objective follows a schedule over training (MAML++ anneals its
        multi-step loss weights and derivative order) read it here; the default ignores it. The
        loop passes the true step on resume too, so schedules need no checkpointed state.
        """

    def training_family(self, family: TaskFamily) -> TaskFamily:
        """The family whose ``train`` split feeds :meth:`meta_gradient` (default: ``family``).

        Validation and testing always use the few-shot family; an algorithm that trains on
        something else (the Baseline pre-trains on ordinary batches with global class labels)
        wraps ``family`` here.
        """
        return family

    def extra_repr(self) -> str:
        return repr(self.options)


def trainable_only(model: nn.Module, names: list[str], which: Any = "all") -> list[str]:
    """``names`` without the model's frozen parameters (``requires_grad=False``: they never adapt).
    Refused when nothing trainable is left, naming the frozen ones."""
    params = dict(model.named_parameters())
    kept = [n for n in names if params[n].requires_grad]
    if not kept:
        frozen = [n for n in names if not params[n].requires_grad]
        if not params or not frozen:
            raise ValueError("the model has no parameters to adapt.")
        raise ValueError(
            f"adapt = {which!r} matches only frozen parameters (requires_grad=False): {frozen[:8]}"
            f"{' ...' if len(frozen) > 8 else ''}. Frozen parameters never adapt; unfreeze the ones to adapt "
            "(p.requires_grad_(True)) or choose trainable ones with adapt=[<glob patterns>].")
    return kept


def scores(fns: ObjectiveFns, pred: Tensor, target: Tensor) -> Tensor:
    """``[2]``: the query (loss, metric), detached."""
    return torch.stack([fns.loss(pred, target), fns.metric(pred, target)]).detach()


class GradientBased(Algorithm):
    """Shared machinery of learners that adapt by gradient steps on the support set.

    Args:
        model: the network whose initial parameters are meta-learned.
        objective: ``regression`` or ``classification``.
        options: as for :class:`Algorithm`.
        execution: as for :class:`Algorithm`.
        **overrides: as for :class:`Algorithm`.
    """

    Options: ClassVar[type[AlgorithmOptions]] = GradientOptions
    adapt_pattern: ClassVar[str | tuple[str, ...] | None] = None
    """A fixed choice of the parameters that adapt (ANIL: ``head.*``); ``None``: the ``adapt`` option."""

    def __init__(self, model: nn.Module, objective: Objective | ObjectiveFns = "regression",
                 options: AlgorithmOptions | None = None, execution: Execution | None = None,
                 **overrides: Any) -> None:
        super().__init__(model, objective, options, execution, **overrides)
        names = [n for n, _ in model.named_parameters()]
        which: str | tuple[str, ...] = self.adapt_pattern or getattr(self.options, "adapt", None) or "all"
        self.adapt_names = trainable_only(model, self.chosen(names, which), which)
        self.split = head_split(model, self.adapt_names) if self.execution.reuse_features else None
        params = dict(model.named_parameters())
        adapted = {n: params[n] for n in self.adapt_names}
        o = self.options
        self.inner_lr = InnerLR(adapted, o.inner_lr, getattr(o, "lr_mode", "fixed"))
        self.inner_wd = InnerWeightDecay(adapted, getattr(o, "weight_decay", 0.0), getattr(o, "wd_mode", "fixed"))

    def chosen(self, names: list[str], which: str | tuple[str, ...]) -> list[str]:
        return select(names, which)

    @property
    def inner_steps(self) -> int:
        return int(self.options.inner_steps)

    # -- functional views -------------------------------------------------------------------
    def params(self) -> Params:
        """The model's parameters as a name -> tensor dict (the live meta-parameters)."""
        return dict(self.model.named_parameters())

    def predict(self, model: nn.Module, params: Params, x: Tensor, buffers: Params | None = None) -> Tensor:
        """``model``'s output on ``x [n, ...]`` with ``params`` and ``buffers`` (default: the model's)."""
        state = (params, self.buffers_dict() if buffers is None else buffers)
        out: Tensor = torch.func.functional_call(model, state, (x,))
        return out

    def rule(self, rates: Mapping[str, Tensor] | None = None, detach: bool = False) -> UpdateRule:
        """The inner update: SGD with the (fixed or learned) rates and weight decay. ``rates``
        substitutes functional values for the learned rates; ``detach`` cuts them from the graph."""
        rates = {k: v.detach() for k, v in self.inner_lr.rates.items()} if detach else rates
        wd = {k: v.detach() for k, v in self.inner_wd.rates.items()} if detach else None
        return sgd(self.inner_lr.as_dict(rates), self.inner_wd.as_dict(wd))

    def view(self, model: nn.Module, params: Params, task: TaskTensors) -> TaskView:
        """One task's predictions at any parameters (the head alone on features captured once where
        only a head adapts, :mod:`innerloop.split`), under the BatchNorm policy's buffers."""
        return TaskView(model, params, self.buffers_dict(), task[0], task[2], self.split)

    def eval_trajectory(self, model: nn.Module, params: Params, task: TaskTensors, steps: int,
                        view: TaskView | None = None) -> Iterator[Params]:
        """The test-time inner loop of one task: parameters after 1..``steps`` steps, no outer graph.
        Algorithms with another inner loop (Reptile's Adam, iMAML's proximal steps) override this."""
        view = view or self.view(model, params, task)
        sy = task[1]
        return unroll(lambda p, _: self.fns.loss(view.support(p), sy), params, steps=steps,
                      rule=self.rule(detach=True), adapt_names=self.adapt_names, first_order=True)

    def trajectory_scores(self, model: nn.Module, params: Params, task: TaskTensors, steps: int) -> Tensor:
        """``[2, steps + 1]``: query (loss, metric) of one task after 0..steps inner steps."""
        view, qy = self.view(model, params, task), task[3]
        trajectory = [params, *self.eval_trajectory(model, params, task, steps, view)]
        return torch.stack([scores(self.fns, view.query(p), qy) for p in trajectory], dim=-1)

    def evaluate(self, batch: TaskBatch, steps: int) -> dict[str, Tensor]:
        """Fine-tune on each task's support set with the inner update rule (no meta-graph) and
        score the query set after 0..``steps`` steps. See :meth:`Algorithm.evaluate`."""
        if steps < 0:
            raise ValueError(f"evaluation steps must be >= 0, got {steps}.")
        params = {n: p.detach() for n, p in self.params().items()}
        out = map_tasks(lambda m, p, task: self.trajectory_scores(m, p, task, steps), self.model, params, batch,
                        self.execution)
        return {"loss": out[:, 0], self.metric_name: out[:, 1]}


@dataclass(frozen=True)
class NoOptions(AlgorithmOptions):
    """An algorithm without options."""

