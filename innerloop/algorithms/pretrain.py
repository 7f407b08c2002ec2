"""The transfer-learning baseline: pre-train one model on the pooled meta-training tasks, then
fine-tune it on each test task's support set.

Meta-training ignores the task structure: every support and query example of a meta-batch is
one example of a single supervised problem. At test time the model is fine-tuned with the same
inner update rule as MAML (same learning rate and steps), so the two differ only in how the
initialisation was learned. This is the "pretrained" row of the MAML paper's sinusoid table.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from innerloop.algorithms.base import GradientBased
from innerloop.tasks import Objective, TaskBatch


class Pretrain(GradientBased):
    """Pre-train on pooled tasks; fine-tune per task at test time.

    Args:
        model: the network.
        objective: ``regression`` or ``classification`` (for classification the pooled labels
            are per-task labels, so this baseline only makes sense with a global label space;
            the few-shot image baselines of later modules re-label by class).
        inner_lr: fine-tuning learning rate at test time.
        inner_steps: unused in training; kept for a uniform configuration.
        adapt: which parameters fine-tune (``all``, or e.g. ``head.*``).
    """

    name = "pretrain"

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        adapt: str | list[str] = "all",
    ) -> None:
        super().__init__(model, objective, inner_lr, inner_steps, "fixed", adapt, "auto")

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Gradient of the plain loss on every example of the batch, pooled.

        Shapes: ``[tasks, examples, ...]`` are flattened to ``[tasks * examples, ...]``.
        """
        x = torch.cat([batch.support_x, batch.query_x], dim=1).flatten(0, 1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1).flatten(0, 1)
        pred = self.model(x)
        loss = self.fns.loss(pred, y)
        grads = self._grads(loss, dict(self.named_parameters()))
        return grads, {"loss": float(loss.detach()), self.metric_name: float(self.fns.metric(pred.detach(), y))}
