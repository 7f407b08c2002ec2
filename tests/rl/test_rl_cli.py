"""``innerloop rl train`` / ``rl eval`` end to end on tiny 2D navigation runs: results, exact resume, errors."""

from __future__ import annotations

import json

import pytest
import torch

from innerloop.cli import main
from innerloop.rl.config import RLConfig, load_rl_config, rl_config_from_dict
from innerloop.rl.plots import plot_rl_run
from innerloop.rl.train import build_algorithm, load_rl_checkpoint, run_rl
from innerloop.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from innerloop.training.config import ConfigError

pytestmark = pytest.mark.slow  # several processes, real data or whole runs: skipped by `make test-quick`

TINY = """
out_dir = "{out}"
[env]
horizon = 8
[policy]
hidden = [8]
[algorithm]
rollouts = 3
[train]
iterations = {iterations}
meta_batch_size = 3
checkpoint_every = 1
fisher_subsample = 0.5
optimizer = "{optimizer}"
[eval]
test_tasks = 3
rollouts = 3
steps = 2
pretrain_iterations = 1
plot_tasks = 2
"""


def write(tmp_path, name, iterations=3, optimizer="trpo"):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(out=tmp_path / name, iterations=iterations, optimizer=optimizer))
    return path


def test_train_writes_results_plots_and_checkpoints(tmp_path, capsys):
    assert main(["rl", "train", "--config", str(write(tmp_path, "run")), "--no-progress"]) == 0
    out = tmp_path / "run"
    table = capsys.readouterr().out
    assert "| maml |" in table and "| pretrained |" in table and "| random init |" in table
    report = json.loads((out / "results.json").read_text())
    assert set(report["runs"]) == {"maml", "pretrained", "random init"}
    for run in report["runs"].values():
        assert len(run["test"]["per_step"]) == 3 and run["test"]["tasks"] == 3
    for name in ("results.md", "adaptation.png", "trajectories.png", "last.pt", "metrics.jsonl",
                 "pretrain/last.pt"):
        assert (out / name).exists(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]
    assert {"return_0", "return_1", "kl", "step_fraction"} <= set(json.loads(lines[0]))
    assert main(["rl", "eval", str(out / "last.pt"), "--tasks", "2", "--steps", "1", "--rollouts", "2"]) == 0
    assert "return after 1 step" in capsys.readouterr().out
    assert main(["rl", "eval", str(out / "last.pt"), "--tasks", "2", "--steps", "2", "--rollouts", "4",
                 "--lr", "0.2", "--later-lr", "0.05", "--batch-steps", "10"]) == 0
    printed = capsys.readouterr().out
    assert "lr 0.2 then 0.05" in printed and "the first episodes holding 10 steps (at most 4)" in printed


@pytest.mark.parametrize("optimizer", ["trpo", "ppo"])
def test_a_resumed_run_equals_the_uninterrupted_run(tmp_path, optimizer):
    def run(name, iterations):
        cfg = load_rl_config(write(tmp_path, name, iterations=iterations, optimizer=optimizer))
        cfg = cfg.override({"eval.pretrain": False, "eval.random_init": False, "eval.steps": 0})
        run_rl(cfg, progress=False)

    run("straight", 3)
    run("resumed", 2)
    run("resumed", 3)  # the same command with more iterations continues from last.pt
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 3
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
    log = [json.loads(ln) for ln in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_a_checkpoint_in_the_0_1_0_layout_still_resumes(tmp_path):
    """innerloop 0.1.0's RL checkpoints held no best-on-validation entries and no RNG state."""
    def run(name, iterations):
        cfg = load_rl_config(write(tmp_path, name, iterations=iterations))
        cfg = cfg.override({"eval.pretrain": False, "eval.random_init": False, "eval.steps": 0})
        run_rl(cfg, progress=False)

    run("straight", 3)
    run("old", 2)
    payload = load_checkpoint(tmp_path / "old" / "last.pt")
    old = {k: v for k, v in payload.items() if k not in ("format", "best_val", "best_step", "torch_rng",
                                                           "config")}
    assert set(old) == {"algorithm", "identity", "step", "state", "optimizer", "wall_s"}
    save_checkpoint(tmp_path / "old" / "last.pt", old)
    run("old", 3)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "old" / "last.pt")
    assert a["step"] == b["step"] == 3 and a["algorithm"] == b["algorithm"] == "maml-rl"
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    path = write(tmp_path, "run", iterations=1)
    cfg = load_rl_config(path).override({"eval.pretrain": False, "eval.random_init": False})
    run_rl(cfg, progress=False)
    cfg = cfg.override({"algorithm.inner_lr": 0.5})
    with pytest.raises(CheckpointError, match="another configuration"):
        run_rl(cfg, progress=False)
    run_rl(cfg, progress=False, overwrite=True)  # the way out the message names


@pytest.mark.parametrize(("data", "match"), [
    ({"train": {"max_kl": 0.0}}, "train.max_kl = 0.0 is invalid"),
    ({"algorithm": {"inner_lr": -1.0}}, "algorithm.inner_lr = -1.0 is invalid"),
    ({"env": {"name": "ant"}}, "env.name = 'ant' is not allowed"),
    ({"train": {"optimizer": "adam"}}, "choose one of \\['trpo', 'ppo'\\]"),
    ({"train": {"lr": 1}}, "unknown config key 'train.lr'"),
    ({"eval": {"test_tasks": 1}}, "eval.test_tasks = 1 is invalid"),
    ({"algorithm": {"rollouts": "20"}}, "expected an integer"),
])
def test_bad_configs_are_refused_with_the_key_named(data, match):
    with pytest.raises(ConfigError, match=match):
        rl_config_from_dict(data)


