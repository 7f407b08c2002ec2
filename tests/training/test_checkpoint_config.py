"""The run's whole config stored in its checkpoints: plain data, beside (not in) the identity, so a run
resumed with another ``[eval]`` section still resumes, and ``innerloop eval`` / ``innerloop rl eval``
take their defaults from it (falling back to results.json, then the training tasks, for older files)."""

from __future__ import annotations

import json

import pytest
import torch

from innerloop.cli import main
from innerloop.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from innerloop.training.config import Config
from innerloop.training.loop import meta_train
from innerloop.training.run import (
    STORED_CONFIG_SOURCE,
    build_algorithm,
    build_family,
    checkpoint_config,
    identity,
    load_for_eval,
    run,
    run_eval_settings,
)

TINY = {"model.hidden": [8], "train.iterations": 2, "train.meta_batch_size": 2, "train.validate_every": 2,
        "train.val_tasks": 4, "eval.test_tasks": 5, "eval.steps": 1, "eval.report_steps": [0, 1],
        "eval.baseline": False, "eval.shots": 3, "eval.queries": 7}


def test_the_run_config_is_stored_beside_the_identity_and_resume_ignores_it(tmp_path):
    cfg = Config().override({**TINY, "out_dir": str(tmp_path / "run")})
    run(cfg, progress=False)
    for name in ("best.pt", "last.pt"):
        payload = load_checkpoint(tmp_path / "run" / name)
        # what `innerloop config show --format json` prints
        assert payload["config"] == json.loads(json.dumps(cfg.to_dict()))
        assert "eval" not in payload["identity"] and payload["identity"] == identity(cfg, "maml")
    # more iterations and another [eval] section: the same run, resumed (not refused), its new config stored
    more = cfg.override({"train.iterations": 4, "eval.queries": 9, "eval.test_tasks": 6})
    run(more, progress=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["step"] == 4 and last["config"]["eval"]["queries"] == 9
    settings, source = run_eval_settings(tmp_path / "run" / "last.pt", last, checkpoint_config(last))
    assert source == STORED_CONFIG_SOURCE
    assert settings == {"ways": None, "shots": 3, "queries": 9, "test_tasks": 6, "steps": 1}


def test_the_stored_config_gives_eval_and_execution_but_not_the_machine(tmp_path):
    cfg = Config().override({**TINY, "out_dir": str(tmp_path), "execution.eval_chunk": 3,
                             "execution.device": "cpu"})
    family = build_family(cfg)
    alg = build_algorithm(cfg, family)
    meta_train(alg, family, cfg.train, tmp_path, identity=identity(cfg, "maml"), progress=False,
               run_config=cfg.to_dict())
    back, loaded = load_for_eval(tmp_path / "best.pt")
    assert (back.eval.queries, back.eval.test_tasks, back.execution.eval_chunk) == (7, 5, 3)
    assert back.execution.device == "auto" and back.eval.baseline is False  # this machine's, and trains nothing
    for (k, a), (_, b) in zip(alg.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.cpu(), b), k


def test_a_run_config_that_is_not_plain_data_is_refused_before_work(tmp_path):
    cfg = Config().override({**TINY, "out_dir": str(tmp_path)})
    family = build_family(cfg)
    alg = build_algorithm(cfg, family)
    with pytest.raises(TypeError, match=r"run_config\['x'\] is a builtins.object"):
        meta_train(alg, family, cfg.train, tmp_path, progress=False, run_config={"x": object()})
    with pytest.raises(TypeError, match="run_config must be a mapping"):
        meta_train(alg, family, cfg.train, tmp_path, progress=False, run_config=[1, 2])  # type: ignore[arg-type]
    assert not (tmp_path / "last.pt").exists()


def test_an_old_checkpoint_without_a_config_rebuilds_from_its_identity(tmp_path):
    cfg = Config().override({**TINY, "out_dir": str(tmp_path / "run")})
    run(cfg, progress=False)
    payload = load_checkpoint(tmp_path / "run" / "best.pt")
    del payload["config"], payload["format"]
    save_checkpoint(tmp_path / "old.pt", payload)  # no results.json beside it
    old = load_checkpoint(tmp_path / "old.pt")
    back = checkpoint_config(old)
    assert back.model.hidden == [8] and back.eval.queries == Config().eval.queries  # the defaults
    assert run_eval_settings(tmp_path / "old.pt", old, back)[1] == "the default test protocol"
    save_checkpoint(tmp_path / "run" / "old.pt", {k: v for k, v in old.items() if k != "format"})
    beside = load_checkpoint(tmp_path / "run" / "old.pt")
    settings, source = run_eval_settings(tmp_path / "run" / "old.pt", beside, checkpoint_config(beside))
    assert source == str(tmp_path / "run" / "results.json") and settings["queries"] == 7


@pytest.mark.parametrize("bad", [[1, 2], "eval = 3", {"eval": [1]}, {"model": "conv4"}, {7: 1}])
def test_a_corrupt_stored_config_is_refused_clearly(tmp_path, bad):
    cfg = Config().override({**TINY, "out_dir": str(tmp_path / "run")})
    run(cfg, progress=False)
    payload = load_checkpoint(tmp_path / "run" / "best.pt")
    payload["config"] = bad
    with pytest.raises(CheckpointError, match=r"stores a config .*not a table of settings"):
        checkpoint_config(payload, source="best.pt")
    payload["config"] = {**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "steps": -2}}
    with pytest.raises(CheckpointError, match=r"the config stored in best.pt is invalid: .*eval.steps"):
        checkpoint_config(payload, source="best.pt")


