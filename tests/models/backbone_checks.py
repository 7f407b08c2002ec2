"""Helpers shared by the backbone tests (imported by ``test_resnet.py`` and ``test_wrn.py``): a small
image meta-batch, one meta-gradient of any registered algorithm through a backbone, and MAML's
meta-gradient compared between two executions (vmap / loop, checkpointed / stored; run in float64)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from innerloop.algorithms import ALGORITHMS, MAML
from innerloop.execution import Execution
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


def assert_first_order_vmap_equals_loop(build: Callable[[], nn.Module]) -> None:
    """First-order MAML through ``build()`` (3 ways, one inner step): vmap over tasks and the loop give
    the same meta-gradient (BatchNorm on batch statistics included). Run it in float64."""
    batch = image_batch(3, dtype=torch.float64)
    grads = {}
    for v in ("vmap", "loop"):
        torch.manual_seed(0)
        maml = MAML(build(), "classification", inner_lr=0.4, inner_steps=1, first_order=True, vectorize=v)
        grads[v], _ = maml.meta_gradient(batch)
    for k in grads["loop"]:
        torch.testing.assert_close(grads["vmap"][k], grads["loop"][k], rtol=1e-9, atol=1e-12)


def assert_checkpointed_equals_stored(build: Callable[[], nn.Module], inner_steps: int) -> None:
    """Second-order MAML through ``build()`` (3 ways): checkpointed inner steps give the stored loop's
    meta-gradient, random masks included (the same seed before each). Run it in float64."""
    batch = image_batch(2, dtype=torch.float64)
    grads = {}
    for checkpoint in (False, True):
        torch.manual_seed(0)
        maml = MAML(build(), "classification", inner_lr=0.1, inner_steps=inner_steps,
                    execution=Execution(checkpoint=checkpoint))
        torch.manual_seed(5)
        grads[checkpoint], _ = maml.meta_gradient(batch)
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-10, atol=1e-12)
