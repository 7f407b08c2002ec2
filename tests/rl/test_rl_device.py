"""Meta-RL on the configured device: the policy, the episodes' tensors, the inner and outer steps,
a resume and the test all stay there (the environments step on the host); a missing device is refused
before any work."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from innerloop.cli import main
from innerloop.rl.config import RLConfig, rl_config_from_dict
from innerloop.rl.train import build_algorithm, build_env_family, meta_test_rl, meta_train_rl, rl_identity, run_rl
from innerloop.training.checkpoint import load_checkpoint
from innerloop.training.config import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from devicecheck import DeviceChecker

CUDA = torch.cuda.is_available()
NO_CUDA = "execution.device = 'cuda', but this machine has no CUDA device"


def _cfg(tmp_path, **changes) -> RLConfig:
    return RLConfig().override({"env.horizon": 6, "policy.hidden": [8], "algorithm.rollouts": 2,
                                "train.meta_batch_size": 2, "train.checkpoint_every": 1, "eval.test_tasks": 2,
                                "eval.rollouts": 2, "eval.steps": 1, "execution.device": "cpu",
                                "out_dir": str(tmp_path), **changes})


@pytest.mark.parametrize("optimizer", ["trpo", "ppo"])
def test_training_resume_and_testing_stay_on_the_device(tmp_path, optimizer):
    cfg = _cfg(tmp_path, **{"train.optimizer": optimizer})
    family = build_env_family(cfg)
    first, resumed = build_algorithm(cfg, family), build_algorithm(cfg, family)
    with DeviceChecker("cpu"):
        for alg, iterations in ((first, 2), (resumed, 3)):
            meta_train_rl(alg, family, cfg.override({"train.iterations": iterations}).train, 2, tmp_path,
                          identity=rl_identity(cfg, "maml"), progress=False, device="cpu")
        res = meta_test_rl(resumed, family, 2, 1, 2, device="cpu")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3
    assert len(res.per_step) == 2


def test_the_device_is_a_checked_config_key():
    assert RLConfig().execution.device == "auto"
    assert rl_config_from_dict({"execution": {"device": "cuda:0"}}).execution.device == "cuda:0"
    with pytest.raises(ConfigError, match=re.escape("execution.device = 'tpu' is invalid")):
        rl_config_from_dict({"execution": {"device": "tpu"}})
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'execution.precision'")):
        rl_config_from_dict({"execution": {"precision": "bf16"}})
    assert "execution" not in rl_identity(_cfg(Path(".")), "maml")  # a run resumes on another device


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
def test_a_missing_device_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match=re.escape(NO_CUDA)):
        run_rl(_cfg(tmp_path / "run", **{"execution.device": "cuda"}), progress=False)
    assert not (tmp_path / "run").exists()
    assert main(["rl", "train", "--device", "cuda", "--out", str(tmp_path / "cli"), "--no-progress"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
