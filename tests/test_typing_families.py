"""Every concrete task family satisfies the :class:`~innerloop.tasks.TaskFamily` protocol.

mypy checks the same statically (``_FAMILY_TYPES`` at the end of ``innerloop/data/regression.py``
and of ``innerloop/data/sampling.py``); these tests check it at run time, on the members' values
as well as their presence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import pytest
import torch

from innerloop.data import (
    FAMILIES,
    FewShotClassification,
    ImageClassDataset,
    LinearRegression,
    Sinusoid,
    make_family,
)
from innerloop.data.global_labels import GlobalLabelBatches
from innerloop.data.regression import _RegressionFamily
from innerloop.tasks import SPLITS, Objective, Split, Task, TaskBatch, TaskFamily


def _image_splits() -> dict[str, ImageClassDataset]:
    """Three splits of 4 classes x 3 images of 1x2x2, two groups (alphabets) of 2 classes each."""
    out = {}
    for s, split in enumerate(SPLITS):
        data = torch.arange(12, dtype=torch.float32).add(100 * s).reshape(12, 1, 1, 1).expand(12, 1, 2, 2)
        out[split] = ImageClassDataset(
            data.contiguous(), [3] * 4, [f"{split}{c}" for c in range(4)], ["a", "a", "b", "b"]
        )
    return out


def _families() -> dict[str, TaskFamily]:
    families: dict[str, TaskFamily] = {
        "LinearRegression": LinearRegression(shots=3, queries=2, seed=1),
        "LinearRegression-3d": LinearRegression(shots=3, queries=2, dim=3, seed=1),
        "Sinusoid": Sinusoid(shots=3, queries=2, seed=1),
        "FewShotClassification": FewShotClassification(_image_splits(), ways=2, shots=1, queries=2, seed=1),
        "FewShotClassification-within": FewShotClassification(
            _image_splits(), ways=2, shots=1, queries=2, seed=1, within_alphabet=True
        ),
        "GlobalLabelBatches": GlobalLabelBatches(_image_splits(), examples=4, seed=1),
    }
    for name in FAMILIES:  # the presets: sinusoid, sinusoid-shifted, sinusoid-sum, linear
        families[f"make_family({name})"] = make_family(name, shots=3, queries=2, seed=1)
    return families


FAMILY_CASES = _families()


@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_concrete_family_is_a_task_family(name: str) -> None:
    family = FAMILY_CASES[name]
    assert isinstance(family, TaskFamily)
    assert family.objective in get_args(Objective)
    assert isinstance(family.seed, int) and family.seed == 1
    split: Split = "val"
    task = family.task(split, 4)
    batch = family.batch(split, [4, 5])
    assert isinstance(task, Task) and isinstance(batch, TaskBatch) and len(batch) == 2
    assert torch.equal(batch.task(0).support_x, task.support_x)
    image_families = (FewShotClassification, GlobalLabelBatches)
    expected = "classification" if isinstance(family, image_families) else "regression"
    assert family.objective == expected
    if expected == "classification":
        assert task.support_y.dtype == torch.int64
    else:
        assert task.support_y.dtype == torch.float32


def test_every_regression_family_class_is_covered() -> None:
    """A new regression family (a subclass of the shared base) must be added to the cases above."""

    def subclasses(cls: type) -> set[type]:
        return {c for s in cls.__subclasses__() for c in (s, *subclasses(s))}

    covered = {type(f) for f in FAMILY_CASES.values()}
    missing = {c.__name__ for c in subclasses(_RegressionFamily) if c.__module__.startswith("innerloop.")} - {
        c.__name__ for c in covered
    }
    assert not missing, f"regression families without a protocol test: {sorted(missing)}"
    for spec in FAMILIES.values():
        assert spec.cls in covered


def test_objects_missing_members_are_not_task_families() -> None:
    class NoSeed:
        objective = "regression"

        def task(self, split: Split, index: int) -> Task: ...

        def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch: ...

    class NoBatch:
        objective = "regression"
        seed = 0

        def task(self, split: Split, index: int) -> Task: ...

    assert not isinstance(NoSeed(), TaskFamily)
    assert not isinstance(NoBatch(), TaskFamily)
    assert not isinstance(object(), TaskFamily)


def test_protocol_members_may_be_properties() -> None:
    """``objective`` and ``seed`` are read-only members: properties satisfy the protocol too."""

    class Wrapped:
        def __init__(self, inner: TaskFamily) -> None:
            self._inner = inner

        @property
        def objective(self) -> Objective:
            return self._inner.objective

        @property
        def seed(self) -> int:
            return self._inner.seed

        def task(self, split: Split, index: int) -> Task:
            return self._inner.task(split, index)

        def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch:
            return self._inner.batch(split, indices)

    wrapped = Wrapped(Sinusoid(seed=2))
    assert isinstance(wrapped, TaskFamily)
    assert wrapped.objective == "regression" and wrapped.seed == 2
