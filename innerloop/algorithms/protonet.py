"""Prototypical Networks (Snell et al. 2017).

An embedding network maps each example to a vector; the prototype of a class is the mean
embedding of its support examples; a query's logits are the negative squared Euclidean
distances to the prototypes. Nothing adapts per task by gradient: "adaptation" is computing
the prototypes, so the metric after k steps is the same for every k.

At evaluation, ``transductive_steps > 0`` refines the prototypes with the task's unlabelled queries
by soft k-means (Ren et al. 2018, "Meta-Learning for Semi-Supervised Few-Shot Classification"):
each step assigns every query to the classes by the softmax of its logits and recomputes each
prototype as the mean of its support embeddings and the queries weighted by their assignment.
Validation, testing and prediction are refined; the meta-gradient uses the plain prototypes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from innerloop.adapt import Params
from innerloop.algorithms.base import Algorithm, AlgorithmOptions, Capabilities, ObjectiveFns, check, scores
from innerloop.execution import Execution, TaskTensors, map_tasks, meta_gradient
from innerloop.tasks import Objective, TaskBatch


def prototypes(support: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Class means: ``support [n, d]``, ``labels [n]`` in 0..ways-1 -> ``[ways, d]``."""
    sums = torch.zeros(ways, support.shape[-1], dtype=support.dtype, device=support.device)
    sums = sums.index_add(0, labels, support)
    counts = torch.bincount(labels, minlength=ways).to(support.dtype).clamp_min(1)
    return sums / counts[:, None]


def proto_logits(query: Tensor, protos: Tensor) -> Tensor:
    """``-||q - c||^2``: ``query [m, d]``, ``protos [ways, d]`` -> ``[m, ways]``."""
    return -torch.cdist(query, protos).pow(2)


def refine_prototypes(protos: Tensor, support: Tensor, labels: Tensor, query: Tensor, steps: int) -> Tensor:
    """Soft k-means refinement of ``protos [ways, d]`` with the unlabelled ``query [m, d]`` (Ren et al. 2018):
    ``steps`` times, ``w = softmax(-||q - c||^2)`` over classes (``[m, ways]``) and
    ``c_k = (sum of class k's support [n, d] + sum_j w_jk q_j) / (n_k + sum_j w_jk)``.
    ``steps = 0``: ``protos`` unchanged."""
    ways = protos.shape[0]
    sums = torch.zeros_like(protos).index_add(0, labels, support)
    counts = torch.bincount(labels, minlength=ways).to(protos.dtype)
    for _ in range(steps):
        w = torch.softmax(proto_logits(query, protos), dim=-1)  # [m, ways]
        protos = (sums + w.T @ query) / (counts + w.sum(0)).clamp_min(1e-12)[:, None]
    return protos


@dataclass(frozen=True)
class ProtoNetOptions(AlgorithmOptions):
    transductive_steps: int = 0
    """Evaluation (validation, test, prediction): soft k-means steps that refine the prototypes with the task's
    queries (Ren et al. 2018; transductive: each query's prediction depends on the other queries); the
    meta-gradient always uses the plain prototypes, so the option is no part of a run's identity. 0: the
    plain prototypes."""

    def check(self) -> None:
        super().check()
        check(isinstance(self.transductive_steps, int) and not isinstance(self.transductive_steps, bool)
              and self.transductive_steps >= 0, "transductive_steps", self.transductive_steps,
              "give the refinement steps, an integer >= 0 (0: off)")


class ProtoNet(Algorithm):
    """Prototypical Networks with squared Euclidean distance.

    Args:
        model: the embedding network, ``[batch, *input] -> [batch, d]`` (e.g. ``Conv4(ways=0)``).
    """

    name = "protonet"
    Options: ClassVar[type[AlgorithmOptions]] = ProtoNetOptions
    capabilities = Capabilities(objectives=("classification",), head="none", any_test_ways=True,
                                more_train_ways=True)

    def __init__(self, model: nn.Module, objective: Objective | ObjectiveFns = "classification",
                 options: AlgorithmOptions | None = None, execution: Execution | None = None,
                 **overrides: Any) -> None:
        super().__init__(model, objective, options, execution, **overrides)
        # prototypes need the number of ways of each task (a data-dependent size): a loop, never vmap
        self.execution = dataclasses.replace(self.execution, vectorize="loop")

    def embed(self, model: nn.Module, params: Params, x: Tensor) -> Tensor:
        """``[n, *input] -> [n, d]`` through ``model`` called with ``params`` and the model's buffers."""
        out: Tensor = functional_call(model, (params, self.buffers_dict()), (x,))
        return out

    def task_logits(self, model: nn.Module, params: Params, support_x: Tensor, support_y: Tensor,
                    query_x: Tensor) -> Tensor:
        """Logits ``[query, ways]`` of one task; support and query are embedded in one pass,
        so BatchNorm sees the whole episode, as in the paper's code."""
        return self.refined_logits(model, params, support_x, support_y, query_x, 0)

    def refined_logits(self, model: nn.Module, params: Params, support_x: Tensor, support_y: Tensor,
                       query_x: Tensor, steps: int) -> Tensor:
        """:meth:`task_logits` with the prototypes refined by ``steps`` soft k-means steps on the queries
        (:func:`refine_prototypes`)."""
        ways = int(support_y.max()) + 1
        z = self.embed(model, params, torch.cat([support_x, query_x]))
        zs, zq = z[: len(support_x)], z[len(support_x) :]
        protos = prototypes(zs, support_y, ways)
        if steps:
            protos = refine_prototypes(protos, zs, support_y, zq, steps)
        return proto_logits(zq, protos)

    def task_loss(self, model: nn.Module, params: Params, task: TaskTensors,
                  record: bool = True) -> tuple[Tensor, Tensor]:
        """Query cross-entropy of one task and its detached ``[loss, accuracy]``; ``record``: feed the
        episode's statistics to ``batch_norm = "running"`` (meta-training only)."""
        sx, sy, qx, qy = task
        # meta-training (record) uses the plain prototypes; MatchingNet and MetaOptNet have no such option
        refine = 0 if record else getattr(self.options, "transductive_steps", 0)
        logits = (self.refined_logits(model, params, sx, sy, qx, refine) if refine
                  else self.task_logits(model, params, sx, sy, qx))
        if record:
            self.norm.record(model, params, torch.cat([sx, qx]))
        return self.fns.loss(logits, qy), scores(self.fns, logits, qy)

    def meta_gradient(self, batch: TaskBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Mean query cross-entropy over tasks, differentiated w.r.t. the embedding's parameters."""
        grads, aux = meta_gradient(self.task_loss, self.model, dict(self.model.named_parameters()), batch,
                                   self.trainable(), self.execution, second_order=False, stateful=self.stateful)
        self.commit_statistics()
        return grads, {"loss": float(aux[0]), self.metric_name: float(aux[1])}

    def evaluate(self, batch: TaskBatch, steps: int) -> dict[str, Tensor]:
        """Nothing adapts: the query (loss, accuracy) of each task, the same after every step count."""
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        out = map_tasks(lambda m, p, task: self.task_loss(m, p, task, record=False)[1], self.model, params, batch,
                        self.execution)  # [tasks, 2]
        per_step = out[:, :, None].expand(-1, -1, steps + 1)
        return {"loss": per_step[:, 0], self.metric_name: per_step[:, 1]}
