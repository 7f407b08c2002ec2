"""Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang 2019, "A Closer Look at Few-shot
Classification"): pre-train a classifier on all meta-training classes, then fit a new head on
each test task's support set with the body frozen.

Pre-training needs a global label space, but few-shot episodes re-label their classes
``0..N-1`` per task. So the algorithm trains on another view of the same data: its
:meth:`Baseline.training_family` wraps the few-shot family into :class:`GlobalLabelBatches`,
ordinary batches of images drawn from the family's ``splits["train"]`` dataset with their
global class index as the label. The training loop is unchanged (it asks the algorithm for the
family to train on); validation and testing use the few-shot episodes as for every algorithm.

* Baseline: the model's ``head`` is a linear layer over all training classes; at test time a
  new linear head (``ways`` outputs) is fitted on the frozen features of the support set.
* Baseline++: the head is a cosine classifier, ``logits_c = s * cos(w_c, z)`` (no bias), in
  pre-training and at test time; ``s`` is a fixed scale (Chen et al. use 2 for features of at
  most 200 dimensions, else 10).

At test time the new head starts from a fixed random draw (``nn.Linear``'s uniform init, the
same for every task) and takes ``steps`` full-batch gradient steps of size ``lr`` on the support
cross-entropy; the query metric is reported after 0..steps steps. Chen et al. fine-tune with
100 mini-batch SGD steps with momentum and weight decay; full-batch steps make the result a
deterministic function of the task. Support and query are embedded in one pass, so BatchNorm
with batch statistics sees the whole episode, as for ProtoNets and MAML.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from innerloop.adapt import sgd, unroll
from innerloop.algorithms.base import Algorithm, AlgorithmOptions, Capabilities, ObjectiveFns, check, scores
from innerloop.data.augment import Augment, AugmentedFamily
from innerloop.data.global_labels import GlobalLabelBatches
from innerloop.execution import Execution, TaskTensors, map_tasks, pooled_gradient
from innerloop.tasks import Objective, TaskBatch, TaskFamily

Head = Literal["linear", "cosine"]


def cosine_logits(z: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``scale * cos(w_c, z)``: features ``z [n, d]``, class weights ``weight [ways, d]`` -> ``[n, ways]``."""
    return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).T


@dataclass(frozen=True)
class BaselineOptions(AlgorithmOptions):
    inner_lr: float = 0.01
    """Step size of the test-time head fitting (full-batch gradient steps on the support set)."""
    inner_steps: int = 1
    """Head-fitting steps of validation (testing reports 0..``eval.steps``)."""

    aliases: ClassVar[dict[str, str]] = {"fit_lr": "inner_lr"}

    def check(self) -> None:
        check(isinstance(self.inner_lr, int | float) and 0 < self.inner_lr < float("inf"), "inner_lr",
              self.inner_lr, "must be > 0 (and finite)")
        steps = self.inner_steps
        check(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
              "inner_steps", self.inner_steps, "steps must be >= 1 (an integer)")


@dataclass(frozen=True)
class BaselinePPOptions(BaselineOptions):
    cosine_scale: float = 10.0
    """The fixed scale ``s`` of the cosine classifier ``s * cos(w_c, z)`` (Chen et al.: 2 for features
    of at most 200 dimensions, else 10)."""

    aliases: ClassVar[dict[str, str]] = {"fit_lr": "inner_lr", "scale": "cosine_scale"}

    def check(self) -> None:
        super().check()
        check(isinstance(self.cosine_scale, int | float) and self.cosine_scale > 0, "cosine_scale",
              self.cosine_scale, "must be > 0")


