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

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

from innerloop.algorithms.base import Algorithm
from innerloop.data.images import ImageClassDataset
from innerloop.tasks import Split, Task, TaskBatch, TaskFamily, check_split, task_seed

Head = Literal["linear", "cosine"]


class GlobalLabelBatches:
    """Ordinary supervised batches with global class labels, as a task family.

    "Task" ``i`` of a split is ``examples`` distinct images drawn uniformly from all images of
    ``splits[split]`` (a deterministic function of ``(seed, split, i)``), labelled with their class
    index in that dataset; the first half is the support, the rest the query (both are training
    data here). A meta-batch of such tasks is one batch of ``tasks * examples`` images.

    Args:
        splits: ``{split: ImageClassDataset}``, e.g. ``FewShotClassification.splits``.
        examples: images per task (>= 2).
        seed: the family seed.
    """

    objective = "classification"

    def __init__(self, splits: Mapping[str, ImageClassDataset], examples: int, seed: int = 0) -> None:
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 2:
            raise ValueError(f"examples per batch must be an integer >= 2, got {examples!r}.")
        self.splits, self.examples, self.seed = dict(splits), examples, int(seed)

    def num_classes(self, split: Split = "train") -> int:
        return self._dataset(split).num_classes

    def _dataset(self, split: str) -> ImageClassDataset:
        check_split(split)
        if split not in self.splits:
            raise KeyError(f"no {split!r} split here; there is {', '.join(self.splits) or 'none'}.")
        return self.splits[split]

    def task(self, split: Split, index: int) -> Task:
        """``support_x [examples // 2, C, H, W]``, ``support_y [examples // 2]`` global labels
        (int64), ``query_x``/``query_y`` the other ``examples - examples // 2`` images."""
        ds = self._dataset(split)
        total = int(ds.counts.sum())
        if total < self.examples:
            raise ValueError(f"the {split} split has {total} images, fewer than the {self.examples} per batch.")
        g = torch.Generator().manual_seed(task_seed(self.seed, split, index, "GlobalLabelBatches"))
        flat = torch.randperm(total, generator=g)[: self.examples]
        ends = torch.cumsum(ds.counts, 0)
        classes = torch.bucketize(flat, ends, right=True)
        within = flat - (ends - ds.counts)[classes]
        x = ds.gather(classes, within)
        half = self.examples // 2
        return Task(x[:half], classes[:half], x[half:], classes[half:])

    def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch:
        return TaskBatch.stack([self.task(split, int(i)) for i in indices])

    def __repr__(self) -> str:
        return f"GlobalLabelBatches({self.examples} images per task, seed={self.seed}, classes: " + ", ".join(
            f"{s}={d.num_classes}" for s, d in self.splits.items()) + ")"


