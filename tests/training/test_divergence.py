"""Mistakes of a run stop it cleanly: divergence (non-finite loss, meta-gradient, parameters or validation),
a changed configuration resumed through the Python API, and a missing split."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from innerloop.training import DivergenceError, MissingSplitError
from innerloop.training.checkpoint import CheckpointError, load_checkpoint
from innerloop.training.config import Config
from innerloop.training.loop import Schedule, _better, meta_train, run_loop
from innerloop.training.run import build_algorithm, build_family


def _cfg(**over) -> Config:
    return Config().override({"model.hidden": [16, 16], "train.meta_batch_size": 4, "train.validate_every": 5,
                              "train.val_tasks": 8, "train.log_every": 1, "train.iterations": 12, **over})


def _setup(**over):
    cfg = _cfg(**over)
    family = build_family(cfg)
    return cfg, family, build_algorithm(cfg, family)


def _all_finite(state) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_huge_inner_lr_stops_with_the_step_and_the_learning_rates(tmp_path):
    cfg, family, alg = _setup(**{"algorithm.inner_lr": 1e6})
    with pytest.raises(DivergenceError) as info:
        meta_train(alg, family, cfg.train, tmp_path, progress=False)
    msg = str(info.value)
    assert re.search(r"diverged at step [1-4]: (the meta-gradient|the loss|a parameter)", msg)
    assert "algorithm.inner_lr = 1000000.0" in msg and "train.outer_lr = 0.001" in msg
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()
    assert "No checkpoint was written" in msg


def test_nan_mid_run_keeps_the_last_finite_checkpoint(tmp_path):
    cfg, family, alg = _setup()
    calls = []

    def poison(grads):  # step 8's meta-gradient (after the finite check): the parameters become NaN
        calls.append(1)
        if len(calls) == 8:
            return {k: torch.full_like(g, math.nan) for k, g in grads.items()}
        return grads

    with pytest.raises(DivergenceError, match=r"at step 8: a parameter after the outer step") as info:
        meta_train(alg, family, cfg.train, tmp_path, progress=False, grad_hook=poison)
    assert str(tmp_path / "last.pt") in str(info.value)
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert last["step"] == 5 and _all_finite(last["state"]) and _all_finite(best["state"])
    assert math.isfinite(best["best_val"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 7  # nothing logged for the step that diverged
    assert not (tmp_path / ".lock").exists()  # released on the error


def test_non_finite_meta_gradient_stops_the_run(tmp_path):
    cfg, family, alg = _setup()
    real = alg.meta_gradient

    def nan_at_3(batch):
        grads, metrics = real(batch)
        if nan_at_3.calls == 2:
            grads = {k: g * math.inf for k, g in grads.items()}
        nan_at_3.calls += 1
        return grads, metrics

    nan_at_3.calls = 0
    alg.meta_gradient = nan_at_3
    with pytest.raises(DivergenceError, match="at step 3: the meta-gradient is not finite"):
        meta_train(alg, family, cfg.train, None, progress=False)
    assert all(torch.isfinite(p).all() for p in alg.parameters())  # the step was not taken


def test_non_finite_loss_and_validation_stop_run_loop(tmp_path):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(DivergenceError, match=r"at step 2: the loss \(inf\)"):
        run_loop(model, lambda s: {"loss": math.inf if s == 1 else 1.0}, Schedule(5), tmp_path / "a", name="x",
                 progress=False)
    # a NaN validation stops the run and is never "best"
    with pytest.raises(DivergenceError, match=r"at step 2: the validation value val \(nan\)"):
        run_loop(model, lambda s: {"loss": 1.0}, Schedule(5, validate_every=2), tmp_path / "b", name="x",
                 validate=lambda: math.nan, progress=False)
    assert not (tmp_path / "b" / "best.pt").exists()
    assert not _better(math.nan, None, True) and not _better(math.nan, 1.0, False)
    # only the metrics named are checked
    run_loop(model, lambda s: {"loss": 1.0, "aux": math.nan}, Schedule(2), None, name="x", progress=False,
             finite_metrics=("loss",))


def test_grad_clip_bounds_the_step(tmp_path):
    cfg, family, alg = _setup(**{"train.optimizer": "sgd", "train.outer_lr": 1.0, "train.iterations": 1})
    before = torch.cat([p.detach().flatten().clone() for p in alg.parameters()])
    meta_train(alg, family, cfg.train, tmp_path, progress=False, grad_clip=1e-3)
    after = torch.cat([p.detach().flatten() for p in alg.parameters()])
    assert float((after - before).norm()) <= 1e-3 * (1 + 1e-4)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["grad_norm"] > 1e-3
    with pytest.raises(ValueError, match="grad_clip"):
        meta_train(alg, family, cfg.train, None, progress=False, grad_clip=math.inf)


def test_python_api_refuses_to_resume_another_configuration(tmp_path):
    cfg, family, alg = _setup(**{"train.iterations": 3})
    meta_train(alg, family, cfg.train, tmp_path, progress=False)
    # the same script again: resumes (nothing left to do)
    cfg, family, alg = _setup(**{"train.iterations": 3})
    assert meta_train(alg, family, cfg.train, tmp_path, progress=False).steps == 3
    # another inner_lr, or another meta-batch: refused, naming the keys
    cfg2, family2, alg2 = _setup(**{"train.iterations": 6, "algorithm.inner_lr": 0.5})
    with pytest.raises(CheckpointError, match=r"options\.inner_lr: checkpoint 0\.01, this run 0\.5"):
        meta_train(alg2, family2, cfg2.train, tmp_path, progress=False)
    cfg3, family3, alg3 = _setup(**{"train.iterations": 6, "train.meta_batch_size": 2})
    with pytest.raises(CheckpointError, match=r"train\.meta_batch_size: checkpoint 4, this run 2"):
        meta_train(alg3, family3, cfg3.train, tmp_path, progress=False)
    # resume=False starts again from step 0 and replaces what was there
    meta_train(alg2, family2, cfg2.train, tmp_path, progress=False, resume=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(tmp_path / "last.pt")["identity"]["options"]["inner_lr"] == 0.5


class _NoVal:
    """A family without a ``val`` split."""

    def __init__(self, inner):
        self.inner = inner
        self.objective, self.seed = inner.objective, inner.seed

    def task(self, split, index):
        if split == "val":
            raise KeyError("no 'val' split in this task family; it has train, test.")
        return self.inner.task(split, index)

    def batch(self, split, indices):
        if split == "val":
            raise KeyError("no 'val' split in this task family; it has train, test.")
        return self.inner.batch(split, indices)


def test_missing_val_split_is_found_before_the_first_step(tmp_path):
    cfg, family, alg = _setup()
    called = []
    real = alg.meta_gradient
    alg.meta_gradient = lambda batch: (called.append(1), real(batch))[1]
    with pytest.raises(MissingSplitError, match="cannot produce a 'val' task, which validation needs"):
        meta_train(alg, _NoVal(family), cfg.train, tmp_path, progress=False)
    assert not called and not (tmp_path / "metrics.jsonl").exists()
