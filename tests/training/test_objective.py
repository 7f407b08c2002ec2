"""``[objective]``: a loss and metric of one's own, by import path, checked when the config is read."""

from __future__ import annotations

import json

import custom_losses
import pytest
import torch
import torch.nn.functional as F

from innerloop.training.checkpoint import load_checkpoint
from innerloop.training.config import Config, ConfigError, config_from_dict
from innerloop.training.run import build_algorithm, build_family, identity, load_for_eval, run


def _cfg(tmp_path, **objective) -> Config:
    return Config().override({
        "model.hidden": [8], "train.iterations": 3, "train.meta_batch_size": 4, "train.validate_every": 3,
        "train.val_tasks": 4, "eval.baseline": False, "eval.test_tasks": 6, "eval.steps": 1,
        "eval.report_steps": [0, 1], "execution.device": "cpu", "out_dir": str(tmp_path),
        **{f"objective.{k}": v for k, v in objective.items()}})


def test_a_custom_loss_through_a_config_run(tmp_path):
    cfg = _cfg(tmp_path, loss="custom_losses:l1")
    calls = custom_losses.CALLS["l1"]
    result = run(cfg, progress=False)
    assert custom_losses.CALLS["l1"] > calls  # meta-training, validation and testing used it
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["runs"]["maml"]["test"]["metric"] == "l1"  # the loss is the metric (lower is better)
    assert "l1 after 1 step" in result.table
    alg = result.trained["maml"]
    pred, target = torch.randn(5, 1), torch.randn(5, 1)
    assert torch.equal(alg.fns.loss(pred, target), F.l1_loss(pred, target))
    assert alg.higher_is_better is False
    # the objective is part of the checkpoint's identity, and `innerloop eval` rebuilds it
    assert load_checkpoint(tmp_path / "best.pt")["identity"]["objective"]["loss"] == "custom_losses:l1"
    cfg_back, rebuilt = load_for_eval(tmp_path / "best.pt")
    assert cfg_back.objective.loss == "custom_losses:l1" and rebuilt.metric_name == "l1"


def test_a_custom_metric_with_its_direction(tmp_path):
    cfg = _cfg(tmp_path, loss="custom_losses:l1", metric="custom_losses:max_error", metric_name="worst",
               higher_is_better=False, targets="values")
    alg = build_algorithm(cfg, build_family(cfg))
    assert (alg.metric_name, alg.higher_is_better) == ("worst", False)
    with pytest.raises(ValueError, match="same shape"):  # the shape rule still guards the loss
        alg.fns.loss(torch.zeros(3, 1), torch.zeros(3))


def test_the_default_objective_keeps_identities():
    cfg = Config()
    assert "objective" not in identity(cfg, "maml")
    assert build_algorithm(cfg, build_family(cfg)).metric_name == "mse"


@pytest.mark.parametrize(("objective", "message"), [
    ({"loss": "no_such_module_here:l1"}, "objective.loss = 'no_such_module_here:l1': module 'no_such_module_here' "
                                         "does not import .*check the spelling"),
    ({"loss": "custom_losses:nope"}, "objective.loss = 'custom_losses:nope': 'custom_losses' has no 'nope'"),
    ({"loss": "custom_losses:NOT_CALLABLE"}, "names float 3.0, not a function"),
    ({"loss": "custom_losses.l1"}, "give an import path 'package.module:function'"),
    ({"loss": "custom_losses:l1", "metric": "custom_losses:oops"}, "objective.metric = 'custom_losses:oops'"),
    ({"metric": "custom_losses:max_error"}, "objective.metric = .* is set without objective.loss"),
    ({"loss": "custom_losses:l1", "metric": "custom_losses:max_error"}, "objective: say whether the metric"),
    ({"loss": "custom_losses:l1", "targets": "pixels"}, "objective.targets = 'pixels' is not allowed"),
    ({"loss": 3}, "objective.loss = 3 has the wrong type"),
])
def test_bad_objectives_are_refused_when_read(objective, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"objective": objective})
