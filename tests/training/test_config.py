"""Typed configs: unknown keys and wrong types fail before any work, naming the key."""

from __future__ import annotations

import pytest

from innerloop.training.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_are_the_embedded_run():
    cfg = Config().validate()
    assert cfg.task.family == "sinusoid" and cfg.algorithm.name == "maml"
    assert cfg.eval.test_tasks >= 600


def test_toml_overrides_only_what_it_names(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[task]\nfamily = "linear"\nshots = 3\n[algorithm]\nlr_mode = "per_element"\n'
                    '[eval]\nshots = 4\n')
    cfg = load_config(path)
    assert cfg.task.family == "linear" and cfg.task.shots == 3 and cfg.task.queries == 10
    assert cfg.algorithm.lr_mode == "per_element" and cfg.eval.shots == 4


@pytest.mark.parametrize(("data", "message"), [
    ({"task": {"shot": 5}}, "unknown config key 'task.shot'; valid keys here are: family, shots"),
    ({"trian": {}}, "unknown config key 'trian'"),
    ({"task": {"shots": "5"}}, r"task.shots = '5' has the wrong type: expected an integer"),
    ({"task": {"shots": True}}, "expected an integer"),
    ({"algorithm": {"inner_lr": "fast"}}, "expected a number"),
    ({"algorithm": {"lr_mode": "per_layer"}}, r"lr_mode = 'per_layer' is not allowed"),
    ({"model": {"hidden": [40, "x"]}}, r"model.hidden\[1\]"),
    ({"task": 3}, "must be a table"),
    ({"task": {"shots": 0}}, r"task.shots = 0 is invalid: K must be >= 1"),
    ({"algorithm": {"inner_steps": 0}}, "steps must be >= 1"),
    ({"task": {"family": "cosine"}}, "choose one of"),
    ({"algorithm": {"name": "maml2"}}, "algorithm.name = 'maml2'"),
    ({"eval": {"steps": 3, "report_steps": [0, 5]}}, r"each must lie in 0\.\.eval\.steps"),
])
def test_bad_configs_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_int_accepted_for_float_and_null_for_optional():
    cfg = config_from_dict({"algorithm": {"inner_lr": 1}, "eval": {"shots": None}})
    assert cfg.algorithm.inner_lr == 1.0 and isinstance(cfg.algorithm.inner_lr, float)
    assert cfg.eval.shots is None


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[task\n")
    with pytest.raises(ConfigError, match="could not be parsed"):
        load_config(bad)
    yml = tmp_path / "x.yaml"
    yml.write_text("a: 1")
    with pytest.raises(ConfigError, match=r"use a \.toml or \.json"):
        load_config(yml)


def test_every_shipped_config_is_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        if path.name.startswith("rl_"):  # meta-RL configs: `innerloop rl train`
            from innerloop.rl.config import load_rl_config

            load_rl_config(path)
        elif path.name.startswith("tune_"):  # hypergradient tuning: `innerloop tune`
            from innerloop.tuning.tune import load_tune_config

            load_tune_config(path)
        elif path.name.startswith("continual_"):  # OML / ANML: benchmarks/continual_omniglot.py
            from innerloop.continual.config import load_continual_config

            load_continual_config(path)
        else:
            load_config(path)
