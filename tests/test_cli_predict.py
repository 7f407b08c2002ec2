"""``innerloop predict CHECKPOINT --support DIR --query DIR``: a checkpoint trained on a tiny fake Omniglot
labels PNG files of its test classes after the training data has been moved away."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from innerloop.cli import main
from innerloop.data.factory import image_splits
from innerloop.training.run import build_family, load_for_eval

sys.path.insert(0, str(Path(__file__).parent / "data"))
from fewshot_fakes import write_fake_omniglot

pytestmark = pytest.mark.slow  # whole command-line runs: skipped by `make test-quick`


def _png(x: torch.Tensor, path: Path, size: tuple[int, int] | None = None) -> None:
    """A stored image ``[1, H, W]`` (ink = 1) as dark ink on white, resized to ``size``."""
    im = Image.fromarray(255 - torch.round(x[0] * 255).to(torch.uint8).numpy(), "L")
    (im.resize(size) if size else im).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``(checkpoint, support DIR, query DIR)``: a MAML checkpoint (2-way), a support folder of two classes
    (one folder each) and a query folder, written from a test task; the training data moved away."""
    base = tmp_path_factory.mktemp("cli-predict")
    root = base / "data" / "omniglot"
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
name = "maml"
[train]
iterations = 2
meta_batch_size = 2
validate_every = 2
val_tasks = 2
[eval]
baseline = false
test_tasks = 2
shots = 1
queries = 2
steps = 1
report_steps = [0, 1]
""")
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    ckpt = base / "run" / "best.pt"
    ecfg, _ = load_for_eval(ckpt)
    task = build_family(ecfg, 2, 2, 2, splits=("test",)).task("test", 0)
    support, query = base / "support", base / "query"
    for i, (x, y) in enumerate(zip(task.support_x, task.support_y, strict=True)):
        (support / f"class_{int(y)}").mkdir(parents=True, exist_ok=True)
        _png(x, support / f"class_{int(y)}" / f"{i}.png", (40, 40) if i % 2 else None)  # sizes differ: fine
    query.mkdir()
    for i, x in enumerate(task.query_x):
        _png(x, query / f"q{i}.png")
    shutil.move(str(base / "data"), str(base / "moved"))
    image_splits.cache_clear()
    return ckpt, support, query


def test_the_table_names_every_query_file(folders, capsys):
    ckpt, support, query = folders
    assert main(["predict", str(ckpt), "--support", str(support), "--query", str(query)]) == 0
    out = capsys.readouterr().out
    assert "maml, 2-way (class_0, class_1), 1 adaptation step, 4 query images:" in out
    lines = [line.split() for line in out.splitlines()[2:]]
    assert [row[0] for row in lines] == [f"q{i}.png" for i in range(4)]
    assert all(row[1] in ("class_0", "class_1") and 0.5 <= float(row[2]) <= 1 for row in lines)


def test_json_and_csv_hold_every_class_score(folders, capsys):
    ckpt, support, query = folders
    assert main(["predict", str(ckpt), "--support", str(support), "--query", str(query), "--format", "json",
                 "--steps", "0", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [f"q{i}.png" for i in range(4)]
    assert all(set(r["scores"]) == {"class_0", "class_1"} for r in rows)
    assert all(r["score"] == max(r["scores"].values()) for r in rows)
    assert main(["predict", str(ckpt), "--support", str(support), "--query", str(query), "--format", "csv",
                 "--steps", "0"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0] == ["image", "label", "score", "score_class_0", "score_class_1"]
    assert [r[1] for r in table[1:]] == [r["label"] for r in rows]


def test_errors_are_one_line_naming_the_folder_or_file(folders, tmp_path, capsys):
    ckpt, support, query = folders
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(ckpt), "--support", str(support), "--query", str(tmp_path / "empty")]) == 2
    assert "no images in" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(query, bad)
    (bad / "broken.png").write_bytes(b"not a png")
    assert main(["predict", str(ckpt), "--support", str(support), "--query", str(bad)]) == 2
    assert "broken.png" in capsys.readouterr().err
    three = tmp_path / "three"
    shutil.copytree(support, three)
    shutil.copytree(support / "class_0", three / "class_2")
    assert main(["predict", str(ckpt), "--support", str(three), "--query", str(query)]) == 2
    assert "exactly 2 classes" in capsys.readouterr().err
    assert main(["predict", str(ckpt), "--support", str(tmp_path / "nowhere"), "--query", str(query)]) == 2
    assert "--support" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "none.pt"), "--support", str(support), "--query", str(query)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
