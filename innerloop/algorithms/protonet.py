"""Prototypical Networks (Snell et al. 2017).

An embedding network maps each example to a vector; the prototype of a class is the mean
embedding of its support examples; a query's logits are the negative squared Euclidean
distances to the prototypes. Nothing adapts per task by gradient: "adaptation" is computing
the prototypes, so the metric after k steps is the same for every k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from innerloop.algorithms.base import Algorithm
from innerloop.tasks import TaskBatch


def prototypes(support: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Class means: ``support [n, d]``, ``labels [n]`` in 0..ways-1 -> ``[ways, d]``."""
    sums = torch.zeros(ways, support.shape[-1], dtype=support.dtype, device=support.device)
    sums = sums.index_add(0, labels, support)
    counts = torch.bincount(labels, minlength=ways).to(support.dtype).clamp_min(1)
    return sums / counts[:, None]


def proto_logits(query: Tensor, protos: Tensor) -> Tensor:
    """``-||q - c||^2``: ``query [m, d]``, ``protos [ways, d]`` -> ``[m, ways]``."""
    return -torch.cdist(query, protos).pow(2)


class ProtoNet(Algorithm):
    """Prototypical Networks with squared Euclidean distance.

    Args:
        model: the embedding network, ``[batch, *input] -> [batch, d]`` (e.g. ``Conv4(ways=0)``).
    """

    name = "protonet"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, "classification")

    def task_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Logits ``[query, ways]`` of one task; support and query are embedded in one pass,
        so BatchNorm sees the whole episode, as in the paper's code."""
        ways = int(support_y.max()) + 1
        z = self.model(torch.cat([support_x, query_x]))
        zs, zq = z[: len(support_x)], z[len(support_x) :]
        return proto_logits(zq, prototypes(zs, support_y, ways))

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        targets = dict(self.named_parameters())
        grads = {k: torch.zeros_like(v) for k, v in targets.items()}
        loss_sum = acc_sum = 0.0
        n = len(batch)
        for i in range(n):
            logits = self.task_logits(batch.support_x[i], batch.support_y[i], batch.query_x[i])
            loss = F.cross_entropy(logits, batch.query_y[i])
            for k, g in zip(targets, torch.autograd.grad(loss / n, list(targets.values())), strict=True):
                grads[k] += g
            loss_sum += float(loss.detach())
            acc_sum += float(self.fns.metric(logits.detach(), batch.query_y[i]))
        return grads, {"loss": loss_sum / n, self.metric_name: acc_sum / n}

    def evaluate(self, batch: TaskBatch, steps: int) -> dict[str, Tensor]:
        with torch.no_grad():
            scores = []
            for i in range(len(batch)):
                logits = self.task_logits(batch.support_x[i], batch.support_y[i], batch.query_x[i])
                scores.append(torch.stack([F.cross_entropy(logits, batch.query_y[i]),
                                           self.fns.metric(logits, batch.query_y[i])]))
            out = torch.stack(scores)  # [tasks, 2]
        per_step = out[:, :, None].expand(-1, -1, steps + 1)
        return {"loss": per_step[:, 0], self.metric_name: per_step[:, 1]}
