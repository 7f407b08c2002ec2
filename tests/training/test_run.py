"""Few-shot image classification end to end through the config and CLI (a generated folder)."""

from __future__ import annotations

import json

import pytest

from innerloop.cli import main

pytestmark = pytest.mark.slow  # several processes, real data or whole runs: skipped by `make test-quick`


@pytest.fixture
def folder(fewshot_folder):
    return fewshot_folder


def _config(tmp_path, folder, algorithm, **task):
    task = {"ways": 3, "shots": 1, "queries": 3, **task}
    extra = "".join(f"{k} = {v}\n" for k, v in task.items())
    text = f"""
out_dir = "{tmp_path / 'run'}"
[task]
family = "image-folder"
data_root = "{folder}"
image_size = 16
{extra}
[model]
name = "conv4"
filters = 8
[algorithm]
name = "{algorithm}"
{"" if algorithm in ("protonet", "matchingnet") else "inner_lr = 0.4"}
[train]
iterations = 30
meta_batch_size = 4
validate_every = 15
val_tasks = 10
[eval]
baseline = false
test_tasks = 40
shots = 1
queries = 3
steps = 2
report_steps = [0, 2]
"""
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("algorithm", "task"), [
    ("maml", {}), ("protonet", {"train_ways": 5}), ("matchingnet", {"train_ways": 5}),
])
def test_image_run_learns(tmp_path, folder, algorithm, task, capsys):
    assert main(["train", "--config", str(_config(tmp_path, folder, algorithm, **task)), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3-way 1-shot accuracy, BatchNorm: batch statistics (transductive)" in out
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    final = report["runs"][algorithm]["test"]["per_step"][-1]["mean"]
    assert final > 0.6  # chance is 1/3
    assert (tmp_path / "run" / "adaptation.png").exists()
    # `innerloop eval` rebuilds an image-family checkpoint, also with 0 steps
    assert main(["eval", str(tmp_path / "run" / "best.pt"), "--tasks", "5", "--shots", "1", "--queries", "2",
                 "--steps", "0"]) == 0


def test_more_ways_than_classes_fails_before_training(tmp_path, folder, capsys):
    assert main(["train", "--config", str(_config(tmp_path, folder, "maml", ways=7))]) == 2
    err = capsys.readouterr().err
    assert "7-way tasks need 7 classes but the train split has only 6" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_too_many_shots_fails_before_training(tmp_path, folder, capsys):
    assert main(["train", "--config", str(_config(tmp_path, folder, "maml", shots=5, queries=4))]) == 2
    assert "use shots + queries <= 8" in capsys.readouterr().err


def test_missing_omniglot_says_where_to_put_it(tmp_path, capsys, monkeypatch):
    from innerloop.data import DownloadError

    def offline(url, *args, **kwargs):
        raise DownloadError(f"could not download {url}: offline")

    monkeypatch.setattr("innerloop.data.omniglot.download", offline)
    path = tmp_path / "o.toml"
    path.write_text(f'[task]\nfamily = "omniglot"\ndata_root = "{tmp_path}/nothing"\n'
                    '[model]\nname = "conv4"\n[eval]\nbaseline = false\n')
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "images_background.zip" in err and f"{tmp_path}/nothing" in err
