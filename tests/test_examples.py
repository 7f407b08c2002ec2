"""Every program in ``examples/`` runs, on a tiny budget, as a user runs it (a subprocess, from another
folder), and prints what it measured; the pieces the new examples define (a task family, a model, a
synthetic image family) are checked in-process. ``tests/test_examples_lora.py`` holds the LoRA
example's float64 proof."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import innerloop
from innerloop import MAML

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# name: (tiny-budget arguments, text the output must hold); "{tmp}" is a temporary folder
SMOKE: dict[str, tuple[list[str], list[str]]] = {
    "any_model.py": ([], ["1. stock nn.BatchNorm2d", "5. devices", "meta_test on 50 tasks"]),
    "learned_inner_lr.py": (["--iterations", "2", "--test-tasks", "5", "--out", "{tmp}/lr.md"],
                            ["learned per element (Meta-SGD)", "(5 test tasks, 95% CI)"]),
    "learned_weight_decay.py": (["--iterations", "2", "--grid", "0", "0.3", "--test-tasks", "5",
                                 "--out", "{tmp}/wd.md"], ["**grid search**", "learned per tensor"]),
    "lora_meta_learning.py": (["--iterations", "2", "--meta-batch", "2", "--d-model", "16", "--layers", "1",
                               "--heads", "2", "--rank", "2", "--vocab", "32", "--length", "8",
                               "--test-tasks", "5", "--test-steps", "1"],
                              ["after meta-training", "frozen base unchanged: True"]),
    "own_model.py": (["--iterations", "2", "--test-tasks", "5"],
                     ["none for the frozen layer: True", "after meta-training", "frozen layer unchanged: True",
                      "BatchNorm buffers written: none"]),
    "own_family.py": (["--iterations", "2", "--test-tasks", "5"],
                      ["MAML (MLP 64-64): accuracy on 5 test tasks", "ProtoNet (MLP embedding, 16-d)"]),
    "anil_frozen_backbone.py": (["--data", "synthetic", "--pretrain-iterations", "2", "--iterations", "2",
                                 "--test-tasks", "5", "--width", "8", "--save-backbone", "{tmp}/body.pt"],
                                ["data: synthetic", "backbone saved", "adapted and meta-learned: ['head.weight', "
                                 "'head.bias']", "runs once per task and split: True",
                                 "frozen body unchanged: True"]),
}
# what an example may import from innerloop: the public API and the modules the README documents
PUBLIC_MODULES = {"innerloop", "innerloop.tasks", "innerloop.data", "innerloop.models", "innerloop.training",
                  "innerloop.execution", "innerloop.adapt", "innerloop.io"}


def run_example(name: str, args: list[str], tmp: Path, env: dict[str, str] | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python examples/<name> <args>`` from ``tmp`` (so the source tree is not the working folder)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *(a.format(tmp=tmp) for a in args)], cwd=tmp,
                         env=full_env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, f"{name} failed:\n{out.stdout}\n{out.stderr}"
    return out


def load(name: str) -> ModuleType:
    """The example file as a module (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_smoke_run():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SMOKE)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_examples_use_the_public_api(name):
    tree = ast.parse((EXAMPLES / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "innerloop":
            assert node.module in PUBLIC_MODULES, f"{name} imports from {node.module}"
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{name} imports private names {private} from {node.module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "innerloop":
                    assert alias.name in PUBLIC_MODULES, f"{name} imports {alias.name}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_example_runs(name, tmp_path):
    args, expected = SMOKE[name]
    out = run_example(name, args, tmp_path)
    for text in expected:
        assert text in out.stdout, f"{name}: {text!r} not in its output:\n{out.stdout}"
    assert not list(tmp_path.glob("*.tmp*")), "a half-written file was left behind"


@pytest.mark.slow
def test_anil_loads_a_saved_backbone_and_refuses_what_it_cannot_use(tmp_path):
    empty = {"INNERLOOP_DATA": str(tmp_path / "nothing")}
    tiny = ["--pretrain-iterations", "1", "--iterations", "1", "--test-tasks", "3", "--width", "4",
            "--meta-batch", "2"]
    run_example("anil_frozen_backbone.py", [*tiny, "--save-backbone", "{tmp}/body.pt"], tmp_path, empty)
    saved = torch.load(tmp_path / "body.pt", weights_only=True)
    assert all(k.startswith(("0.", "1.", "2.", "3.")) for k in saved)  # the conv blocks of Conv4.features
    out = run_example("anil_frozen_backbone.py", [*tiny, "--backbone", "{tmp}/body.pt"], tmp_path, empty)
    assert "backbone: loaded from" in out.stdout and "frozen body unchanged: True" in out.stdout
    # auto without Omniglot says so and falls back; --data omniglot without it ends in one line
    assert "no Omniglot under $INNERLOOP_DATA/omniglot" in out.stdout
    bad = run_example("anil_frozen_backbone.py", ["--data", "omniglot"], tmp_path, empty, check=False)
    assert bad.returncode == 1 and "--data omniglot: no Omniglot archives" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = run_example("anil_frozen_backbone.py", ["--backbone", "{tmp}/missing.pt"], tmp_path, empty, check=False)
    assert bad.returncode == 1 and "no such file" in bad.stderr


@pytest.mark.slow
def test_anil_on_omniglot_when_the_data_is_there(tmp_path):
    """With the real archives (CI has them in ``../shared/data``) ``--data auto`` uses Omniglot;
    without them it falls back to the synthetic images and says so."""
    env = os.environ.get("INNERLOOP_DATA")
    data = Path(env) if env else ROOT.parent / "shared" / "data"
    have = all((data / "omniglot" / f).is_file() for f in ("images_background.zip", "images_evaluation.zip"))
    out = run_example("anil_frozen_backbone.py", ["--pretrain-iterations", "1", "--iterations", "1",
                                                  "--test-tasks", "3", "--width", "4", "--meta-batch", "2"],
                      tmp_path, {"INNERLOOP_DATA": str(data.resolve())})
    assert ("data: Omniglot from" in out.stdout) == have, out.stdout
    assert "frozen body unchanged: True" in out.stdout


# -- the pieces, in-process ------------------------------------------------------------------------------
def test_own_family_follows_the_protocol():
    blobs = load("own_family").NoisyBlobs(ways=3, shots=2, queries=4, noise_dims=5, seed=1)
    a, b = blobs.task("val", 7), blobs.task("val", 7)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(blobs.task("test", 7).support_x, a.support_x)
    assert tuple(a.support_x.shape) == (6, 7) and tuple(a.query_x.shape) == (12, 7)
    assert a.support_y.tolist() == [0, 0, 1, 1, 2, 2] and a.support_x.dtype == torch.float32
    batch = blobs.batch("train", [0, 1, 2, 3])
    assert tuple(batch.support_x.shape) == (4, 6, 7) and blobs.objective == "classification" and blobs.seed == 1
    with pytest.raises(ValueError, match="unknown split"):
        blobs.task("training", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ways >= 2, got 1"):
        load("own_family").NoisyBlobs(ways=1)
    grads, metrics = MAML(innerloop.MLP(7, 3, (8,)), "classification", inner_lr=0.1).meta_gradient(batch)
    assert set(metrics) == {"loss", "accuracy"} and all(torch.isfinite(g).all() for g in grads.values())


def test_own_model_freezes_its_fourier_layer():
    model = load("own_model").FourierNet(features=4, hidden=6, seed=0)
    assert not model.fourier.weight.requires_grad and not model.fourier.bias.requires_grad
    batch = innerloop.Sinusoid(shots=5, queries=5).batch("train", range(3))
    assert tuple(model(batch.support_x[0]).shape) == (5, 1)
    before = {n: t.clone() for n, t in model.named_buffers()}
    maml = MAML(model, "regression", inner_lr=0.01)
    grads, _ = maml.meta_gradient(batch)
    assert sorted(k.removeprefix("model.") for k in grads) == sorted(
        n for n, t in model.named_parameters() if not n.startswith("fourier."))
    assert all(torch.equal(t, before[n]) for n, t in model.named_buffers())  # batch_norm="batch"


def test_synthetic_images_are_disjoint_classes():
    splits = load("anil_frozen_backbone").synthetic_splits(classes=(6, 3, 4), per_class=5, seed=0)
    assert {s: len(d) for s, d in splits.items()} == {"train": 6, "val": 3, "test": 4}
    family = innerloop.FewShotClassification(splits, ways=3, shots=1, queries=2, seed=0)
    task = family.task("test", 0)
    assert tuple(task.support_x.shape) == (3, 1, 28, 28) and tuple(task.query_x.shape) == (6, 1, 28, 28)
    assert float(task.support_x.min()) >= 0.0 and float(task.support_x.max()) <= 1.0
    again = load("anil_frozen_backbone").synthetic_splits(classes=(6, 3, 4), per_class=5, seed=0)
    assert torch.equal(family.task("train", 2).query_x,
                       innerloop.FewShotClassification(again, ways=3, shots=1, queries=2, seed=0)
                       .task("train", 2).query_x)
