"""Training for continual meta-learning on the one run skeleton (:func:`innerloop.training.loop.run_loop`).

:func:`meta_train_continual` takes one Adam step per outer step on the meta-gradient of an
:class:`~innerloop.continual.learners.OML` / :class:`~innerloop.continual.learners.ANML` learner on
batch ``t`` of a :class:`~innerloop.continual.family.ContinualClasses`; :func:`pretrain_continual`
is the non-meta-learned baseline: the same network trained by plain minibatch SGD with
cross-entropy on i.i.d. images of all meta-training classes. Both checkpoint and resume exactly
(batch ``t`` and the reset rows of step ``t`` are pure functions of the seed and ``t``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from innerloop.continual.family import ContinualClasses, seeded
from innerloop.continual.learners import ContinualLearner
from innerloop.data.images import ImageClassDataset
from innerloop.training.loop import Schedule, TrainResult, run_loop

__all__ = ["meta_train_continual", "pretrain_continual"]


def _check(iterations: int, lr: float) -> None:
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}.")
    if not 0 < lr < float("inf"):
        raise ValueError(f"the learning rate must be > 0 (and finite), got {lr}.")


def meta_train_continual(
    learner: ContinualLearner, family: ContinualClasses, *, iterations: int, meta_lr: float = 1e-3,
    run_dir: str | Path | None = None, checkpoint_every: int | None = 50, log_every: int = 10,
    resume: bool = True, progress: bool = True, identity: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Meta-train ``learner`` for ``iterations`` outer steps (Adam, rate ``meta_lr``; the papers' outer
    optimiser) on batches ``0..iterations - 1`` of ``family``.

    ``identity``: what must match for ``run_dir/last.pt`` to be resumed (default: the learner's
    options, the family's settings and ``meta_lr``). The iteration count is not part of it, so a run
    can be continued to more iterations (``--minutes`` budgets do this).
    """
    _check(iterations, meta_lr)
    optimizer = torch.optim.Adam(learner.parameters(), lr=meta_lr)
    trainable = learner.trainable()
    who = dict(identity) if identity is not None else {
        "algorithm": learner.name, "options": repr(learner.options), "meta_lr": meta_lr,
        "family": {"classes": family.num_classes, "trajectory_classes": family.trajectory_classes,
                   "shots": family.shots, "remember": family.remember, "tasks": family.tasks, "seed": family.seed},
    }

    def outer_step(step: int) -> dict[str, float]:
        learner.set_progress(step, iterations)
        grads, metrics = learner.meta_gradient(family.batch(step))
        optimizer.zero_grad(set_to_none=True)
        for name, p in trainable.items():
            p.grad = grads[name]
        optimizer.step()
        return metrics

    schedule = Schedule(iterations, log_every=log_every, checkpoint_every=checkpoint_every)
    return run_loop(learner, outer_step, schedule, run_dir, name=learner.name, optimizer=optimizer, identity=who,
                    tasks_per_step=family.tasks, resume=resume, progress=progress,
                    desc=f"meta-train {learner.name}")


def pretrain_continual(
    model: nn.Module, dataset: ImageClassDataset, *, iterations: int, lr: float = 0.01, momentum: float = 0.9,
    batch_size: int = 64, seed: int = 0, run_dir: str | Path | None = None, checkpoint_every: int | None = 200,
    log_every: int = 50,
    resume: bool = True, progress: bool = True,
) -> TrainResult:
    """The non-meta-learned baseline: every parameter of ``model`` trained by SGD (rate ``lr``,
    ``momentum``) on minibatches of ``batch_size`` images drawn uniformly from all classes of
    ``dataset`` (minibatch ``t`` depends on ``(seed, t)`` only); labels are class indices.

    Args:
        model: ``[n, C, H, W] -> [n, classes]`` with ``classes >= dataset.num_classes``.
    """
    _check(iterations, lr)
    if batch_size < 1 or not 0 <= momentum < 1:
        raise ValueError(f"need batch_size >= 1 and 0 <= momentum < 1, got {batch_size} and {momentum}.")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)

    def outer_step(step: int) -> dict[str, float]:
        g = seeded(seed, step)
        cls = torch.randint(dataset.num_classes, (batch_size,), generator=g)
        img = (torch.rand(batch_size, generator=g) * dataset.counts[cls]).long()
        device = next(model.parameters()).device
        x, y = dataset.gather(cls, img).to(device), cls.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return {"loss": float(loss.detach()), "accuracy": float((logits.argmax(-1) == y).float().mean())}

    who = {"algorithm": "pretrain", "lr": lr, "momentum": momentum, "batch_size": batch_size, "seed": seed,
           "classes": dataset.num_classes}
    schedule = Schedule(iterations, log_every=log_every, checkpoint_every=checkpoint_every)
    return run_loop(model, outer_step, schedule, run_dir, name="pretrain", optimizer=optimizer, identity=who,
                    tasks_per_step=batch_size, resume=resume, progress=progress, desc="pretrain")