def test_cli_errors_exit_2_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmeta_batch_size = 0\n")
    assert main(["rl", "train", "--config", str(bad)]) == 2
    assert "train.meta_batch_size = 0" in capsys.readouterr().err
    supervised = tmp_path / "sup.toml"
    supervised.write_text("[task]\nfamily = 'sinusoid'\n")
    assert main(["rl", "train", "--config", str(supervised)]) == 2
    assert "innerloop train --config" in capsys.readouterr().err
    options = tmp_path / "opt.toml"
    options.write_text("[env]\noptions = { radius = 2 }\n")
    assert main(["rl", "train", "--config", str(options), "--out", str(tmp_path / "o")]) == 2
    assert "env.options" in capsys.readouterr().err
    assert main(["rl", "eval", str(tmp_path / "missing.pt")]) == 2


def test_default_config_is_the_papers_navigation_setup():
    cfg = RLConfig().validate()
    a = cfg.algorithm
    assert (cfg.env.name, cfg.policy.hidden, a.inner_lr, a.rollouts) == ("nav2d", [100, 100], 0.1, 20)
    assert (cfg.train.meta_batch_size, cfg.train.max_kl, cfg.train.optimizer) == (20, 0.01, "trpo")
    for name in ("rl_nav2d", "rl_cheetah_vel", "rl_cheetah_dir"):
        load_rl_config(f"configs/{name}.toml")
    code = load_rl_config("configs/rl_nav2d_maml_code.toml")  # the paper's code: step 0.5, 4,000-step test batches
    assert (code.algorithm.inner_lr, code.train.meta_batch_size, code.train.iterations) == (0.5, 40, 100)
    assert (code.eval.batch_steps, code.eval.inner_lr, code.eval.later_lr) == (4000, 0.5, 0.25)


def test_the_learning_curve_is_logged_without_changing_the_training(tmp_path):
    def run(name, curve_every):
        cfg = load_rl_config(write(tmp_path, name, iterations=3))
        cfg = cfg.override({"eval.pretrain": False, "eval.random_init": False, "eval.curve_every": curve_every,
                            "eval.curve_tasks": 2})
        return run_rl(cfg, progress=False)

    plain, curved = run("plain", None), run("curved", 2)
    a = load_checkpoint(tmp_path / "plain" / "last.pt")["state"]
    b = load_checkpoint(tmp_path / "curved" / "last.pt")["state"]
    for k, v in a.items():
        assert torch.equal(v, b[k]), k  # the curve's rollouts leave the training as it was
    log = [json.loads(ln) for ln in (tmp_path / "curved" / "metrics.jsonl").read_text().splitlines()]
    assert ["test_return_2" in r for r in log] == [True, False, True]  # iterations 0 and 2 (before updates)
    assert not any("test_return_0" in r for r in
                   (json.loads(ln) for ln in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()))
    # iteration 0 is the initial policy: its curve point is meta-testing on the first two test tasks
    cfg = rl_config_from_dict(curved.report["config"])
    fresh = build_algorithm(cfg, curved.test_family)
    scores, _ = fresh.evaluate(curved.test_family, "test", range(2), 2, 3, None)
    assert log[0]["test_return_1"] == pytest.approx(scores.mean(0)[1].item(), rel=1e-6)
    written = plot_rl_run(curved, cfg)
    assert tmp_path / "curved" / "curve.png" in written and (tmp_path / "curved" / "curve.png").exists()
    assert all(p.name != "curve.png" for p in plot_rl_run(plain, rl_config_from_dict(plain.report["config"])))


def test_the_trajectory_plot_adapts_as_the_table_does(tmp_path, monkeypatch):
    """The trajectories are those of the run's test protocol: its step sizes and its batches of steps."""
    from innerloop.rl.maml import PolicyMAML

    cfg = load_rl_config(write(tmp_path, "run", iterations=1)).override(
        {"eval.pretrain": False, "eval.random_init": False, "eval.batch_steps": 10, "eval.later_lr": 0.05})
    result = run_rl(cfg, progress=False)
    calls, real = [], PolicyMAML.evaluate

    def spy(self, family, split, indices, steps, rollouts, lr=None, keep_episodes=False, batch_steps=None):
        calls.append((list(indices), steps, rollouts, lr, batch_steps))
        return real(self, family, split, indices, steps, rollouts, lr, keep_episodes, batch_steps)

    monkeypatch.setattr(PolicyMAML, "evaluate", spy)
    assert tmp_path / "run" / "trajectories.png" in plot_rl_run(result, cfg)
    assert calls == [([0, 1], 2, 3, [cfg.algorithm.inner_lr, 0.05], 10)]


def test_a_0_2_0_navigation_checkpoint_is_tested_on_its_own_dynamics_and_not_resumed(tmp_path):
    """0.2.0's 2D navigation took the action as the velocity and ended episodes in a circle."""
    cfg = load_rl_config(write(tmp_path, "old", iterations=1)).override(
        {"eval.pretrain": False, "eval.random_init": False, "eval.steps": 0})
    run_rl(cfg, progress=False)
    path = tmp_path / "old" / "last.pt"
    payload = load_checkpoint(path)
    assert payload["identity"]["nav2d_dynamics"] == "maml-code"
    del payload["identity"]["nav2d_dynamics"]
    save_checkpoint(path, payload)
    _, _, family = load_rl_checkpoint(path)
    assert (family.action_scale, family.termination) == (1.0, "euclidean")
    _, _, family = load_rl_checkpoint(path, {"env.options.action_scale": 0.5})  # an option given wins
    assert (family.action_scale, family.termination) == (0.5, "euclidean")
    with pytest.raises(CheckpointError, match="nav2d_dynamics"):
        run_rl(cfg.override({"train.iterations": 2}), progress=False)
