"""Any config key from the command line (``--set``), the keys listed by ``--help``, ``innerloop config show``."""

from __future__ import annotations

import json

import pytest

from innerloop.cli import main
from innerloop.rl.config import RLConfig
from innerloop.training.config import Config, ConfigError, load_config
from innerloop.training.settings import cli_changes, config_fields, parse_value, to_toml


@pytest.mark.parametrize(("text", "value"), [
    ("5", 5), ("0.1", 0.1), ("true", True), ('"omniglot"', "omniglot"), ("omniglot", "omniglot"),
    ("[16, 16]", [16, 16]), ("{dim = 2}", {"dim": 2}), ("null", None), ("runs/a b", "runs/a b"),
    ("1\nx = 2", "1\nx = 2"),  # not one TOML value: the text itself
])
def test_values_are_toml(text, value):
    assert parse_value(text) == value


def test_set_reaches_every_section():
    base = Config()
    changes = cli_changes(base, [
        "task.family=linear", "task.shots=3", 'task.options={"slope_range" = [0.5, 1.0]}', "model.hidden=[8, 8]",
        "algorithm.inner_lr=0.1", "algorithm.lr_mode=per_element", "execution.vectorize=loop",
        "train.iterations=5", "train.iterations=7", "eval.shots=null", "objective.metric_name=x",
        "out_dir=2024", "train.loggers=[]",
    ])
    assert changes["train.iterations"] == 7  # the last of a repeated key wins
    assert changes["out_dir"] == "2024"  # a string field takes the text as given
    assert changes["objective.metric_name"] == "x"
    changes.pop("objective.metric_name")  # (a metric name needs a loss of one's own)
    cfg = base.override(changes)
    assert (cfg.task.family, cfg.task.shots, cfg.model.hidden) == ("linear", 3, [8, 8])
    assert cfg.task.options == {"slope_range": [0.5, 1.0]}
    assert cfg.algorithm.inner_lr == 0.1 and cfg.algorithm.lr_mode == "per_element"
    assert cfg.execution.vectorize == "loop" and cfg.train.iterations == 7 and cfg.eval.shots is None
    assert cfg.out_dir == "2024" and cfg.train.loggers == []


def test_set_of_another_algorithm_takes_its_options():
    cfg = Config().override(cli_changes(Config(), ["algorithm.name=imaml", "algorithm.reg_lambda=0.5"]))
    assert cfg.algorithm.name == "imaml" and cfg.algorithm.reg_lambda == 0.5
    with pytest.raises(ConfigError, match=r"did you mean 'algorithm.reg_lambda'"):
        cli_changes(Config(), ["algorithm.name=imaml", "algorithm.reg_lamda=0.5"])
    with pytest.raises(ConfigError, match=r"algorithm.name=mam is invalid: choose one of"):
        cli_changes(Config(), ["algorithm.name=mam"])


@pytest.mark.parametrize(("item", "message"), [
    ("train.iteration=5", "did you mean 'train.iterations'"),
    ("iterations=5", "did you mean 'train.iterations'"),
    ("trian.iterations=5", "did you mean 'train.iterations'"),
    ("task.sampling.tset.within_alphabet=true", "did you mean 'task.sampling.test.within_alphabet'"),
    ("train.iterations", "give KEY=VALUE"),
])
def test_unknown_keys_name_the_nearest(item, message):
    with pytest.raises(ConfigError, match=message):
        cli_changes(Config(), [item])


def test_values_are_checked_as_a_files_are():
    with pytest.raises(ConfigError, match=r"train\.iterations = 'many' has the wrong type"):
        Config().override(cli_changes(Config(), ["train.iterations=many"]))
    with pytest.raises(ConfigError, match=r"task.shots = 0 is invalid"):
        Config().override(cli_changes(Config(), ["task.shots=0"]))


