"""Devices and precision through the run skeleton: every tensor of a meta-iteration, an evaluation and
a resume on the configured device (checked on a CPU machine by :mod:`devicecheck`), a missing device or
fp16 on a CPU refused before any work, the fp16 loss scale (skip, halve, checkpointed, exact resume),
checkpoints written on a GPU loading on the CPU, float64 models on float32 families."""

from __future__ import annotations

import io
import json
import re
import threading

import pytest
import torch
import torch.serialization
from devicecheck import DeviceChecker

from innerloop.adapt import current_loss_scale
from innerloop.algorithms.maml import MAML
from innerloop.execution import Execution
from innerloop.models.mlp import MLP
from innerloop.training.checkpoint import load_checkpoint
from innerloop.training.config import Config, ConfigError, config_from_dict
from innerloop.training.device import BF16_CPU_WARNING, LossScaler, to_device
from innerloop.training.evaluate import meta_test
from innerloop.training.loop import meta_train
from innerloop.training.run import build_algorithm, build_family, identity, run

CUDA = torch.cuda.is_available()
NO_CUDA = "execution.device = 'cuda', but this machine has no CUDA device"


def _cfg(tmp_path, **changes) -> Config:
    return Config().override({"model.hidden": [8], "train.meta_batch_size": 4, "train.validate_every": 2,
                              "train.val_tasks": 4, "train.log_every": 1, "execution.device": "cpu",
                              "out_dir": str(tmp_path), **changes})


def _train(cfg, run_dir, iterations, algorithm=None):
    family = build_family(cfg)
    alg = algorithm or build_algorithm(cfg, family)
    meta_train(alg, family, cfg.override({"train.iterations": iterations}).train, run_dir,
               identity=identity(cfg, cfg.algorithm.name), progress=False)
    return alg, family


# -- the checker itself: it must fail on this CPU-only machine --------------------------------------------
def test_the_checker_catches_a_tensor_made_without_a_device():
    with pytest.raises(AssertionError, match=r"test_device.py:\d+ .*torch.zeros without a device"), \
            DeviceChecker("cpu"):
        torch.zeros(3)  # a planted bug: on a GPU run this lands on the CPU


def test_the_checker_catches_an_operator_off_the_device():
    x = torch.ones(3, device="cpu").to("meta")
    with pytest.raises(AssertionError, match=r"aten.mul on meta"), DeviceChecker("cpu"):
        x * torch.ones((), device="cpu")


def test_the_checker_sees_task_threads_and_passes_explicit_devices():
    def work() -> None:
        torch.ones(2, device="cpu") + torch.full((2,), 1.0, device="cpu")
        torch.empty(2)

    with pytest.raises(AssertionError, match=r"\(work\): torch.empty without a device") as err, \
            DeviceChecker("cpu"):
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert "torch.ones" not in str(err.value) and "torch.full" not in str(err.value)


# -- every tensor on the configured device ---------------------------------------------------------------
@pytest.mark.parametrize("execution", [{}, {"execution.vectorize": "loop", "execution.task_threads": 2}],
                         ids=["vmap", "loop-threads"])
def test_meta_training_resume_and_testing_stay_on_the_device(tmp_path, execution):
    cfg = _cfg(tmp_path, **execution)
    family = build_family(cfg)
    first, resumed = build_algorithm(cfg, family), build_algorithm(cfg, family)  # built before: on the CPU
    with DeviceChecker("cpu"):
        _train(cfg, tmp_path, 3, first)
        _train(cfg, tmp_path, 5, resumed)  # resumes from last.pt: state, optimiser, RNG
        res = meta_test(resumed, family, "test", 6, steps=2)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 5
    assert len(res.per_step) == 3


@pytest.mark.parametrize("name", ["maml", "protonet"])
def test_image_models_stay_on_the_device(tmp_path, fewshot_folder, name):
    cfg = _cfg(tmp_path, **{"task.family": "image-folder", "task.data_root": str(fewshot_folder),
                            "task.image_size": 16, "task.ways": 3, "task.shots": 1, "task.queries": 2,
                            "model.name": "conv4", "model.filters": 4, "algorithm.name": name,
                            "eval.baseline": False, "execution.task_threads": 2})
    family = build_family(cfg)
    alg = build_algorithm(cfg, family)
    with DeviceChecker("cpu"):
        _train(cfg, tmp_path, 2, alg)
        meta_test(alg, family, "test", 4, steps=1)


