"""The background prefetch of meta-batches: same batches as inline, errors re-raised, no thread left behind."""

from __future__ import annotations

import json
import threading
import time
import traceback

import pytest
import torch

from innerloop.data import FewShotClassification, ImageClassDataset
from innerloop.training.checkpoint import load_checkpoint
from innerloop.training.config import Config
from innerloop.training.loggers import LoggerBase
from innerloop.training.loop import meta_train
from innerloop.training.prefetch import Prefetcher
from innerloop.training.run import build_algorithm, build_family


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


def test_get_returns_make_in_order_and_restarts_on_a_jump():
    made = []

    def make(i):
        made.append(i)
        return i * i

    with Prefetcher(make, depth=2, stop=10, name="t-order") as p:
        assert [p.get(i) for i in range(4)] == [0, 1, 4, 9]
        assert p.get(7) == 49 and p.get(8) == 64  # a jump (a resumed loop) starts again from there
        time.sleep(0.05)
        assert max(made) <= 9 and len([i for i in made if i >= 7]) <= 3  # bounded: at most depth ahead
    assert not _threads("t-order")
    with pytest.raises(IndexError, match=r"outside 0\.\.9"):
        Prefetcher(make, 2, stop=10).get(10)
    with pytest.raises(ValueError, match="prefetch=0"):
        Prefetcher(make, 0)


def test_an_error_in_make_is_raised_in_the_consumer_with_its_traceback():
    def broken_family_batch(i):
        if i == 2:
            raise KeyError(f"no image for task {i}")
        return i

    p = Prefetcher(broken_family_batch, depth=3, name="t-error")
    assert p.get(0) == 0 and p.get(1) == 1
    with pytest.raises(KeyError, match="no image for task 2") as info:
        p.get(2)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "broken_family_batch" in frames  # the original traceback, from the background thread
    assert not p.alive and not _threads("t-error")


def test_close_stops_a_producer_blocked_on_a_full_queue_and_a_slow_make():
    def slow(i):
        time.sleep(0.02)
        return torch.full((3,), float(i))

    with pytest.raises(KeyboardInterrupt), Prefetcher(slow, depth=1, name="t-stop") as p:
        p.get(0)
        time.sleep(0.1)  # the producer is blocked: the queue of depth 1 is full
        raise KeyboardInterrupt
    assert not _threads("t-stop")


def _sinusoid(tmp_path, iterations=8):
    cfg = Config().override({"model.hidden": [8], "train.meta_batch_size": 4, "train.validate_every": 4,
                             "train.val_tasks": 4, "train.log_every": 1, "train.iterations": iterations,
                             "out_dir": str(tmp_path)})
    return cfg, build_family(cfg)


def _run(cfg, family, run_dir, prefetch, algorithm=None):
    alg = algorithm or build_algorithm(cfg, family)
    meta_train(alg, family, cfg.train, run_dir, progress=False, prefetch=prefetch)
    return alg


def _equal_runs(a_dir, a, b_dir, b):
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    skip = ("tasks_per_s", "wall_s", "memory_mb")  # measurements of the machine
    rows = [[{k: v for k, v in json.loads(ln).items() if k not in skip}
             for ln in (d / "metrics.jsonl").read_text().splitlines()] for d in (a_dir, b_dir)]
    assert rows[0] == rows[1] and len(rows[0]) > 0


class Where:
    """A family that notes the threads its ``train`` batches are built on."""

    def __init__(self, family):
        self.family, self.threads = family, set()

    def __getattr__(self, name):
        return getattr(self.family, name)

    def batch(self, split, indices):
        if split == "train":
            self.threads.add(threading.current_thread().name)
        return self.family.batch(split, indices)


def test_a_run_with_prefetch_equals_the_inline_run_bit_for_bit(tmp_path):
    cfg, family = _sinusoid(tmp_path)
    seen = Where(family)
    inline = _run(cfg, seen, tmp_path / "inline", 0, build_algorithm(cfg, family))
    assert seen.threads == {"MainThread"}
    seen = Where(family)
    ahead = _run(cfg, seen, tmp_path / "ahead", 3, build_algorithm(cfg, family))
    assert seen.threads == {"innerloop-meta-batches"}  # every train batch was built ahead, off the main thread
    _equal_runs(tmp_path / "inline", inline, tmp_path / "ahead", ahead)
    # and a resumed prefetching run equals both
    _run(cfg.override({"train.iterations": 4}), family, tmp_path / "resumed", 2)
    resumed = _run(cfg, family, tmp_path / "resumed", 2)
    _equal_runs(tmp_path / "inline", inline, tmp_path / "resumed", resumed)
    assert not _threads("innerloop-meta-batches")


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    classes, per_class = 8, 4
    data = torch.randint(0, 256, (classes * per_class, 1, 16, 16), generator=g, dtype=torch.uint8)
    ds = ImageClassDataset(data, [per_class] * classes, [f"c{i}" for i in range(classes)])
    return FewShotClassification({"train": ds, "val": ds}, ways=3, shots=1, queries=2, seed=seed)


def test_image_tasks_with_prefetch_equal_the_inline_run(tmp_path):
    cfg = Config().override({"task.family": "omniglot", "task.ways": 3, "task.shots": 1, "task.queries": 2,
                             "model.name": "conv4", "model.filters": 4, "eval.baseline": False,
                             "train.meta_batch_size": 4, "train.iterations": 3,
                             "train.validate_every": 3, "train.val_tasks": 3, "train.log_every": 1,
                             "out_dir": str(tmp_path)})
    family = _images()
    inline = _run(cfg, family, tmp_path / "inline", 0, build_algorithm(cfg, family))
    ahead = _run(cfg, family, tmp_path / "ahead", 2, build_algorithm(cfg, family))
    _equal_runs(tmp_path / "inline", inline, tmp_path / "ahead", ahead)


class FailsAt:
    """A family whose ``train`` batch of step 2 raises (a missing file, say)."""

    def __init__(self, family, bad_task):
        self.family, self.bad_task = family, bad_task

    def __getattr__(self, name):
        return getattr(self.family, name)

    def batch(self, split, indices):
        if split == "train" and self.bad_task in indices:
            raise OSError(f"task {self.bad_task}: image file vanished")
        return self.family.batch(split, indices)


def test_an_error_building_a_batch_stops_training_with_it_and_no_thread_left(tmp_path):
    cfg, family = _sinusoid(tmp_path)
    cfg = cfg.override({"train.validate_every": 1})
    bad = FailsAt(family, bad_task=2 * cfg.train.meta_batch_size)  # the first task of step index 2
    alg = build_algorithm(cfg, family)
    with pytest.raises(OSError, match="image file vanished"):
        meta_train(alg, bad, cfg.train, tmp_path, progress=False, prefetch=2)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2  # the steps before it were kept
    assert not _threads("innerloop-meta-batches")


def test_an_interrupt_during_training_leaves_no_prefetch_thread(tmp_path):
    cfg, family = _sinusoid(tmp_path)

    class Interrupt(LoggerBase):
        def on_step(self, step, scalars):
            if step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        meta_train(build_algorithm(cfg, family), family, cfg.train, None, progress=False, prefetch=4,
                   loggers=(Interrupt(),))
    assert not _threads("innerloop-meta-batches")


def test_prefetch_must_be_a_count(tmp_path):
    cfg, family = _sinusoid(tmp_path)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="prefetch must be an int >= 0"):
            meta_train(build_algorithm(cfg, family), family, cfg.train, None, progress=False, prefetch=bad)
