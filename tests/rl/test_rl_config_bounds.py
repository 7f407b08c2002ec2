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
