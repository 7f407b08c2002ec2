"""``innerloop eval CHECKPOINT``: settings from the run that wrote it (the config the checkpoint stores,
else its results.json, else its training tasks), the options users need, accuracy in percent; on a
checkpoint trained on a tiny fake Omniglot (lake split, one held-out validation alphabet)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from innerloop.cli import main
from innerloop.training.checkpoint import load_checkpoint, save_checkpoint

sys.path.insert(0, str(Path(__file__).parent / "data"))
from fewshot_fakes import write_fake_omniglot

pytestmark = pytest.mark.slow  # whole command-line runs: skipped by `make test-quick`


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ProtoNet checkpoint (2-way 1-shot, 2 queries) and its run folder, on the fake archives."""
    base = tmp_path_factory.mktemp("omniglot-eval")
    root = base / "omniglot"
    write_fake_omniglot(root)
    cfg = base / "run.toml"
    cfg.write_text(f"""
out_dir = "{base / 'run'}"
[task]
family = "omniglot"
data_root = "{root}"
split = "lake"
image_size = 16
ways = 2
shots = 1
queries = 2
[task.split_options]
lake_val_alphabets = 1
[model]
name = "conv4"
filters = 4
[algorithm]
name = "protonet"
[train]
iterations = 2
meta_batch_size = 2
validate_every = 2
val_tasks = 4
[eval]
baseline = false
test_tasks = 6
shots = 1
queries = 3
steps = 0
report_steps = [0]
""")
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    return base / "run"


def _table(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("| protonet |"))


def test_defaults_are_the_runs_own_and_accuracy_is_in_percent(trained, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert "Omniglot (lake split, 1 validation alphabets): 2-way 1-shot accuracy (%), 3 queries per class, " \
           "6 test tasks" in out
    assert "the checkpoint's own config" in out  # where the settings not given came from
    mean = float(re.search(r"\| protonet \| ([\d.]+) ± ", _table(out)).group(1))
    assert 1.0 < mean <= 100.0  # percent, not a fraction


def _without_config(src: Path, dst: Path) -> Path:
    """``src`` as a checkpoint of innerloop 0.1 writes it: the same weights and identity, no stored config."""
    payload = load_checkpoint(src)
    assert payload["config"]["eval"]["queries"] == 3  # the run's whole config, stored beside the identity
    del payload["config"], payload["format"]
    save_checkpoint(dst, payload)
    return dst


def test_the_checkpoint_keeps_its_own_eval_settings_without_the_report(trained, tmp_path, capsys):
    (tmp_path / "best.pt").write_bytes((trained / "best.pt").read_bytes())  # no results.json beside it
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "best.pt")]) == 0
    out = capsys.readouterr().out
    # eval.shots/queries/test_tasks of the run (1 + 3, 6 tasks; training used 2 queries), its lake test split
    assert "Omniglot (lake split, 1 validation alphabets): 2-way 1-shot accuracy (%), 3 queries per class, " \
           "6 test tasks" in out
    assert "from the checkpoint's own config" in out
    assert main(["eval", str(tmp_path / "best.pt"), "--tasks", "4", "--set", "eval.queries=1"]) == 0
    assert "2-way 1-shot accuracy (%), 1 queries per class, 4 test tasks" in capsys.readouterr().out  # flags first


def test_an_old_checkpoint_uses_the_report_then_its_training_tasks(trained, tmp_path, capsys):
    old = _without_config(trained / "best.pt", trained / "old.pt")  # beside the run's results.json
    try:
        capsys.readouterr()
        assert main(["eval", str(old)]) == 0
        out = capsys.readouterr().out
        assert "2-way 1-shot accuracy (%), 3 queries per class, 6 test tasks" in out
        assert str(trained / "results.json") in out
    finally:
        old.unlink()
    alone = _without_config(trained / "best.pt", tmp_path / "best.pt")  # no report either
    assert main(["eval", str(alone), "--tasks", "4"]) == 0
    out = capsys.readouterr().out
    assert "2-way 1-shot accuracy (%), 2 queries per class, 4 test tasks" in out
    assert "the checkpoint's training tasks" in out


@pytest.mark.parametrize("bad", [["not", "a", "table"], {"eval": "queries = 3"}, {"eval": {"queries": "three"}}])
def test_a_corrupt_stored_config_is_refused(trained, tmp_path, capsys, bad):
    payload = load_checkpoint(trained / "best.pt")
    payload["config"] = bad if isinstance(bad, list) else {**payload["config"], **bad}
    del payload["format"]
    save_checkpoint(tmp_path / "best.pt", payload)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "best.pt")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "best.pt") in err and "Traceback" not in err
    if isinstance(bad, list) or not isinstance(bad["eval"], dict):
        assert "not a table of settings" in err
    else:
        assert "the config stored in" in err and "eval.queries" in err


def test_ways_shots_queries_split_and_sampling(trained, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained / "best.pt"), "--ways", "3", "--shots", "2", "--queries", "1",
                 "--split", "test", "--tasks", "3"]) == 0
    assert "3-way 2-shot accuracy (%), 1 queries per class, 3 test tasks" in capsys.readouterr().out
    # the val split of the lake split holds one alphabet: within one alphabet is what it has anyway
    assert main(["eval", str(trained / "best.pt"), "--split", "val", "--within-alphabet", "--tasks", "3"]) == 0
    out = capsys.readouterr().out
    assert "within one alphabet, val tasks" in out and "3 val tasks" in out


def test_sizes_the_data_cannot_serve_name_the_split_tested(trained, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained / "best.pt"), "--shots", "3", "--queries", "2"]) == 2
    err = capsys.readouterr().err
    assert "test split has only 4" in err and "train split" not in err and "Traceback" not in err
    assert main(["eval", str(trained / "best.pt"), "--ways", "5"]) == 2  # the test split has 4 classes
    assert "5-way tasks need 5 classes but the test split has only 4" in capsys.readouterr().err


def test_bad_options_fail_before_work(trained, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained / "best.pt"), "--shots", "0"]) == 2
    assert "--shots 0 is invalid" in capsys.readouterr().err
    assert main(["eval", str(trained / "best.pt"), "--set", "task.shot=3"]) == 2
    assert "did you mean 'task.shots'" in capsys.readouterr().err


def test_a_regression_checkpoint_keeps_its_protocol(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["train", "--no-progress", "--set", f"out_dir={out_dir}", "--set", "model.hidden=[8]",
                 "--set", "train.iterations=2", "--set", "train.meta_batch_size=2",
                 "--set", "train.validate_every=2",
                 "--set", "train.val_tasks=4", "--set", "eval.test_tasks=5", "--set", "eval.steps=1",
                 "--set", "eval.report_steps=[0, 1]", "--set", "eval.baseline=false"]) == 0
    report = json.loads((out_dir / "results.json").read_text())
    assert report["config"]["model"]["hidden"] == [8]
    capsys.readouterr()
    assert main(["eval", str(out_dir / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert "sinusoid: 5-shot mse, 100 queries, 5 test tasks" in out and "| maml |" in out
    assert main(["eval", str(out_dir / "best.pt"), "--ways", "2"]) == 2
    assert "regression" in capsys.readouterr().err
