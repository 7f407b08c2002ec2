"""The small interface every algorithm implements, and what gradient-based learners share.

An algorithm is an :class:`torch.nn.Module` whose parameters are its meta-parameters (the
model's initial weights, learned inner learning rates, ...). The training loop only ever calls

* :meth:`Algorithm.meta_gradient` -- the outer-loop gradient of one meta-batch, and
* :meth:`Algorithm.evaluate` -- the query metric of each task after 0, 1, ..., k adaptation
  steps,

so one loop, one checkpoint format and one evaluation protocol serve every algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from innerloop.adapt import InnerLR, InnerWeightDecay, LRMode, Params, adapt_trajectory, model_loss, select
from innerloop.tasks import Objective, TaskBatch, TaskFamily

Vectorize = Literal["auto", "vmap", "loop"]
VECTORIZE: tuple[str, ...] = ("auto", "vmap", "loop")
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
MEMORY_FORMATS: tuple[str, ...] = ("auto", "channels_last", "contiguous")


@dataclass(frozen=True)
class ObjectiveFns:
    """The loss to train with and the metric to report, for one kind of task."""

    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], Tensor]
    metric_name: str
    higher_is_better: bool


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


OBJECTIVES: dict[str, ObjectiveFns] = {
    "regression": ObjectiveFns(F.mse_loss, F.mse_loss, "mse", higher_is_better=False),
    "classification": ObjectiveFns(F.cross_entropy, _accuracy, "accuracy", higher_is_better=True),
}


class Algorithm(nn.Module):
    """The interface: how to compute a meta-gradient, and how to score adaptation to a task.

    Args:
        model: the network that is adapted to each task.
        objective: ``regression`` (MSE) or ``classification`` (cross-entropy, accuracy).
    """

    name: str = "algorithm"

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}.")
        self.model = model
        self.objective = objective
        self.fns = OBJECTIVES[objective]

    @property
    def metric_name(self) -> str:
        return self.fns.metric_name

    @property
    def higher_is_better(self) -> bool:
        return self.fns.higher_is_better

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The gradient of the outer objective on ``batch``, keyed like ``named_parameters()``,
        and scalar training metrics (``loss`` and the objective's metric)."""
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


