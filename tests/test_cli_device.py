"""``--device`` and ``--precision`` on ``innerloop train`` / ``eval``: overrides of ``[execution]``,
refused before any work when the machine cannot run them."""

from __future__ import annotations

import pytest
import torch

from innerloop.cli import _parser, _run_overrides, main
from innerloop.training.config import Config
from innerloop.training.loop import meta_train
from innerloop.training.run import build_algorithm, build_family, identity

CUDA = torch.cuda.is_available()


def test_the_options_override_the_execution_section():
    args = _parser().parse_args(["train", "--device", "cuda:1", "--precision", "bf16", "--iterations", "3"])
    changes = _run_overrides(args)
    assert changes == {"train.iterations": 3, "execution.device": "cuda:1", "execution.precision": "bf16"}
    cfg = Config().override(changes)
    assert (cfg.execution.device, cfg.execution.precision) == ("cuda:1", "bf16")
    assert _run_overrides(_parser().parse_args(["train"])) == {}  # the config's own when not given
    rl = _parser().parse_args(["rl", "train", "--device", "cpu"])
    assert _run_overrides(rl) == {"execution.device": "cpu"}


def test_a_bad_precision_or_device_name_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--precision", "fp8"])
    assert main(["train", "--device", "gpu", "--out", str(tmp_path / "run")]) == 2
    assert "execution.device = 'gpu' is invalid" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
def test_a_missing_device_fails_before_any_work(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "execution.device = 'cuda', but this machine has no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fp16_on_the_cpu_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--precision", "fp16", "--out", str(out), "--no-progress"]) == 2
    assert "execution.precision = 'fp16' on the CPU is refused" in capsys.readouterr().err
    assert not out.exists()


def test_eval_on_a_chosen_device(tmp_path, capsys):
    cfg = Config().override({"model.hidden": [8], "train.iterations": 2, "train.meta_batch_size": 4,
                             "train.validate_every": 2, "train.val_tasks": 4, "execution.device": "cpu"})
    family = build_family(cfg)
    meta_train(build_algorithm(cfg, family), family, cfg.train, tmp_path, identity=identity(cfg, "maml"),
               progress=False)
    ckpt = str(tmp_path / "best.pt")
    small = ["--tasks", "4", "--steps", "1", "--shots", "5", "--queries", "5"]
    assert main(["eval", ckpt, *small, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "device cpu, precision fp32, BatchNorm: none" in out and "| maml |" in out
    if not CUDA:
        assert main(["eval", ckpt, *small, "--device", "cuda"]) == 2
        assert "execution.device = 'cuda', but this machine has no CUDA device" in capsys.readouterr().err
    assert main(["eval", ckpt, *small, "--device", "cpu", "--precision", "fp16"]) == 2
    assert "fp16" in capsys.readouterr().err
