"""Meta-RL sizes are bounded against this machine's memory before any allocation (issue 13)."""

from __future__ import annotations

import pytest

from innerloop.rl.config import RLConfig
from innerloop.training.config import ConfigError


@pytest.mark.parametrize("key, value", [("train.meta_batch_size", 10**9), ("algorithm.rollouts", 10**9),
                                        ("eval.rollouts", 10**9), ("policy.hidden", [2 * 10**9])])
def test_sizes_that_cannot_fit_are_refused(key, value):
    with pytest.raises(ConfigError, match=r"is invalid: it implies about [0-9.]+ GiB of .*make it smaller"):
        RLConfig().override({key: value})


def test_test_tasks_are_capped_and_the_defaults_fit():
    with pytest.raises(ConfigError, match=r"eval\.test_tasks = 10000000 is invalid: at most 1,000,000"):
        RLConfig().override({"eval.test_tasks": 10**7})
    RLConfig()
    RLConfig().override({"env.name": "cheetah-vel", "train.meta_batch_size": 40})


def test_the_python_api_does_not_resume_another_set_up(tmp_path):
    from innerloop.rl.train import build_algorithm, build_env_family, meta_train_rl
    from innerloop.training.checkpoint import CheckpointError

    cfg = RLConfig().override({"env.horizon": 6, "policy.hidden": [8], "algorithm.rollouts": 2,
                               "train.meta_batch_size": 2, "train.checkpoint_every": 1, "execution.device": "cpu"})
    family = build_env_family(cfg)
    meta_train_rl(build_algorithm(cfg, family), family, cfg.override({"train.iterations": 1}).train, 2, tmp_path,
                  progress=False, device="cpu")
    meta_train_rl(build_algorithm(cfg, family), family, cfg.override({"train.iterations": 2}).train, 2, tmp_path,
                  progress=False, device="cpu")  # the same set-up resumes
    other = cfg.override({"algorithm.inner_lr": 0.5})
    with pytest.raises(CheckpointError, match="inner_lr"):
        meta_train_rl(build_algorithm(other, family), family, other.override({"train.iterations": 3}).train, 2,
                      tmp_path, progress=False, device="cpu")