# -- resolved once, before any work ----------------------------------------------------------------------
@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
def test_a_missing_device_fails_before_any_training(tmp_path):
    cfg = _cfg(tmp_path / "run", **{"execution.device": "cuda"})
    with pytest.raises(ConfigError, match=re.escape(NO_CUDA)):
        run(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="device = 'cuda:0', but this machine has no CUDA device"):
        MAML(MLP(1, 1, (8,)), "regression", execution=Execution(device="cuda:0"))  # refused when built


def test_an_algorithm_with_fp16_on_the_cpu_is_refused_when_built():
    with pytest.raises(ValueError, match=re.escape("precision = 'fp16' on the CPU is refused")):
        MAML(MLP(1, 1, (8,)), "regression", device="cpu", precision="fp16")


def test_fp16_on_the_cpu_is_refused_before_any_work(tmp_path):
    cfg = _cfg(tmp_path / "run", **{"execution.precision": "fp16"})
    with pytest.raises(ConfigError, match=re.escape("execution.precision = 'fp16' on the CPU is refused")):
        run(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_device_and_precision_are_config_keys_checked_when_read():
    cfg = config_from_dict({"execution": {"device": "cpu", "precision": "bf16"}})
    assert (cfg.execution.device, cfg.execution.precision) == ("cpu", "bf16")
    assert Config().override({"execution.device": "cuda:1"}).execution.device == "cuda:1"  # checked at run time
    for table, message in [({"device": 0}, "execution.device = 0 has the wrong type"),
                           ({"device": "gpu"}, "execution.device = 'gpu' is invalid"),
                           ({"precision": "fp8"}, "execution.precision = 'fp8' is not allowed")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"execution": table})


def test_bf16_on_the_cpu_warns_and_trains(tmp_path):
    cfg = _cfg(tmp_path, **{"execution.precision": "bf16"})
    with pytest.warns(UserWarning, match="bfloat16 autocast is emulated"):
        alg, _ = _train(cfg, None, 2)
    assert "emulated" in BF16_CPU_WARNING
    assert all(p.dtype == torch.float32 for p in alg.parameters())  # parameters keep their dtype


def test_a_batch_moves_only_when_it_must():
    batch = build_family(Config()).batch("train", range(2))
    assert to_device(batch, torch.device("cpu")) is batch


# -- the results name the device, the precision and the BatchNorm policy ----------------------------------
def test_results_name_device_precision_and_batch_norm(tmp_path):
    cfg = _cfg(tmp_path, **{"train.iterations": 2, "eval.baseline": False, "eval.test_tasks": 4,
                            "eval.steps": 1, "eval.report_steps": [0, 1]})
    result = run(cfg, progress=False)
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["execution"] == {"device": "cpu", "precision": "fp32", "batch_norm": "none", "model_norm": None}
    assert "device cpu, precision fp32, BatchNorm: none" in (tmp_path / "results.md").read_text()
    assert "BatchNorm: none" in result.table


def test_image_results_name_the_batch_norm_policy(tmp_path, fewshot_folder):
    cfg = _cfg(tmp_path, **{"task.family": "image-folder", "task.data_root": str(fewshot_folder),
                            "task.image_size": 16, "task.ways": 3, "task.shots": 1, "task.queries": 2,
                            "model.name": "conv4", "model.filters": 4, "eval.baseline": False,
                            "train.iterations": 2, "eval.test_tasks": 4, "eval.steps": 1, "eval.shots": 1,
                            "eval.queries": 2, "eval.report_steps": [0, 1]})
    run(cfg, progress=False)
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["execution"]["batch_norm"] == "batch statistics (transductive)"
    assert report["execution"]["model_norm"] == "batch"
    assert "BatchNorm: batch statistics (transductive)" in (tmp_path / "results.md").read_text()


# -- fp16's dynamic loss scale ---------------------------------------------------------------------------
def test_the_loss_scale_halves_skips_and_grows():
    s = LossScaler(scale=8.0, growth_interval=3)
    assert not s.update(False) and s.scale == 4.0 and s.good_steps == 0
    assert s.update(True) and s.update(True) and s.scale == 4.0
    assert s.update(True) and s.scale == 8.0 and s.good_steps == 0
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t == s
    with pytest.raises(ValueError, match="loss scale must be a finite number > 0"):
        LossScaler(scale=float("inf"))


class Overflowing(MAML):
    """A stand-in for fp16 on a CPU: its meta-gradient overflows (inf) while the loss scale is above
    2**10, and records the scales it saw."""

    def meta_gradient(self, batch):
        scale = current_loss_scale()
        self.seen.append(scale)
        value = float("inf") if scale > 2**10 else 0.01
        grads = {n: torch.full_like(p, value) for n, p in self.trainable().items()}
        return grads, {"loss": 1.0, "mse": 1.0}

    def evaluate(self, batch, steps):
        zeros = torch.zeros(len(batch), steps + 1, device="cpu")
        return {"loss": zeros, "mse": zeros}


