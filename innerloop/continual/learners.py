"""OML (Javed & White 2019) and ANML (Beaulieu et al. 2020): meta-learning to learn online, one
example at a time, without forgetting.

One task is a trajectory of images ``x_1..x_T`` (of one class, or a few, one after another) and a
remember batch ``R`` from all meta-training classes (:mod:`innerloop.continual.family`). Before the
inner loop, the output rows of the trajectory's classes are re-initialised (so the inner loop
learns each class from scratch, as at meta-test time); then the inner loop is :func:`innerloop.adapt.unroll`
with :func:`~innerloop.adapt.sgd`, one step per image (batch size 1, ``T`` steps), over the
parameters the network names in ``train_adapt`` (OML: the PLN; ANML: the prediction network, not
the NM network). The meta-loss is the cross-entropy of the adapted network on the trajectory and
``R`` together::

    theta_0 = reset(theta, classes of the trajectory)
    theta_j = theta_{j-1} - beta * grad L(theta_{j-1}; x_j, y_j)        j = 1..T
    meta-loss = L(theta_T; {x_1..x_T} + R)

differentiated through the ``T`` steps (second order, as both papers do; ``first_order=True``
drops the Hessian terms) with respect to every meta-parameter: the representation (OML's RLN, ANML's
NM network), which the inner loop leaves alone, and the initial values of what it adapts.

Meta-testing (:func:`stream_eval`): the meta-learned network, frozen but for its ``test_head``
(OML: the PLN; ANML: the last linear layer), with a fresh output layer for the stream's ``N``
classes, trains online for one pass over ``N`` held-out classes, class by class, 15 images each,
one SGD step per image; then it is scored on those training images (meta-test train: learning
without forgetting) and on 5 held-out images of each class (meta-test test: generalisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from innerloop.adapt import Params, last, select, sgd, unroll
from innerloop.algorithms.base import Algorithm, AlgorithmOptions, Capabilities, ObjectiveFns, check, check_adapt
from innerloop.continual.family import seeded
from innerloop.continual.nets import ANMLNet, OMLNet
from innerloop.data.images import ImageClassDataset
from innerloop.execution import Execution, TaskTensors, map_tasks, meta_gradient
from innerloop.split import TaskView, head_split
from innerloop.tasks import Objective, TaskBatch

__all__ = ["ANML", "OML", "ContinualLearner", "ContinualOptions", "StreamResult", "continual_net_check",
           "fresh_rows", "reset_rows", "stream_eval", "stream_split", "streams"]


class ContinualNet(Protocol):
    """What the continual learners read from a network (see :mod:`innerloop.continual.nets`)."""

    train_adapt: tuple[str, ...]
    test_head: str
    out_name: str

    def embed(self, x: Tensor) -> Tensor: ...


def continual_net_check(model: nn.Module) -> ContinualNet:
    """``model`` seen as a :class:`ContinualNet`; a network that does not name its continual parts
    (``train_adapt``, ``test_head``, ``out_name``, ``embed``) is refused, naming the way out."""
    missing = [a for a in ("train_adapt", "test_head", "out_name", "embed") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"{type(model).__name__} lacks {', '.join(missing)}; continual learners need a network "
                        "like innerloop.continual.OMLNet or ANMLNet.")
    net = cast(ContinualNet, model)
    out = model.get_submodule(net.out_name)
    if not isinstance(out, nn.Linear):
        raise TypeError(f"the output layer {net.out_name!r} must be an nn.Linear, got {type(out).__name__}.")
    return net


def fresh_rows(rows: int, fan_in: int, like: Tensor, generator: torch.Generator) -> Tensor:
    """``[rows, fan_in]`` weights drawn as ``nn.Linear`` initialises them (uniform in
    ``+-1/sqrt(fan_in)``) from ``generator``, with the dtype and device of ``like``."""
    bound = 1.0 / math.sqrt(fan_in)
    w = (torch.rand(rows, fan_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return w.to(like.dtype).to(like.device)


def reset_rows(params: Params, out_name: str, labels: Tensor, fresh: Tensor) -> Params:
    """``params`` with the output rows of the classes in ``labels`` replaced: weight rows by the
    rows of ``fresh`` (``[classes, features]``), biases by zero. Differentiable in the other rows;
    no data-dependent control flow (runs under ``vmap``).

    Args:
        params: the network's parameters (``{out_name}.weight [classes, features]``, ``.bias [classes]``).
        labels: ``[T]`` class indices of the trajectory.
    """
    w_name, b_name = f"{out_name}.weight", f"{out_name}.bias"
    w, b = params[w_name], params[b_name]
    hit = F.one_hot(labels, w.shape[0]).amax(0).to(w.dtype)  # [classes]: 1 for a trajectory class
    keep = 1 - hit
    return {**params, w_name: w * keep[:, None] + fresh * hit[:, None], b_name: b * keep}


@dataclass(frozen=True)
class ContinualOptions(AlgorithmOptions):
    """Options of :class:`OML` and :class:`ANML`."""

    inner_lr: float = 0.03
    """The inner SGD rate ``beta`` (one step per trajectory image)."""
    first_order: bool = False
    """Treat the inner gradients as constants (no Hessian terms); the papers: second order."""
    adapt: str | tuple[str, ...] = "auto"
    """Glob patterns of the parameters the inner loop adapts; ``auto``: the network's ``train_adapt``
    (OML: ``pln.*``; ANML: ``features.*`` and ``head.*``)."""
    reset_head: bool = True
    """Re-initialise the output rows of the trajectory's classes before each inner loop."""
    seed: int = 0
    """Seeds the re-initialised rows (those of outer step ``t`` depend on ``(seed, t)`` only)."""

    def check(self) -> None:
        super().check()
        check(isinstance(self.inner_lr, int | float) and 0 < self.inner_lr < float("inf"), "inner_lr",
              self.inner_lr, "must be > 0 (and finite)")
        check_adapt(self)