def has_conv_or_norm(model: nn.Module) -> bool:
    kinds = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    return any(isinstance(m, kinds) for m in model.modules())


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_channels_last(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every 4-D tensor (conv weights ``[out, in, kh, kw]``, images ``[batch, C, H, W]``) in the
    channels-last memory format; a differentiable copy where the layout changes, else the same
    tensor. Values, and so results, are unchanged."""
    return {k: _channels_last(t) if t.dim() == 4 else t for k, t in tensors.items()}


def _channels_last(t: Tensor) -> Tensor:
    """``t`` (4-D) with channels-last strides. With one channel (Omniglot's images) the two layouts
    hold the same memory and ``contiguous(memory_format=channels_last)`` keeps the NCHW strides,
    which torch reads as NCHW: the first block's convolution, BatchNorm and max-pool then run in
    the slow NCHW kernels (max-pool 12x slower at Omniglot's size). Explicit channels-last strides
    (a copy) keep the whole network channels-last."""
    if t.size(1) == 1 and t.stride(1) != 1:
        return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
    return t.contiguous(memory_format=torch.channels_last)


class GradientBased(Algorithm):
    """Shared machinery of learners that adapt by gradient steps on the support set.

    Args:
        model: the network whose initial parameters are meta-learned.
        objective: ``regression`` or ``classification``.
        inner_lr: the inner learning rate (initial value when learned).
        inner_steps: inner gradient steps during meta-training.
        lr_mode: ``fixed``, or learned ``scalar`` / ``per_tensor`` / ``per_element`` (Meta-SGD).
        adapt: which parameters adapt: ``all`` or glob patterns (``head.*`` = ANIL).
        vectorize: run a meta-batch under ``vmap`` over tasks, as a per-task ``loop``, or
            ``auto``: ``vmap`` for models without convolutions or normalisation layers (small
            models are dominated by per-op overhead, and vectorising wins), ``loop`` otherwise
            (on CPU the per-task loop of convolutions is faster, and ``vmap`` through BatchNorm
            gives a wrong second-order gradient in torch 2.13). Both give the same gradient.
        weight_decay: inner weight decay ``wd``, each inner step ``p - lr * (g + wd * p)``
            (initial value when learned; 0 and ``fixed``: none).
        wd_mode: ``fixed``, or learned ``scalar`` / ``per_tensor`` / ``per_element``, like ``lr_mode``.
        memory_format: layout of the per-task loop's images and conv weights: ``channels_last``,
            ``contiguous`` (NCHW), or ``auto``: channels-last for models with a 2-D convolution
            (faster on CPU for conv-4; measured in ``benchmarks/speed``). The values, and so the
            meta-gradient, are the same either way; returned gradients may be channels-last strided.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        lr_mode: LRMode = "fixed",
        adapt: str | list[str] = "all",
        vectorize: Vectorize = "auto",
        weight_decay: float = 0.0,
        wd_mode: LRMode = "fixed",
        memory_format: MemoryFormat = "auto",
    ) -> None:
        super().__init__(model, objective)
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an integer >= 1, got {inner_steps!r}.")
        if vectorize not in VECTORIZE:
            raise ValueError(f"unknown vectorize {vectorize!r}; choose one of {VECTORIZE}.")
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"unknown memory_format {memory_format!r}; choose one of {MEMORY_FORMATS}.")
        self.memory_format = memory_format
        names = [n for n, _ in model.named_parameters()]
        self.adapt_names = select(names, adapt)
        params = dict(model.named_parameters())
        self.inner_lr = InnerLR({n: params[n] for n in self.adapt_names}, inner_lr, lr_mode)
        self.inner_wd = InnerWeightDecay({n: params[n] for n in self.adapt_names}, weight_decay, wd_mode)
        self.inner_steps = inner_steps
        self.vectorize = vectorize
        self._loss = model_loss(model, self.fns.loss)

    # -- functional views -------------------------------------------------------------------
    def params(self) -> Params:
        """The model's parameters as a name -> tensor dict (the live meta-parameters)."""
        return dict(self.model.named_parameters())

    def buffers_dict(self) -> Params:
        return dict(self.model.named_buffers())

    @property
    def channels_last(self) -> bool:
        """Whether the per-task loop runs in the channels-last layout (see ``memory_format``)."""
        if self.memory_format == "auto":
            return has_conv2d(self.model)
        return self.memory_format == "channels_last"

    def layout_params(self, params: Params) -> Params:
        """``params`` in the per-task loop's memory format (unchanged for ``contiguous``)."""
        return to_channels_last(params) if self.channels_last else params

    def layout_task(self, task: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """One task's tensors ``(support_x, support_y, query_x, query_y)`` in the loop's memory format."""
        if not self.channels_last:
            return task
        laid = to_channels_last({str(i): t for i, t in enumerate(task)})
        return tuple(laid[str(i)] for i in range(len(task)))

    def use_vmap(self, second_order: bool) -> bool:
        if self.vectorize == "loop":
            return False
        if self.vectorize == "vmap":
            if second_order and has_batchnorm(self.model):
                raise ValueError(
                    "vectorize='vmap' with BatchNorm and a second-order meta-gradient gives a wrong "
                    "gradient in torch (vmap over grad through batch_norm); use vectorize='loop' "
                    "or 'auto', or first_order=True."
                )
            return True
        return not has_conv_or_norm(self.model)

    def _predict(self, params: Params, buffers: Params, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, (params, buffers), (x,))

    def eval_trajectory(
        self, params: Params, buffers: Params, rates: Params, support_x: Tensor, support_y: Tensor, steps: int
    ) -> Iterator[Params]:
        """The test-time inner loop of one task: parameters after 1..``steps`` steps, no outer graph.
        Algorithms with another inner loop (Reptile's Adam, iMAML's proximal steps) override this."""
        return adapt_trajectory(
            self._loss, params, buffers, support_x, support_y, steps=steps,
            lr=self.inner_lr.as_dict(rates), adapt_names=self.adapt_names, first_order=True,
            weight_decay=self.inner_wd.as_dict({k: v.detach() for k, v in self.inner_wd.rates.items()}),
        )

    def trajectory_scores(
        self, params: Params, buffers: Params, rates: Params, task: tuple[Tensor, ...], steps: int
    ) -> Tensor:
        """``[2, steps + 1]``: query (loss, metric) of one task after 0..steps inner steps."""
        sx, sy, qx, qy = task

        def score(p: Params) -> Tensor:
            pred = self._predict(p, buffers, qx)
            return torch.stack([self.fns.loss(pred, qy), self.fns.metric(pred, qy)])

        trajectory = self.eval_trajectory(params, buffers, rates, sx, sy, steps)
        return torch.stack([score(params)] + [score(p) for p in trajectory], dim=-1)

    def evaluate(self, batch: TaskBatch, steps: int, chunk: int = 200) -> dict[str, Tensor]:
        """Fine-tune on each task's support set with the inner update rule (no meta-graph) and
        score the query set after 0..``steps`` steps. See :meth:`Algorithm.evaluate`."""
        if steps < 0:
            raise ValueError(f"evaluation steps must be >= 0, got {steps}.")
        params = {n: p.detach() for n, p in self.params().items()}
        rates = {k: v.detach() for k, v in self.inner_lr.rates.items()}
        buffers = self.buffers_dict()
        tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        with torch.no_grad():
            if self.use_vmap(second_order=False):
                def one(*task: Tensor) -> Tensor:
                    return self.trajectory_scores(params, buffers, rates, task, steps)

                parts = [
                    vmap(one)(*(t[i : i + chunk] for t in tensors))
                    for i in range(0, len(batch), chunk)
                ]
                out = torch.cat(parts)
            else:
                laid = self.layout_params(params)
                tasks = (self.layout_task(tuple(t[i] for t in tensors)) for i in range(len(batch)))
                out = torch.stack([self.trajectory_scores(laid, buffers, rates, task, steps) for task in tasks])
        return {"loss": out[:, 0], self.metric_name: out[:, 1]}

    def _grads(self, loss: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        grads = torch.autograd.grad(loss, list(targets.values()), allow_unused=True)
        return {
            n: torch.zeros_like(t) if g is None else g
            for (n, t), g in zip(targets.items(), grads, strict=True)
        }
