"""The N-way K-shot episode sampler and the multi-process meta-batch loader."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop.data import FewShotClassification, ImageClassDataset, task_loader
from innerloop.tasks import TaskBatch, TaskFamily

# Split s has classes with disjoint image ids: image j of class c of split s is a 1x2x2 image whose
# pixels all equal its global id, so every image of a task can be traced back.
LAYOUT = {"train": (12, 7, 3), "val": (6, 5, 2), "test": (8, 6, 4)}  # classes, images per class, groups


def _split(first_id: int, classes: int, per_class: int, groups: int) -> ImageClassDataset:
    n = classes * per_class
    ids = torch.arange(first_id, first_id + n, dtype=torch.float32)
    data = ids.reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    names = [f"c{first_id}_{c}" for c in range(classes)]
    return ImageClassDataset(data, [per_class] * classes, names, [f"g{c % groups}" for c in range(classes)])


def fake_splits() -> dict[str, ImageClassDataset]:
    out, first = {}, 0
    for split, (classes, per_class, groups) in LAYOUT.items():
        out[split] = _split(first, classes, per_class, groups)
        first += classes * per_class
    return out


SPLITS = fake_splits()


def _ids(x: torch.Tensor) -> list[int]:
    return x[:, 0, 0, 0].long().tolist()


def _check_task(family: FewShotClassification, split: str, index: int) -> None:
    ways, shots, queries = family.ways, family.shots, family.queries
    task = family.task(split, index)
    assert task.support_x.shape == (ways * shots, 1, 2, 2) and task.support_x.dtype == torch.float32
    assert task.query_x.shape == (ways * queries, 1, 2, 2)
    assert task.support_y.dtype == torch.int64 and task.query_y.dtype == torch.int64
    assert task.support_y.tolist() == [j for j in range(ways) for _ in range(shots)]
    assert task.query_y.tolist() == [j for j in range(ways) for _ in range(queries)]
    s_ids, q_ids = _ids(task.support_x), _ids(task.query_x)
    assert not set(s_ids) & set(q_ids)  # support and query never share an image
    assert len(set(s_ids)) == len(s_ids) and len(set(q_ids)) == len(q_ids)
    ds = family.splits[split]
    lo = int(ds.data.min())
    hi = lo + len(ds.data)
    assert all(lo <= i < hi for i in s_ids + q_ids)  # nothing from another split
    per_class = int(ds.counts[0])
    cls_of = {i: (i - lo) // per_class for i in s_ids + q_ids}
    label_class = {}
    for i, y in zip(s_ids + q_ids, task.support_y.tolist() + task.query_y.tolist(), strict=True):
        assert label_class.setdefault(y, cls_of[i]) == cls_of[i]  # one class per label
    assert len(set(label_class.values())) == ways  # distinct classes
    assert [label_class[j] for j in range(ways)] == family.classes_of(split, index)
    if family.within_alphabet:
        assert len({ds.groups[c] for c in label_class.values()}) == 1


@settings(max_examples=60, deadline=None)
@given(
    split=st.sampled_from(["train", "val", "test"]),
    ways=st.integers(1, 6),
    shots=st.integers(1, 3),
    queries=st.integers(1, 2),
    index=st.integers(0, 10**6),
    seed=st.integers(0, 2**31),
)
def test_task_invariants(split, ways, shots, queries, index, seed):
    family = FewShotClassification(SPLITS, ways, shots, queries, seed=seed)
    _check_task(family, split, index)


@settings(max_examples=30, deadline=None)
@given(split=st.sampled_from(["train", "val", "test"]), ways=st.integers(1, 2), index=st.integers(0, 10**6))
def test_within_alphabet_invariants(split, ways, index):
    family = FewShotClassification(SPLITS, ways, 2, 2, seed=1, within_alphabet=True)
    _check_task(family, split, index)


def test_is_a_classification_task_family():
    family = FewShotClassification(SPLITS, 5, 1, 2)
    assert isinstance(family, TaskFamily) and family.objective == "classification"
    batch = family.batch("train", [3, 4, 5])
    assert isinstance(batch, TaskBatch) and batch.support_x.shape == (3, 5, 1, 2, 2)
    assert torch.equal(batch.task(1).query_x, family.task("train", 4).query_x)


def test_determinism_and_variety():
    a = FewShotClassification(SPLITS, 5, 2, 2, seed=7)
    b = FewShotClassification(fake_splits(), 5, 2, 2, seed=7)
    t, u = a.task("train", 13), b.task("train", 13)
    assert torch.equal(t.support_x, u.support_x) and torch.equal(t.query_x, u.query_x)
    assert not torch.equal(t.support_x, a.task("train", 14).support_x)
    assert not torch.equal(t.support_x, FewShotClassification(SPLITS, 5, 2, 2, seed=8).task("train", 13).support_x)
    # the class order is random per task: label 0 is not always the lowest class
    firsts = {a.classes_of("train", i)[0] for i in range(40)}
    orders = [a.classes_of("train", i) for i in range(40)]
    assert len(firsts) > 3 and any(o != sorted(o) for o in orders)


def test_rotated_classes_are_gathered_rotated():
    base = ImageClassDataset(torch.arange(2 * 9, dtype=torch.uint8).reshape(2, 1, 3, 3), [1, 1], ["a", "b"])
    rot = base.with_rotations()
    assert rot.names[:4] == ["a/rot000", "a/rot090", "a/rot180", "a/rot270"]
    for c in range(rot.num_classes):
        k = c % 4
        expected = torch.rot90(base.images(c // 4), k, dims=(-2, -1))
        assert torch.equal(rot.images(c), expected)
        assert torch.equal(rot.gather([c], [0]), expected)
    assert torch.equal(rot.images(1), base.data[:1].float().rot90(1, (-2, -1)) / 255)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"ways": 7}, r"7-way tasks need 7 classes but the val split has only 6"),
        (
            {"ways": 2, "shots": 4, "queries": 2},
            r"= 6 images per class, but class 'c84_0' of the val split has only 5",
        ),
        ({"ways": 0}, r"ways \(N\) must be an integer >= 1, got 0"),
        ({"shots": 0}, r"shots \(K\) must be an integer >= 1, got 0"),
        ({"queries": -1}, r"queries must be an integer >= 1, got -1"),
        ({"ways": 2.5}, r"ways \(N\) must be an integer >= 1, got 2.5"),
        ({"ways": 5, "within_alphabet": True}, r"largest group of the train split has 4; use ways <= 4"),
    ],
)
def test_errors_before_any_sampling(kwargs, pattern):
    args = {"ways": 2, "shots": 1, "queries": 1, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        FewShotClassification(SPLITS, **args)


def test_unknown_or_absent_split():
    family = FewShotClassification({"train": SPLITS["train"]}, 2, 1, 1)
    with pytest.raises(KeyError, match="no 'val' split in this task family; it has train"):
        family.task("val", 0)
    with pytest.raises(ValueError, match="unknown split"):
        family.task("dev", 0)  # type: ignore[arg-type]


def _batches(num_workers: int) -> list[TaskBatch]:
    family = FewShotClassification(SPLITS, 3, 2, 2, seed=5)
    return list(task_loader(family, "train", meta_batch_size=4, num_batches=5, num_workers=num_workers))


def test_loader_same_batches_for_any_worker_count():
    serial, parallel = _batches(0), _batches(2)
    assert len(serial) == len(parallel) == 5
    for a, b in zip(serial, parallel, strict=True):
        assert a.support_x.shape == (4, 6, 1, 2, 2) and a.query_y.shape == (4, 6)
        for x, y in zip(
            (a.support_x, a.support_y, a.query_x, a.query_y),
            (b.support_x, b.support_y, b.query_x, b.query_y),
            strict=True,
        ):
            assert torch.equal(x, y)
    family = FewShotClassification(SPLITS, 3, 2, 2, seed=5)
    assert torch.equal(serial[2].query_x, family.batch("train", range(8, 12)).query_x)
    resumed = list(task_loader(family, "train", meta_batch_size=4, num_batches=2, start_batch=3))
    assert torch.equal(resumed[0].support_x, serial[3].support_x)
    assert torch.equal(resumed[1].support_x, serial[4].support_x)


def test_loader_argument_errors():
    family = FewShotClassification(SPLITS, 3, 2, 2)
    with pytest.raises(ValueError, match="meta_batch_size must be an integer >= 1"):
        task_loader(family, "train", 0, 5)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        task_loader(family, "train", 2, 5, num_workers=-1)