class ContinualLearner(Algorithm):
    """The OML meta-objective over a continual network (see the module docstring). :class:`OML` and
    :class:`ANML` are this learner on their networks.

    Args:
        model: an :class:`~innerloop.continual.nets.OMLNet` or :class:`~innerloop.continual.nets.ANMLNet`
            (or any network naming its continual parts the same way).
        objective: ``classification`` (the only one).
        options: :class:`ContinualOptions`; execution and ``**overrides`` as for
            :class:`~innerloop.algorithms.base.Algorithm`.
    """

    name = "continual"
    Options: ClassVar[type[AlgorithmOptions]] = ContinualOptions
    capabilities: ClassVar[Capabilities] = Capabilities(objectives=("classification",), head="train_classes")
    net_type: ClassVar[type[nn.Module] | None] = None

    def __init__(self, model: nn.Module, objective: Objective | ObjectiveFns = "classification",
                 options: AlgorithmOptions | None = None, execution: Execution | None = None,
                 **overrides: Any) -> None:
        net = continual_net_check(model)
        if self.net_type is not None and not isinstance(model, self.net_type):
            raise TypeError(f"{self.name} meta-learns a {self.net_type.__name__}, got {type(model).__name__}; "
                            "use ContinualLearner for another network.")
        super().__init__(model, objective, options, execution, **overrides)
        names = [n for n, _ in model.named_parameters()]
        adapt = self.options.adapt
        which = tuple(net.train_adapt) if adapt == "auto" else adapt
        self.adapt_names = select(names, which)
        self.split = head_split(model, self.adapt_names) if self.execution.reuse_features else None
        self.out_name: str = net.out_name
        self.progress = 0

    def set_progress(self, step: int, total: int) -> None:
        """Outer step ``step`` is next: its re-initialised rows are drawn from ``(seed, step)``."""
        self.progress = step

    def _fresh(self) -> Tensor:
        w = dict(self.model.named_parameters())[f"{self.out_name}.weight"]
        return fresh_rows(w.shape[0], w.shape[1], w, seeded(self.options.seed, self.progress))

    def _view(self, model: nn.Module, start: Params, sx: Tensor, qx: Tensor) -> TaskView:
        """One task's predictions: the head alone on features captured once where only a head adapts
        (OML's PLN on the RLN's output: :mod:`innerloop.split`, the same function and gradient), else
        full forwards."""
        return TaskView(model, start, {}, sx, qx, self.split)

    def _inner(self, model: nn.Module, params: Params, sx: Tensor, sy: Tensor, fresh: Tensor | None,
               steps: int, first_order: bool, qx: Tensor | None = None) -> tuple[list[Params], TaskView]:
        """``[theta_0 (reset), theta_1, ..., theta_steps]``: one SGD step per trajectory image, and the
        task's :class:`~innerloop.split.TaskView` (query inputs ``qx``, default none)."""
        start = reset_rows(params, self.out_name, sy, fresh) if fresh is not None else params
        view = self._view(model, start, sx, sx[:0] if qx is None else qx)

        def objective(p: Params, j: int) -> Tensor:
            logits = (view.support(p)[j : j + 1] if view.reuses_features
                      else functional_call(model, p, (sx[j : j + 1],)))
            return F.cross_entropy(logits, sy[j : j + 1])

        trajectory = [start, *unroll(objective, start, steps=steps, rule=sgd(float(self.options.inner_lr)),
                                     adapt_names=self.adapt_names, first_order=first_order)]
        return trajectory, view

    def task_loss(self, model: nn.Module, params: Params, task: TaskTensors, fresh: Tensor | None) -> tuple[
            Tensor, Tensor]:
        """One task's meta-loss (differentiable in ``params``) and its detached ``[loss, accuracy]``.

        ``task``: ``(trajectory_x [T, C, H, W], trajectory_y [T], remember_x [R, C, H, W], remember_y [R])``;
        ``fresh``: ``[classes, features]`` rows for the reset (``None``: no reset)."""
        sx, sy, qx, qy = task
        trajectory, view = self._inner(model, params, sx, sy, fresh, sx.shape[0], bool(self.options.first_order),
                                       qx)
        adapted = trajectory[-1]
        logits = torch.cat([view.support(adapted), view.query(adapted)])
        y = torch.cat([sy, qy])
        loss = F.cross_entropy(logits, y)
        acc = (logits.detach().argmax(-1) == y).to(logits.dtype).mean()
        return loss, torch.stack([loss.detach(), acc])

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The gradient of the mean meta-loss over the batch's tasks, keyed like :meth:`trainable`,
        and its ``loss`` and ``accuracy``."""
        self._check_batch(batch)
        fresh = self._fresh() if self.options.reset_head else None
        grads, aux = meta_gradient(lambda m, p, task: self.task_loss(m, p, task, fresh), self.model,
                                   dict(self.model.named_parameters()), batch, self.trainable(), self.execution,
                                   second_order=not self.options.first_order)
        return grads, {"loss": float(aux[0]), "accuracy": float(aux[1])}

    def evaluate(self, batch: TaskBatch, steps: int) -> dict[str, Tensor]:
        """The remember batch's ``loss`` and ``accuracy`` ``[tasks, steps + 1]`` after 0..``steps``
        images of each trajectory (the rows of its classes reset as in meta-training; no outer graph)."""
        self._check_batch(batch)
        if not 0 <= steps <= batch.support_x.shape[1]:
            raise ValueError(f"steps={steps} but the trajectories hold {batch.support_x.shape[1]} images; "
                             f"choose 0..{batch.support_x.shape[1]}.")
        fresh = self._fresh() if self.options.reset_head else None
        params = {n: p.detach() for n, p in self.model.named_parameters()}

        def one(model: nn.Module, p: Params, task: TaskTensors) -> Tensor:
            sx, sy, qx, qy = task
            out = []
            trajectory, view = self._inner(model, p, sx, sy, fresh, steps, True, qx)
            for q in trajectory:
                logits = view.query(q)
                out.append(torch.stack([F.cross_entropy(logits, qy), (logits.argmax(-1) == qy).to(logits.dtype)
                                        .mean()]))
            return torch.stack(out, -1)

        got = map_tasks(one, self.model, params, batch, self.execution)
        return {"loss": got[:, 0], "accuracy": got[:, 1]}

    def _check_batch(self, batch: TaskBatch) -> None:
        classes = dict(self.model.named_parameters())[f"{self.out_name}.weight"].shape[0]
        for y, what in ((batch.support_y, "trajectory"), (batch.query_y, "remember")):
            if y.dtype != torch.int64 or y.dim() != 2:
                raise ValueError(f"the {what} labels must be int64 [tasks, n] class indices, got {y.dtype} "
                                 f"{tuple(y.shape)}.")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
                raise ValueError(f"a {what} label is outside 0..{classes - 1} (the output layer's rows); build "
                                 "the network with classes >= the number of meta-training classes.")


class OML(ContinualLearner):
    """Online-aware meta-learning (Javed & White 2019) on an :class:`~innerloop.continual.nets.OMLNet`:
    the inner loop adapts the PLN; the RLN is meta-learned only."""

    name = "oml"
    net_type: ClassVar[type[nn.Module] | None] = OMLNet


class ANML(ContinualLearner):
    """A neuromodulated meta-learning algorithm (Beaulieu et al. 2020) on an
    :class:`~innerloop.continual.nets.ANMLNet`: the inner loop adapts the prediction network; the
    NM network, whose sigmoid gates the prediction network's features, is meta-learned only."""

    name = "anml"
    net_type: ClassVar[type[nn.Module] | None] = ANMLNet


