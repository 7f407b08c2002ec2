"""The command line, end to end on a tiny budget."""

from __future__ import annotations

import json

import pytest

from innerloop.cli import main

pytestmark = pytest.mark.slow  # several processes, real data or whole runs: skipped by `make test-quick`


def _tiny(tmp_path, **extra):
    text = f"""
out_dir = "{tmp_path / 'run'}"
[model]
hidden = [16]
[train]
iterations = 20
meta_batch_size = 4
validate_every = 10
val_tasks = 8
[eval]
test_tasks = 12
steps = 3
report_steps = [0, 1, 3]
plot_tasks = 2
""" + "".join(extra.values())
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def test_train_then_eval(tmp_path, capsys):
    assert main(["train", "--config", str(_tiny(tmp_path)), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| maml |" in out and "| pretrain |" in out and "mse after 3 steps" in out
    run = tmp_path / "run"
    report = json.loads((run / "results.json").read_text())
    assert report["runs"]["maml"]["test"]["tasks"] == 12
    assert len(report["runs"]["pretrain"]["test"]["per_step"]) == 4
    for name in ("fits.png", "adaptation.png", "best.pt", "last.pt", "metrics.jsonl", "baseline/best.pt"):
        assert (run / name).exists(), name
    # a second call resumes the finished run: no retraining, same table
    assert main(["train", "--config", str(_tiny(tmp_path)), "--no-progress"]) == 0
    assert capsys.readouterr().out == out
    assert main(["eval", str(run / "best.pt"), "--tasks", "12", "--steps", "3", "--shots", "5"]) == 0
    assert "| maml |" in capsys.readouterr().out


def test_bad_config_fails_before_work(tmp_path, capsys):
    path = _tiny(tmp_path, bad="[task]\nshots = 0\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "task.shots = 0 is invalid" in err
    assert not (tmp_path / "run").exists()


def test_eval_of_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "innerloop train --config FILE.toml" in capsys.readouterr().out
