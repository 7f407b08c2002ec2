"""Algorithm options: frozen dataclasses that cannot hold an invalid value, however they are built
(keywords, an options object, a config table), with 0.1.0's names as aliases."""

from __future__ import annotations

import pytest

from innerloop.algorithms import ALGORITHMS, MAML, IMAMLOptions, MAMLOptions, ProtoNet, Reptile, ReptileOptions
from innerloop.models import MLP
from innerloop.training.config import AlgorithmConfig, Config, ConfigError, TrainConfig, config_from_dict


@pytest.mark.parametrize(("build", "message"), [
    (lambda: MAMLOptions(first_order="no"), r"first_order = 'no' has the wrong type: expected true or false"),
    (lambda: MAMLOptions(inner_steps=2.5), r"inner_steps = 2\.5 has the wrong type: expected an integer"),
    (lambda: MAMLOptions(inner_lr=True), r"inner_lr = True has the wrong type"),
    (lambda: MAMLOptions(weight_decay=float("inf")), r"weight_decay = inf is invalid: must be a finite number"),
    (lambda: MAMLOptions(adapt=()), r"adapt = \(\) is invalid: give 'all' or a non-empty list"),
    (lambda: MAMLOptions(lr_mode="global"), r"lr_mode = 'global' is not allowed: choose one of"),
    (lambda: IMAMLOptions(reg_lambda=float("inf")), r"reg_lambda = inf is invalid: must be a finite number"),
    (lambda: ReptileOptions(betas=(0.9,)), r"betas = \(0\.9,\) is invalid: give a list of 2"),
    (lambda: MAML(MLP(), "regression", weight_decay=0.1, inner_weight_decay=0.2), r"weight_decay is given twice"),
    (lambda: MAML(MLP(), "regression", inner_optimizer="adam"), r"maml has no option 'inner_optimizer'"),
])
def test_an_invalid_option_cannot_be_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_lists_become_tuples_and_aliases_work_in_every_path():
    assert MAMLOptions(adapt=["head.*"]).adapt == ("head.*",)
    assert Reptile(MLP(), "regression", inner_betas=[0.0, 0.5]).betas == (0.0, 0.5)
    assert ALGORITHMS["reptile"].options({"inner_betas": [0.0, 0.5]}).betas == (0.0, 0.5)  # type: ignore[attr-defined]
    assert ProtoNet(MLP(1, 4), task_threads=1).execution.task_threads == 1


def test_variants_fix_their_options_however_the_config_is_built():
    with pytest.raises(ConfigError, match=r"algorithm\.first_order = False is invalid: fomaml fixes it to True"):
        AlgorithmConfig("fomaml", MAMLOptions(first_order=False))
    with pytest.raises(ConfigError, match=r"first_order is fixed to True by fomaml"):
        config_from_dict({"algorithm": {"name": "fomaml", "first_order": False}})
    with pytest.raises(ConfigError, match=r"algorithm\.weight_decay is given twice"):
        config_from_dict({"algorithm": {"weight_decay": 0.1, "inner_weight_decay": 0.2}})


@pytest.mark.parametrize("name", ["reptile", "imaml", "mamlpp", "maml", "anil"])
def test_a_config_without_inner_steps_takes_one_as_in_0_1_0(name):
    assert config_from_dict({"algorithm": {"name": name}}).algorithm.options.inner_steps == 1


def test_python_built_configs_are_type_checked_and_legacy_keys_override():
    with pytest.raises(ConfigError, match=r"train\.iterations = '5' has the wrong type: expected an integer"):
        Config(train=TrainConfig(iterations="5"))  # type: ignore[arg-type]
    assert Config().override({"algorithm.vectorize": "loop"}).execution.vectorize == "loop"
    with pytest.raises(ConfigError, match=r"unknown config key 'nothing\.here'"):
        Config().override({"nothing.here": 1})