@dataclass(frozen=True)
class StreamResult:
    """One meta-test stream: accuracy on its training images and on its held-out images."""

    classes: int
    seed: int
    lr: float
    train_accuracy: float
    """Meta-test train: accuracy on the ``classes * train_per_class`` images the head trained on."""
    test_accuracy: float
    """Meta-test test: accuracy on the ``classes * test_per_class`` held-out images."""


def stream_split(dataset: ImageClassDataset, classes: int, seed: int, train_per_class: int = 15,
                 test_per_class: int = 5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The images of one meta-test stream, a pure function of ``(seed, classes)``: ``classes``
    classes of ``dataset`` in a random order, and of each a random ``train_per_class`` images for the
    stream and ``test_per_class`` others held out.

    Returns:
        ``(train_x [classes * train_per_class, C, H, W], train_y, test_x [classes * test_per_class, ...],
        test_y)``, labels ``0..classes - 1`` in stream order; the stream is class by class.
    """
    n = dataset.num_classes
    if not 1 <= classes <= n:
        raise ValueError(f"a stream of {classes} classes from {n}: choose 1..{n}.")
    need = train_per_class + test_per_class
    if train_per_class < 1 or test_per_class < 0 or int(dataset.counts.min()) < need:
        raise ValueError(f"train_per_class={train_per_class} + test_per_class={test_per_class} images per class, "
                         f"but the smallest class has {int(dataset.counts.min())}.")
    g = seeded(seed, classes)
    order = torch.randperm(n, generator=g)[:classes]
    picks = [torch.randperm(int(dataset.counts[c]), generator=g)[:need] for c in order.tolist()]
    cls = order.repeat_interleave(train_per_class)
    tr = torch.cat([p[:train_per_class] for p in picks])
    te = torch.cat([p[train_per_class:] for p in picks])
    labels = torch.arange(classes)
    return (dataset.gather(cls, tr), labels.repeat_interleave(train_per_class),
            dataset.gather(order.repeat_interleave(test_per_class), te), labels.repeat_interleave(test_per_class))


def _embed(model: ContinualNet, x: Tensor, chunk: int) -> Tensor:
    embed = model.embed
    return torch.cat([embed(x[i : i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else x.new_zeros(0)


def stream_eval(model: nn.Module, dataset: ImageClassDataset, *, classes: int, lr: float, seed: int = 0,
                train_per_class: int = 15, test_per_class: int = 5, chunk: int = 500) -> StreamResult:
    """The meta-test protocol of OML and ANML on one stream (a pure function of ``model``, ``seed``
    and ``classes``; see :func:`stream_split` for the images).

    The network's ``test_head`` trains online on the frozen ``embed`` features: a fresh output layer
    of ``classes`` rows (drawn from ``(seed, classes)`` as ``nn.Linear`` initialises, zero biases;
    the head's other layers start at their meta-learned values), then one SGD step of rate ``lr`` per
    image, class by class, one pass (:func:`innerloop.adapt.unroll` with :func:`~innerloop.adapt.sgd`,
    batch size 1). Then the head is scored on the stream's images and on the held-out ones.

    Args:
        model: an :class:`~innerloop.continual.nets.OMLNet` / :class:`~innerloop.continual.nets.ANMLNet`
            (a learner's ``.model``); its parameters are not changed.
        dataset: the meta-test classes (Omniglot's evaluation set: ``ContinualOmniglot.evaluation``).
        classes: ``N``, the stream's classes; lr: the online rate.
        chunk: images per forward of the frozen part.
    """
    net = continual_net_check(model)
    if not (isinstance(lr, int | float) and 0 < lr < float("inf")):
        raise ValueError(f"lr must be > 0 (and finite), got {lr!r}.")
    train_x, train_y, test_x, test_y = stream_split(dataset, classes, seed, train_per_class, test_per_class)
    head_name, out_name = net.test_head, net.out_name
    head = model.get_submodule(head_name)
    rel = out_name[len(head_name):].lstrip(".")
    prefix = f"{rel}." if rel else ""
    with torch.no_grad():
        ref = next(model.parameters())
        f_train = _embed(net, train_x.to(ref.device, ref.dtype), chunk)
        f_test = _embed(net, test_x.to(ref.device, ref.dtype), chunk)
        device = ref.device
        params = {n: p.detach() for n, p in head.named_parameters()}
        w = params[f"{prefix}weight"]
        params[f"{prefix}weight"] = fresh_rows(classes, w.shape[1], w, seeded(seed, classes))
        params[f"{prefix}bias"] = w.new_zeros(classes)
        y_train, y_test = train_y.to(device), test_y.to(device)

        def objective(p: Params, j: int) -> Tensor:
            return F.cross_entropy(functional_call(head, p, (f_train[j : j + 1],)), y_train[j : j + 1])

        final = last(unroll(objective, params, steps=len(f_train), rule=sgd(float(lr)), first_order=True), params)

        def accuracy(f: Tensor, y: Tensor) -> float:
            if not len(f):
                return float("nan")
            return float((functional_call(head, final, (f,)).argmax(-1) == y).double().mean())

        return StreamResult(classes, seed, float(lr), accuracy(f_train, y_train), accuracy(f_test, y_test))


def streams(model: nn.Module, dataset: ImageClassDataset, *, classes: Sequence[int], lr: float,
            seeds: Sequence[int] = (0,), **kwargs: Any) -> list[StreamResult]:
    """:func:`stream_eval` for every ``N`` in ``classes`` and every seed."""
    return [stream_eval(model, dataset, classes=n, lr=lr, seed=s, **kwargs) for n in classes for s in seeds]