def _overflowing(cfg):
    torch.manual_seed(0)
    alg = Overflowing(MLP(1, 1, (8,)), "regression", execution=Execution(device="cpu", precision="fp16"))
    alg.seen = []
    return alg


def test_fp16_skips_overflowing_steps_halves_the_scale_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr("innerloop.training.device.check_precision", lambda precision, device: None)
    monkeypatch.setattr("innerloop.algorithms.base.check_precision", lambda precision, device: None)
    cfg = _cfg(tmp_path, **{"train.validate_every": 4})
    family = build_family(cfg)
    straight = _overflowing(cfg)
    start = {n: p.detach().clone() for n, p in straight.named_parameters()}
    meta_train(straight, family, cfg.override({"train.iterations": 9}).train, tmp_path / "a", progress=False)
    # 2**16 .. 2**11 overflow: six skipped steps (parameters untouched), then 2**10 for good
    assert straight.seen == [2.0**k for k in range(16, 10, -1)] + [2.0**10] * 3
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [1.0] * 6 + [0.0] * 3
    assert [r["loss_scale"] for r in rows] == straight.seen
    assert load_checkpoint(tmp_path / "a" / "last.pt")["extra"]["loss_scale"]["scale"] == 2.0**10
    moved = [n for n, p in straight.named_parameters() if not torch.equal(p, start[n])]
    assert moved  # the three good steps moved the parameters

    resumed = _overflowing(cfg)
    meta_train(resumed, family, cfg.override({"train.iterations": 4}).train, tmp_path / "b", progress=False)
    second = _overflowing(cfg)
    meta_train(second, family, cfg.override({"train.iterations": 9}).train, tmp_path / "b", progress=False)
    assert resumed.seen + second.seen == straight.seen  # the scale resumed from the checkpoint
    for (n, a), (_, b) in zip(straight.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_fp32_checkpoints_are_unchanged(tmp_path):
    _train(_cfg(tmp_path), tmp_path, 2)
    payload = load_checkpoint(tmp_path / "last.pt")
    assert "extra" not in payload and "cuda_rng" not in payload
    assert payload["torch_rng"].device.type == "cpu" and payload["torch_rng"].dtype == torch.uint8


# -- checkpoints across devices ----------------------------------------------------------------------------
def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    straight, _ = _train(cfg, tmp_path / "a", 4)
    _train(cfg, tmp_path / "b", 2)
    payload = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    buf = io.BytesIO()
    with monkeypatch.context() as m:  # every storage tagged as CUDA's, as a GPU run writes them
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(payload, buf)
    (tmp_path / "b" / "last.pt").write_bytes(buf.getvalue())
    if not CUDA:
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    resumed, _ = _train(cfg, tmp_path / "b", 4)  # state, optimiser and RNG state load on the CPU
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_resume_restores_the_cpu_rng_state(tmp_path):
    cfg = _cfg(tmp_path)
    _train(cfg, tmp_path, 2)
    saved = load_checkpoint(tmp_path / "last.pt")["torch_rng"]
    torch.manual_seed(123)  # anything else

    class Probe(MAML):
        def meta_gradient(self, batch):
            self.rng_at_start = getattr(self, "rng_at_start", torch.get_rng_state())
            return super().meta_gradient(batch)

    torch.manual_seed(cfg.train.seed)
    probe = Probe(MLP(1, 1, (8,)), "regression", execution=Execution(device="cpu"))
    _train(cfg, tmp_path, 3, probe)
    assert torch.equal(probe.rng_at_start, saved)


# -- dtype follows the model -------------------------------------------------------------------------------
def test_a_float64_model_trains_and_tests_on_a_float32_family(tmp_path):
    cfg = _cfg(tmp_path)
    family = build_family(cfg)
    assert family.batch("train", range(1)).support_x.dtype == torch.float32
    torch.manual_seed(0)
    alg = MAML(MLP(1, 1, (8,)).double(), "regression", execution=Execution(device="cpu"))
    start = {n: p.detach().clone() for n, p in alg.named_parameters()}
    meta_train(alg, family, cfg.override({"train.iterations": 4}).train, tmp_path, progress=False)
    res = meta_test(alg, family, "val", 8, steps=1)
    assert all(p.dtype == torch.float64 for p in alg.parameters())
    assert not all(torch.equal(p, start[n]) for n, p in alg.named_parameters())
    assert load_checkpoint(tmp_path / "best.pt")["state"]["model.head.weight"].dtype == torch.float64
    assert all(s.mean == s.mean and s.mean > 0 for s in res.per_step)  # finite MSEs