def test_rl_config_too():
    cfg = RLConfig().override(cli_changes(RLConfig(), ["train.max_kl=0.02", "env.name=cheetah-vel",
                                                       "env.options.low=0.5"], "innerloop rl train"))
    assert cfg.train.max_kl == 0.02 and cfg.env.name == "cheetah-vel" and cfg.env.options == {"low": 0.5}
    with pytest.raises(ConfigError, match=r"did you mean 'train.max_kl'.*innerloop rl train --help"):
        cli_changes(RLConfig(), ["train.maxkl=1"], "innerloop rl train")


def test_every_field_is_listed_with_its_type_and_doc(capsys):
    keys = {f.key for f in config_fields(Config())}
    assert {"task.family", "task.sampling.test.within_alphabet", "task.split_options.lake_val_alphabets",
            "algorithm.inner_lr", "execution.device", "train.loggers", "eval.shots", "objective.loss",
            "out_dir"} <= keys
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--set KEY=VALUE" in out and "--logger NAME" in out
    assert 'train.iterations' in out and 'algorithm.inner_lr' in out and "float = 0.01" in out
    assert "task.split_options.lake_val_alphabets" in out and "imaml: " in out
    with pytest.raises(SystemExit):
        main(["rl", "train", "--help"])
    assert "train.max_kl" in capsys.readouterr().out


def test_config_show_prints_a_config_that_loads_back(tmp_path, capsys):
    assert main(["config", "show", "--set", "train.iterations=5", "--set", "task.family=linear",
                 "--set", "task.sampling.test.within_alphabet=true"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "shown.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg == Config().override({"train.iterations": 5, "task.family": "linear",
                                     "task.sampling.test.within_alphabet": True})
    assert main(["config", "show", "--format", "json", "--set", "eval.shots=null"]) == 0
    assert json.loads(capsys.readouterr().out)["eval"]["shots"] is None


def test_config_show_of_an_rl_file(tmp_path, capsys):
    path = tmp_path / "rl.toml"
    path.write_text("[train]\niterations = 3\n[env]\nname = \"nav2d\"\n")
    assert main(["config", "show", "--config", str(path), "--set", "train.max_kl=0.05"]) == 0
    out = capsys.readouterr().out
    assert "[policy]" in out and "max_kl = 0.05" in out and "iterations = 3" in out
    assert main(["config", "show", "--rl", "--set", "policy.hiden=[4]"]) == 2
    assert "did you mean 'policy.hidden'" in capsys.readouterr().err


def test_logger_flag_and_bad_set_fail_before_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--set", f"out_dir={out}", "--set", "train.iteration=3"]) == 2
    assert "did you mean 'train.iterations'" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["train", "--logger", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_to_toml_writes_nested_tables_and_comments_nulls():
    text = to_toml({"out_dir": "x", "task": {"a": None, "options": {}, "sub": {"b": [1, 2], "c": "q\"s"}}})
    assert text.startswith('out_dir = "x"\n') and "# a = null" in text and "options = {}" in text
    assert '[task.sub]\nb = [1, 2]\nc = "q\\"s"' in text


def test_logger_flags_set_train_loggers():
    from innerloop.cli import _parser, _resolved

    args = _parser().parse_args(["train", "--logger", "csv", "--logger", "jsonl", "--set", "train.loggers=[]"])
    assert _resolved(Config(), args, "innerloop train").train.loggers == ["csv", "jsonl"]  # the flag wins
    args = _parser().parse_args(["rl", "train", "--logger", "tensorboard"])
    assert _resolved(RLConfig(), args, "innerloop rl train").train.loggers == ["tensorboard"]


@pytest.mark.parametrize("command", [["train"], ["rl", "train"]])
def test_a_missing_logger_package_is_one_line_before_overwrite_deletes(tmp_path, monkeypatch, capsys, command):
    import sys

    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"an earlier run's checkpoint")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the extra were not installed
    assert main([*command, "--out", str(out), "--iterations", "1", "--logger", "tensorboard", "--overwrite",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("innerloop: error: ") and "pip install 'innerloop[tensorboard]'" in err
    assert (out / "last.pt").read_bytes() == b"an earlier run's checkpoint"  # refused before --overwrite