class Baseline(Algorithm):
    """Pre-train on all training classes; fit a new linear head per test task on the frozen features.
    Options: :class:`BaselineOptions`.

    Args:
        model: a network with a body ``features`` (``[batch, *input] -> [batch, d]``) and a linear
            ``head`` with one output per training class (``Conv4(ways=<training classes>)``; the run
            builder sizes it from the family).
    """

    name = "baseline"
    Options = BaselineOptions
    capabilities = Capabilities(objectives=("classification",), head="train_classes", any_test_ways=True)
    head_kind: ClassVar[Head] = "linear"

    def __init__(self, model: nn.Module, objective: Objective | ObjectiveFns = "classification",
                 options: BaselineOptions | None = None, execution: Execution | None = None,
                 **overrides: Any) -> None:
        super().__init__(model, objective, options, execution, **overrides)
        body, top = getattr(model, "features", None), getattr(model, "head", None)
        if not isinstance(body, nn.Module) or not isinstance(top, nn.Linear):
            names = [n for n, _ in model.named_children()]
            raise ValueError(
                f"the Baseline needs a model with a body `features` and a linear `head` over the training "
                f"classes; this model's children are {names}. Use innerloop.models.Conv4(ways=<training classes>)."
            )

    def body(self, x: Tensor, model: nn.Module | None = None) -> Tensor:
        """The features ``[batch, *input] -> [batch, d]`` of ``model`` (default: this one's), a
        functional call under the BatchNorm policy."""
        model = model or self.model
        params: dict[str, Tensor] = {k[9:]: v for k, v in model.named_parameters() if k.startswith("features.")}
        buffers = {k[9:]: v for k, v in self.buffers_dict().items() if k.startswith("features.")}
        out: Tensor = torch.func.functional_call(model.get_submodule("features"), (params, buffers), (x,))
        return out

    @property
    def head(self) -> nn.Linear:
        """The pre-training head over all training classes."""
        head = self.model.get_submodule("head")
        assert isinstance(head, nn.Linear)
        return head

    @property
    def fit_lr(self) -> float:
        return float(self.options.inner_lr)

    @property
    def scale(self) -> float:
        return float(getattr(self.options, "cosine_scale", 1.0))

    # -- pre-training ---------------------------------------------------------------------------
    def training_family(self, family: TaskFamily) -> TaskFamily:
        """:class:`GlobalLabelBatches` over ``family.splits``, with as many images per batch as a
        training episode of ``family`` has (``ways * (shots + queries)``), augmented as ``family``'s
        meta-training tasks are (``task.augment``: rotation classes become new global classes)."""
        splits = getattr(family, "splits", None)
        if not isinstance(splits, Mapping) or "train" not in splits:
            raise ValueError(
                f"{self.name} pre-trains on the classes of a train split with global labels, but the family "
                f"{family!r} exposes no `splits['train']` dataset; use a few-shot image family "
                "(omniglot, miniimagenet, image-folder)."
            )
        examples = getattr(family, "ways", 5) * (getattr(family, "shots", 1) + getattr(family, "queries", 15))
        return GlobalLabelBatches(splits, max(2, examples), getattr(family, "seed", 0), training_augment(family))

    def logits(self, x: Tensor) -> Tensor:
        """Pre-training logits over all training classes: ``[batch, *input] -> [batch, classes]``."""
        z = self.body(x)
        if self.head_kind == "linear":
            out: Tensor = self.head(z)
            return out
        return cosine_logits(z, self.head.weight, self.scale)

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Gradient of the cross-entropy of every image of ``batch`` (support and query pooled:
        ``[tasks, examples, ...]`` -> ``[tasks * examples, ...]``) against its global label."""
        classes = self.head.out_features
        if int(batch.support_y.max()) >= classes or int(batch.query_y.max()) >= classes:
            top = max(int(batch.support_y.max()), int(batch.query_y.max()))
            raise ValueError(f"label {top} but the head has {classes} classes; size the head to the "
                             "training split's number of classes (the batches must come from training_family).")

        def pooled(b: TaskBatch) -> tuple[Tensor, Tensor]:
            x = torch.cat([b.support_x, b.query_x], dim=1).flatten(0, 1)
            y = torch.cat([b.support_y, b.query_y], dim=1).flatten(0, 1)
            logits = self.logits(x)
            self.norm.record(self.model, dict(self.model.named_parameters()), x)  # batch_norm="running"
            loss = self.fns.loss(logits, y)
            return loss, torch.stack([loss.detach(), self.fns.metric(logits.detach(), y)])

        # Baseline++ leaves the head's bias unused: zero gradient (grads_of)
        grads, aux = pooled_gradient(pooled, dict(self.model.named_parameters()), batch, self.trainable(),
                                     self.execution)
        self.commit_statistics()
        return grads, {"loss": float(aux[0]), "accuracy": float(aux[1])}

    # -- test time -------------------------------------------------------------------------------
    def initial_head(self, ways: int, dim: int, like: Tensor) -> dict[str, Tensor]:
        """The new head every task starts from: ``weight [ways, dim]`` (and ``bias [ways]`` for
        ``linear``) drawn as ``nn.Linear`` does, U(-1/sqrt(dim), 1/sqrt(dim)), from a fixed seed."""
        g = torch.Generator().manual_seed(0)
        bound = 1 / math.sqrt(dim)
        head = {"weight": (torch.rand(ways, dim, generator=g, dtype=torch.float64, device="cpu") * 2 - 1) * bound}
        if self.head_kind == "linear":
            head["bias"] = (torch.rand(ways, generator=g, dtype=torch.float64, device="cpu") * 2 - 1) * bound
        return {k: v.to(like) for k, v in head.items()}

    def head_logits(self, head: Mapping[str, Tensor], z: Tensor) -> Tensor:
        """Logits ``[n, ways]`` of the fitted head on features ``z [n, d]``."""
        if self.head_kind == "linear":
            return F.linear(z, head["weight"], head["bias"])
        return cosine_logits(z, head["weight"], self.scale)

    def fit_scores(self, model: nn.Module, task: TaskTensors, steps: int) -> Tensor:
        """``[2, steps + 1]``: query (loss, accuracy) of one task after 0..``steps`` steps of fitting
        a new head on the frozen support features (full-batch gradient steps of ``inner_lr``)."""
        sx, sy, qx, qy = task
        z = self.body(torch.cat([sx, qx]), model)
        zs, zq = z[: len(sx)], z[len(sx) :]
        head = self.initial_head(int(sy.max()) + 1, z.shape[-1], z)
        fitted = unroll(lambda h, _: self.fns.loss(self.head_logits(h, zs), sy), head, steps=steps,
                        rule=sgd(self.fit_lr), first_order=True)
        return torch.stack([scores(self.fns, self.head_logits(h, zq), qy) for h in [head, *fitted]], dim=-1)

    def evaluate(self, batch: TaskBatch, steps: int) -> dict[str, Tensor]:
        """Fit a new head on each task's support features (body frozen) for 0..``steps`` steps and
        score the query set after each. Returns ``{"loss", "accuracy"}``, each ``[tasks, steps + 1]``."""
        if steps < 0:
            raise ValueError(f"evaluation steps must be >= 0, got {steps}.")
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        result = map_tasks(lambda m, p, task: self.fit_scores(m, task, steps), self.model, params, batch,
                           dataclasses.replace(self.execution, vectorize="loop"))
        return {"loss": result[:, 0], "accuracy": result[:, 1]}


class BaselinePP(Baseline):
    """Baseline++: :class:`Baseline` with the cosine classifier ``s * cos(w_c, z)`` in pre-training
    and at test time. Options: :class:`BaselinePPOptions`."""

    name = "baselinepp"
    Options = BaselinePPOptions
    head_kind = "cosine"


def training_augment(family: Any) -> Augment | None:
    """The augmentation of ``family``'s meta-training tasks (an :class:`~innerloop.data.augment.AugmentedFamily`'s
    ``augment``), or None."""
    return family.augment if isinstance(family, AugmentedFamily) and "train" in family.augmented_splits else None


def train_classes(family: Any) -> int:
    """Number of classes of ``family.splits['train']`` (times 4 with rotation classes, :func:`training_augment`):
    the size of the Baseline's pre-training head."""
    splits = getattr(family, "splits", None)
    if not isinstance(splits, Mapping) or "train" not in splits:
        raise ValueError(
            f"the Baseline's head has one output per training class, but the family {family!r} exposes no "
            "`splits['train']` dataset; use a few-shot image family (omniglot, miniimagenet, image-folder)."
        )
    aug = training_augment(family)
    return int(splits["train"].num_classes) * (4 if aug is not None and aug.class_rotations else 1)