def cosine_logits(z: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``scale * cos(w_c, z)``: features ``z [n, d]``, class weights ``weight [ways, d]`` -> ``[n, ways]``."""
    return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).T


class Baseline(Algorithm):
    """Pre-train on all training classes; fit a new linear (Baseline) or cosine (Baseline++) head
    per test task on the frozen features.

    Args:
        model: a network with a body ``features`` (``[batch, *input] -> [batch, d]``) and a linear
            ``head`` with one output per training class (``run.build_model`` sizes it from the
            family; ``Conv4(ways=<training classes>)`` directly).
        head: ``linear`` (Baseline) or ``cosine`` (Baseline++).
        fit_lr: step size of the test-time head fitting (the number of steps is what
            :meth:`evaluate` is asked for: ``algorithm.inner_steps`` for validation, ``eval.steps``
            for testing).
        scale: ``s`` of the cosine classifier (``cosine`` only).
    """

    name = "baseline"

    def __init__(self, model: nn.Module, head: Head = "linear", fit_lr: float = 0.01, scale: float = 10.0) -> None:
        super().__init__(model, "classification")
        if head not in ("linear", "cosine"):
            raise ValueError(f"unknown head {head!r}; choose 'linear' (Baseline) or 'cosine' (Baseline++).")
        body, top = getattr(model, "features", None), getattr(model, "head", None)
        if not isinstance(body, nn.Module) or not isinstance(top, nn.Linear):
            names = [n for n, _ in model.named_children()]
            raise ValueError(
                f"the Baseline needs a model with a body `features` and a linear `head` over the training "
                f"classes; this model's children are {names}. Use innerloop.models.Conv4(ways=<training classes>)."
            )
        if not fit_lr > 0 or not scale > 0:
            raise ValueError(f"need fit_lr > 0 and scale > 0; got fit_lr={fit_lr}, scale={scale}.")
        self.head_kind: Head = head
        self.fit_lr, self.scale = float(fit_lr), float(scale)

    # -- pre-training ---------------------------------------------------------------------------
    def training_family(self, family: TaskFamily) -> TaskFamily:
        """:class:`GlobalLabelBatches` over ``family.splits``, with as many images per batch as a
        training episode of ``family`` has (``ways * (shots + queries)``)."""
        splits = getattr(family, "splits", None)
        if not isinstance(splits, Mapping) or "train" not in splits:
            raise ValueError(
                f"{self.name} pre-trains on the classes of a train split with global labels, but the family "
                f"{family!r} exposes no `splits['train']` dataset; use a few-shot image family "
                "(omniglot, miniimagenet, image-folder)."
            )
        examples = getattr(family, "ways", 5) * (getattr(family, "shots", 1) + getattr(family, "queries", 15))
        return GlobalLabelBatches(splits, max(2, examples), getattr(family, "seed", 0))

    def logits(self, x: Tensor) -> Tensor:
        """Pre-training logits over all training classes: ``[batch, *input] -> [batch, classes]``."""
        z = self.model.features(x)
        if self.head_kind == "linear":
            return self.model.head(z)
        return cosine_logits(z, self.model.head.weight, self.scale)

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Gradient of the cross-entropy of every image of ``batch`` (support and query pooled:
        ``[tasks, examples, ...]`` -> ``[tasks * examples, ...]``) against its global label."""
        x = torch.cat([batch.support_x, batch.query_x], dim=1).flatten(0, 1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1).flatten(0, 1)
        classes = self.model.head.out_features
        if int(y.max()) >= classes:
            raise ValueError(f"label {int(y.max())} but the head has {classes} classes; size the head to the "
                             "training split's number of classes (the batches must come from training_family).")
        logits = self.logits(x)
        loss = F.cross_entropy(logits, y)
        targets = dict(self.named_parameters())  # Baseline++ leaves the head's bias unused: zero gradient
        grads = torch.autograd.grad(loss, list(targets.values()), allow_unused=True)
        out = {n: torch.zeros_like(t) if g is None else g
               for (n, t), g in zip(targets.items(), grads, strict=True)}
        return out, {"loss": float(loss.detach()), "accuracy": float(self.fns.metric(logits.detach(), y))}

    # -- test time -------------------------------------------------------------------------------
    def initial_head(self, ways: int, dim: int, like: Tensor) -> dict[str, Tensor]:
        """The new head every task starts from: ``weight [ways, dim]`` (and ``bias [ways]`` for
        ``linear``) drawn as ``nn.Linear`` does, U(-1/sqrt(dim), 1/sqrt(dim)), from a fixed seed."""
        g = torch.Generator().manual_seed(0)
        bound = 1 / math.sqrt(dim)
        head = {"weight": (torch.rand(ways, dim, generator=g, dtype=torch.float64) * 2 - 1) * bound}
        if self.head_kind == "linear":
            head["bias"] = (torch.rand(ways, generator=g, dtype=torch.float64) * 2 - 1) * bound
        return {k: v.to(like) for k, v in head.items()}

    def head_logits(self, head: Mapping[str, Tensor], z: Tensor) -> Tensor:
        """Logits ``[n, ways]`` of the fitted head on features ``z [n, d]``."""
        if self.head_kind == "linear":
            return F.linear(z, head["weight"], head["bias"])
        return cosine_logits(z, head["weight"], self.scale)

    def evaluate(self, batch: TaskBatch, steps: int) -> dict[str, Tensor]:
        """Fit a new head on each task's support features (body frozen) for 0..``steps`` steps and
        score the query set after each. Returns ``{"loss", "accuracy"}``, each ``[tasks, steps + 1]``."""
        if steps < 0:
            raise ValueError(f"evaluation steps must be >= 0, got {steps}.")
        out = []
        for i in range(len(batch)):
            sx, sy, qx, qy = batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
            with torch.no_grad():
                z = self.model.features(torch.cat([sx, qx]))
            zs, zq = z[: len(sx)], z[len(sx) :]
            head = self.initial_head(int(sy.max()) + 1, z.shape[-1], z)

            def support_loss(h: dict[str, Tensor], zs: Tensor = zs, sy: Tensor = sy) -> Tensor:
                return F.cross_entropy(self.head_logits(h, zs), sy)

            scores = []
            for step in range(steps + 1):
                with torch.no_grad():
                    logits = self.head_logits(head, zq)
                    scores.append(torch.stack([F.cross_entropy(logits, qy), self.fns.metric(logits, qy)]))
                if step < steps:
                    g = grad(support_loss)(head)
                    head = {k: (v - self.fit_lr * g[k]).detach() for k, v in head.items()}
            out.append(torch.stack(scores, dim=-1))
        result = torch.stack(out)
        return {"loss": result[:, 0], "accuracy": result[:, 1]}

    def extra_repr(self) -> str:
        return f"head={self.head_kind}, fit_lr={self.fit_lr}, scale={self.scale}"


class BaselinePP(Baseline):
    """Baseline++: :class:`Baseline` with the cosine classifier ``s * cos(w_c, z)`` in pre-training
    and at test time. Arguments as :class:`Baseline` (without ``head``)."""

    name = "baselinepp"

    def __init__(self, model: nn.Module, fit_lr: float = 0.01, scale: float = 10.0) -> None:
        super().__init__(model, "cosine", fit_lr, scale)


def train_classes(family: Any) -> int:
    """Number of classes of ``family.splits['train']``: the size of the Baseline's pre-training head."""
    splits = getattr(family, "splits", None)
    if not isinstance(splits, Mapping) or "train" not in splits:
        raise ValueError(
            f"the Baseline's head has one output per training class, but the family {family!r} exposes no "
            "`splits['train']` dataset; use a few-shot image family (omniglot, miniimagenet, image-folder)."
        )
    return int(splits["train"].num_classes)
