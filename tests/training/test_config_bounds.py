"""Sizes are checked against this machine's memory before any allocation, and config files that are a
folder or empty are refused with what to do (issue 13)."""

from __future__ import annotations

import pytest

from innerloop.cli import main
from innerloop.training.config import ConfigError, config_from_dict, load_config, memory_budget


@pytest.mark.parametrize("table, key", [
    ({"train": {"meta_batch_size": 10**9}}, "train.meta_batch_size"),
    ({"eval": {"shots": 10**9}}, "eval.shots"),
    ({"model": {"hidden": [2 * 10**9]}}, "model.hidden"),
    ({"task": {"family": "omniglot", "ways": 5}, "model": {"name": "conv4"}, "algorithm": {"name": "maml"},
      "eval": {"baseline": False, "shots": 10**7}}, "eval.shots"),
])
def test_sizes_that_cannot_fit_are_refused_with_the_estimate(table, key):
    with pytest.raises(ConfigError, match=rf"{key} = .* is invalid: it implies about [0-9.]+ GiB of .*, more than "
                                          r"this machine's [0-9.]+ GiB of memory; make it smaller"):
        config_from_dict(table)


def test_task_counts_are_bounded():
    for key in ("train.val_tasks", "eval.test_tasks"):
        section, name = key.split(".")
        with pytest.raises(ConfigError, match=rf"{key} = 1000000000 is invalid: at most 1,000,000 tasks"):
            config_from_dict({section: {name: 10**9}})


def test_the_defaults_and_shipped_sizes_fit():
    assert memory_budget() > 2**30
    config_from_dict({})
    config_from_dict({"train": {"meta_batch_size": 10_000}, "eval": {"shots": 1000}})


def test_a_folder_or_an_empty_file_as_config(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder; give a \.toml or \.json file in it"):
        load_config(tmp_path)
    empty = tmp_path / "empty.toml"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="is empty; give the settings to change"):
        load_config(empty)


def test_the_cli_refuses_an_absurd_eval_size_in_one_line(tmp_path, capsys):
    from innerloop.training.config import Config
    from innerloop.training.loop import meta_train
    from innerloop.training.run import build_algorithm, build_family, identity

    cfg = Config().override({"model.hidden": [8], "train.iterations": 1, "train.meta_batch_size": 2,
                             "train.validate_every": 1, "train.val_tasks": 2})
    family = build_family(cfg)
    meta_train(build_algorithm(cfg, family), family, cfg.train, tmp_path, identity=identity(cfg, "maml"),
               progress=False)
    assert main(["eval", str(tmp_path / "last.pt"), "--shots", "1000000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.shots = 1000000000 is invalid: it implies about" in err[0]


def test_an_unknown_task_option_is_one_clean_line(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[task]\noptions = { amplitud_range = [0.1, 5.0] }\n')
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task.options = {'amplitud_range': [0.1, 5.0]} is invalid for task.family = " \
        "'sinusoid'" in err[0] and "amplitud_range" in err[0]


def test_evaluation_sizes_the_data_cannot_serve_name_the_eval_keys(fewshot_folder):
    from innerloop.training.config import config_from_dict
    from innerloop.training.run import build_family

    cfg = config_from_dict({"task": {"family": "image-folder", "data_root": str(fewshot_folder), "ways": 3,
                                     "shots": 1, "queries": 2}, "model": {"name": "conv4"},
                            "eval": {"baseline": False}})
    with pytest.raises(ConfigError, match=r"eval\.shots, eval\.queries and eval\.ways ask for 3-way tasks of "
                                          r"5 \+ 100 examples per class, which the data cannot serve"):
        build_family(cfg, 5, 100)


def test_a_full_disk_is_one_line_with_the_way_out(tmp_path, capsys, monkeypatch):
    import errno

    import innerloop.training.loop as loop

    def full(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(loop, "save_checkpoint", full)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f'out_dir = "{tmp_path / "run"}"\n[model]\nhidden = [8]\n[train]\niterations = 2\n'
                   "meta_batch_size = 2\nvalidate_every = 2\nval_tasks = 2\n[eval]\nbaseline = false\n")
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device writing" in err[0] and "run the same command again" in err[0]


@pytest.mark.parametrize("table, key", [
    ({"algorithm": {"inner_lr": float("inf")}}, "algorithm.inner_lr"),
    ({"train": {"outer_lr": float("inf")}}, "train.outer_lr"),
    ({"train": {"dist_timeout_s": float("inf")}}, "train.dist_timeout_s"),
    ({"train": {"grad_clip": float("nan")}}, "train.grad_clip"),
])
def test_non_finite_numbers_are_refused(table, key):
    with pytest.raises(ConfigError, match=rf"{key} = (inf|nan) is invalid"):
        config_from_dict(table)


def test_another_configs_checkpoint_is_refused_naming_the_difference(tmp_path, capsys):
    cfg = tmp_path / "a.toml"
    body = ('out_dir = "{out}"\n[model]\nhidden = [8]\n[algorithm]\ninner_lr = {lr}\n[train]\niterations = 2\n'
            "meta_batch_size = 2\nvalidate_every = 2\nval_tasks = 2\n[eval]\nbaseline = false\ntest_tasks = 4\n"
            "steps = 1\nreport_steps = [0, 1]\nplot_tasks = 0\n")
    cfg.write_text(body.format(out=tmp_path / "run", lr=0.01))
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    cfg.write_text(body.format(out=tmp_path / "run", lr=0.02).replace("iterations = 2", "iterations = 4"))
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "inner_lr" in err and "0.01" in err and "0.02" in err
