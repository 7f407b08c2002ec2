"""Helpers shared by the backbone tests (imported by ``test_resnet.py`` and ``test_wrn.py``): a small
image meta-batch and one meta-gradient of any registered algorithm through a backbone."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from innerloop.algorithms import ALGORITHMS
from innerloop.tasks import TaskBatch

WAYS, TRAIN_CLASSES = 3, 6


def image_batch(tasks: int = 2, ways: int = WAYS, shots: int = 1, queries: int = 2, size: int = 16,
                channels: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0) -> TaskBatch:
    """``tasks`` random ``ways``-way tasks of ``channels x size x size`` images (labels < ``ways``)."""
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.rand(tasks, ways * shots, channels, size, size, generator=g, dtype=dtype),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone(),
        torch.rand(tasks, ways * queries, channels, size, size, generator=g, dtype=dtype),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone(),
    )


def head_outputs(name: str) -> int:
    """The head size algorithm ``name`` needs on :func:`image_batch` tasks (0: an embedding network)."""
    head = ALGORITHMS[name].capabilities.head
    return 0 if head == "none" else TRAIN_CLASSES if head == "train_classes" else WAYS


def one_meta_gradient(name: str, build: Callable[[int], nn.Module]) -> None:
    """One meta-gradient and one evaluation of algorithm ``name`` with ``build(head outputs)``: every
    trainable parameter gets a finite gradient, some of them non-zero."""
    torch.manual_seed(0)
    model = build(head_outputs(name))
    entry = ALGORITHMS[name]
    options = entry.options({"inner_steps": 1} if "inner_steps" in entry.option_names() else {})
    algorithm = entry.build(model, "classification", options)
    grads, metrics = algorithm.meta_gradient(image_batch())
    trainable = {n for n, p in algorithm.named_parameters() if p.requires_grad}
    assert trainable <= set(grads), sorted(trainable - set(grads))
    assert all(bool(torch.isfinite(g).all()) for g in grads.values()), name
    assert any(float(g.abs().sum()) > 0 for g in grads.values()), f"{name}: every gradient is zero"
    assert all(v == v for v in metrics.values()), metrics
    scores = algorithm.evaluate(image_batch(seed=1), 1)
    assert all(bool(torch.isfinite(v).all()) for v in scores.values()), name