RL_TINY = """out_dir = "{out}"
[env]
horizon = 4
[policy]
hidden = [4]
[algorithm]
rollouts = 2
[train]
iterations = 1
meta_batch_size = 2
fisher_subsample = 0.5
[eval]
test_tasks = 3
rollouts = 2
steps = 1
pretrain = false
random_init = false
plot_tasks = 1
"""


@pytest.mark.slow
def test_rl_eval_takes_the_checkpoints_own_eval_section(tmp_path, capsys):
    out = tmp_path / "rl"
    config = tmp_path / "rl.toml"
    config.write_text(RL_TINY.format(out=out))
    assert main(["rl", "train", "--config", str(config), "--no-progress"]) == 0
    payload = load_checkpoint(out / "last.pt")
    assert payload["config"]["eval"]["test_tasks"] == 3 and "eval" not in payload["identity"]
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "last.pt").write_bytes((out / "last.pt").read_bytes())  # no results.json beside it
    capsys.readouterr()
    assert main(["rl", "eval", str(alone / "last.pt")]) == 0
    text = capsys.readouterr().out
    assert "return after 0..1 policy-gradient steps" in text and "2 episodes per step), 3 test tasks" in text
    assert STORED_CONFIG_SOURCE in text
    assert main(["rl", "eval", str(alone / "last.pt"), "--tasks", "2"]) == 0  # a flag beats the config
    assert "2 episodes per step), 2 test tasks" in capsys.readouterr().out
    # an older checkpoint: the results.json beside it, else the defaults
    del payload["config"], payload["format"]
    save_checkpoint(out / "old.pt", payload)
    assert main(["rl", "eval", str(out / "old.pt")]) == 0
    text = capsys.readouterr().out
    assert "3 test tasks" in text and str(out / "results.json") in text
    save_checkpoint(alone / "old.pt", payload)
    assert main(["rl", "eval", str(alone / "old.pt"), "--tasks", "2", "--steps", "0", "--rollouts", "2"]) == 0
    assert "from the defaults" in capsys.readouterr().out
    payload["config"] = ["not", "a", "table"]
    save_checkpoint(alone / "bad.pt", payload)
    assert main(["rl", "eval", str(alone / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert "not a table of settings" in err and "Traceback" not in err
    assert main(["rl", "eval", str(alone / "last.pt"), "--rollouts", "1"]) == 2
    assert "--rollouts 1 is invalid: it must be >= 2" in capsys.readouterr().err
