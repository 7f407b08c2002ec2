"""The transfer-learning baseline: pre-train one model on the pooled meta-training tasks, then
fine-tune it on each test task's support set.

Meta-training ignores the task structure: every support and query example of a meta-batch is
one example of a single supervised problem. At test time the model is fine-tuned with the same
inner update rule as MAML (same learning rate and steps), so the two differ only in how the
initialisation was learned. This is the "pretrained" row of the MAML paper's sinusoid table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from innerloop.algorithms.base import GradientBased, GradientOptions, check_adapt
from innerloop.execution import pooled_gradient
from innerloop.tasks import TaskBatch


@dataclass(frozen=True)
class PretrainOptions(GradientOptions):
    """``inner_lr``: the fine-tuning learning rate at test time; ``inner_steps``: the fine-tuning
    steps of validation."""

    adapt: str | tuple[str, ...] = "all"
    """Which parameters fine-tune (``all``, or e.g. ``head.*``)."""

    def check(self) -> None:
        super().check()
        check_adapt(self)


class Pretrain(GradientBased):
    """Pre-train on pooled tasks; fine-tune per task at test time. Options: :class:`PretrainOptions`.

    For classification the pooled labels are per-task labels, so this baseline only makes sense
    with a global label space (the few-shot image baselines are ``baseline`` and ``baselinepp``).
    """

    name = "pretrain"
    Options = PretrainOptions

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Gradient of the plain loss on every example of the batch, pooled.

        Shapes: ``[tasks, examples, ...]`` are flattened to ``[tasks * examples, ...]``.
        """
        def pooled(b: TaskBatch) -> tuple[Tensor, Tensor]:
            x = torch.cat([b.support_x, b.query_x], dim=1).flatten(0, 1)
            y = torch.cat([b.support_y, b.query_y], dim=1).flatten(0, 1)
            pred = self.predict(self.model, self.params(), x)
            self.norm.record(self.model, self.params(), x)  # batch_norm="running"
            loss = self.fns.loss(pred, y)
            return loss, torch.stack([loss.detach(), self.fns.metric(pred.detach(), y)])

        grads, aux = pooled_gradient(pooled, self.params(), batch, self.trainable(), self.execution)
        self.commit_statistics()
        return grads, {"loss": float(aux[0]), self.metric_name: float(aux[1])}
