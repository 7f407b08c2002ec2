"""``innerloop.Predictor``: a checkpoint labels new images without its training data, preprocessing them as
the training loader did, with the scores ``Algorithm.evaluate`` computes for the same task."""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from innerloop import Predictor
from innerloop.data.download import DataError
from innerloop.data.factory import image_splits
from innerloop.data.images import ImagePreprocessing, image_folder_dataset
from innerloop.data.omniglot import load_omniglot_characters, omniglot_preprocessing
from innerloop.tasks import TaskBatch
from innerloop.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from innerloop.training.config import Config
from innerloop.training.loop import Schedule, run_loop
from innerloop.training.run import build_family, checkpoint_config, identity, load_for_eval, run

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from fewshot_fakes import write_fake_omniglot

ALGORITHMS = ("protonet", "maml", "baseline", "mamlpp", "metaoptnet")


def _fake_omniglot(root: Path) -> Path:
    write_fake_omniglot(root)
    return root


def _omniglot_cfg(out: Path, root: Path, algorithm: str) -> Config:
    return Config().override({
        "out_dir": str(out), "task.family": "omniglot", "task.data_root": str(root), "task.split": "lake",
        "task.image_size": 16, "task.ways": 2, "task.shots": 1, "task.queries": 2,
        "task.split_options.lake_val_alphabets": 1, "model.name": "conv4", "model.filters": 4,
        "algorithm.name": algorithm, "train.iterations": 2, "train.meta_batch_size": 2, "train.validate_every": 2,
        "train.val_tasks": 2, "eval.baseline": False, "eval.test_tasks": 2, "eval.shots": 2, "eval.queries": 2,
        "eval.steps": 2, "eval.report_steps": [0, 2]})


def _write_ink(x: torch.Tensor, path: Path) -> Path:
    """A stored Omniglot image ``[1, H, W]`` (ink = 1) as the PNG it came from: dark ink on white."""
    v = torch.round(x[0] * 255).to(torch.uint8).numpy()
    Image.fromarray(255 - v, "L").save(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``{algorithm: (checkpoint, task, evaluate's {loss, accuracy} [1, steps + 1])}``, then the data moved
    away: the test task (2-way 2-shot, 2 queries) was built through the family while the data was there."""
    base = tmp_path_factory.mktemp("predict")
    root = _fake_omniglot(base / "data" / "omniglot")
    out = {}
    for name in ALGORITHMS:
        cfg = _omniglot_cfg(base / name, root, name)
        run(cfg, progress=False)
        ckpt = base / name / "best.pt"
        ecfg, algorithm = load_for_eval(ckpt)
        family = build_family(ecfg, 2, 2, 2, splits=("test",))
        task = family.task("test", 0)
        algorithm.eval()
        ref = algorithm.evaluate(TaskBatch.stack([task]), 2)
        out[name] = (ckpt, task, {k: v.detach() for k, v in ref.items()})
    shutil.move(str(base / "data"), str(base / "moved"))  # the training data is gone
    image_splits.cache_clear()  # nor kept in memory
    assert not root.exists()
    return out


@pytest.mark.parametrize("name", ALGORITHMS)
def test_predictions_from_files_are_evaluates_on_the_same_task(trained, tmp_path, name):
    ckpt, task, ref = trained[name]
    predictor = Predictor.load(ckpt)
    assert predictor.steps == 2  # the run's eval.steps
    labels = ["zeta", "eta"]  # any hashable labels: column j is the class first named j-th
    support = [_write_ink(x, tmp_path / f"s{i}.png") for i, x in enumerate(task.support_x)]
    query = tmp_path / "query"
    query.mkdir()
    for i, x in enumerate(task.query_x):
        _write_ink(x, query / f"q{i}.png")
    pred = predictor.predict(support, [labels[int(y)] for y in task.support_y], query)
    assert pred.classes == labels and pred.names == [str(query / f"q{i}.png") for i in range(len(task.query_x))]
    assert pred.scores.shape == (len(task.query_x), 2)
    torch.testing.assert_close(pred.scores.sum(-1), torch.ones(len(task.query_x)))
    loss = F.cross_entropy(pred.logits.double(), task.query_y)
    torch.testing.assert_close(loss, ref["loss"][0, 2].double(), rtol=1e-5, atol=1e-5)
    accuracy = np.mean([p == labels[int(y)] for p, y in zip(pred.labels, task.query_y, strict=True)])
    assert accuracy == pytest.approx(float(ref["accuracy"][0, 2]))
    # fewer steps: evaluate's earlier column
    zero = predictor.predict(support, [labels[int(y)] for y in task.support_y], query, steps=0)
    torch.testing.assert_close(F.cross_entropy(zero.logits.double(), task.query_y),
                               ref["loss"][0, 0].double(), rtol=1e-5, atol=1e-5)


def test_checkpoints_store_the_inputs_beside_the_identity(trained):
    ckpt, _, _ = trained["baseline"]
    payload = load_checkpoint(ckpt)
    assert payload["inputs"] == {"shape": [1, 16, 16], "outputs": 5,  # the Baseline's head: 5 training classes
                                 "preprocessing": {"size": [16, 16], "mode": "L", "resample": "lanczos",
                                                   "invert": True}}
    assert "inputs" not in payload["identity"]  # not part of what a resumed run must match
    assert payload["identity"] == identity(checkpoint_config(payload), "baseline")


def test_other_sizes_rgb_arrays_and_light_ink_are_accepted(trained):
    ckpt, task, _ = trained["protonet"]
    predictor = Predictor.load(ckpt)
    v = torch.round(task.support_x[0, 0] * 255).to(torch.uint8).numpy()
    page = Image.fromarray(255 - v, "L").resize((45, 37))  # another size, dark ink on white
    rgb = np.stack([np.asarray(page)] * 3, axis=-1)  # [H, W, 3] uint8
    x, names = predictor.preprocess([page, rgb, rgb.astype(np.float64) / 255, 255 - np.asarray(page)])
    assert x.shape == (4, 1, 16, 16) and x.dtype == torch.float32 and names[0] == "images[0]"
    torch.testing.assert_close(x[1], x[0])  # RGB is converted to grey as training did
    torch.testing.assert_close(x[2], x[0], atol=1 / 255, rtol=0)  # floats in [0, 1]
    torch.testing.assert_close(x[3], x[0])  # light ink on black: detected, not inverted
    assert float(x[0].mean()) < 0.5  # ink = 1 on a 0 background, as training stored it
    light, _ = predictor.preprocess([page], ink="light")  # said explicitly: taken as light ink
    torch.testing.assert_close(light[0], 1 - x[0])
    labels = [int(y) for y in task.support_y]
    pred = predictor.predict([page, rgb, *task.support_x[2:, 0].numpy()], labels, [rgb, page])
    assert pred.scores.shape == (2, 2) and pred.classes == [0, 1]


def test_the_loaders_tensor_is_the_predictors_for_the_same_file(tmp_path):
    root = _fake_omniglot(tmp_path / "omniglot")
    characters, _ = load_omniglot_characters(root, image_size=16, cache_dir=tmp_path / "cache")
    cached, _ = load_omniglot_characters(root, image_size=16, cache_dir=tmp_path / "cache")  # from the cache
    with zipfile.ZipFile(root / "images_background.zip") as zf:
        first = sorted(n for n in zf.namelist() if n.endswith(".png"))[0]
        png = zf.read(first)
    (tmp_path / "one.png").write_bytes(png)
    for source in (png, tmp_path / "one.png", Image.open(tmp_path / "one.png")):
        mine = omniglot_preprocessing(16)(source)
        assert np.array_equal(mine, cached.data[0].numpy()) and np.array_equal(mine, characters.data[0].numpy())


def test_an_image_folders_tensor_is_the_predictors(tmp_path, fewshot_folder):
    cfg = Config().override({
        "out_dir": str(tmp_path / "run"), "task.family": "image-folder", "task.data_root": str(fewshot_folder),
        "task.image_size": 20, "task.ways": 3, "task.shots": 1, "task.queries": 2, "model.name": "conv4",
        "model.filters": 4, "algorithm.name": "protonet", "train.iterations": 1, "train.meta_batch_size": 1,
        "train.validate_every": 1, "train.val_tasks": 1, "eval.baseline": False, "eval.test_tasks": 2,
        "eval.shots": 1, "eval.queries": 2, "eval.steps": 0, "eval.report_steps": [0]})
    run(cfg, progress=False)
    predictor = Predictor.load(tmp_path / "run" / "best.pt")
    assert predictor.preprocessing == ImagePreprocessing((20, 20), "RGB", "lanczos")
    folder = fewshot_folder / "test" / "class20"
    ds = image_folder_dataset(fewshot_folder / "test", size=20)
    x, _ = predictor.preprocess(folder)  # a folder: its files, sorted
    torch.testing.assert_close(x, ds[ds.class_index("class20")])
    grey = Image.open(folder / "0.png").convert("L").resize((31, 9))  # grey, another size: made RGB
    assert predictor.preprocess([grey])[0].shape == (1, 3, 20, 20)
    with pytest.raises(ValueError, match="ink = 'dark' is for models trained on ink drawings"):
        predictor.preprocess([grey], ink="dark")
    pred = predictor.predict(fewshot_folder / "test", None, folder)  # 6 classes: ProtoNets take any
    assert pred.classes == sorted(p.name for p in (fewshot_folder / "test").iterdir())
    assert len(pred.labels) == 8 and pred.scores.shape == (8, 6)
    payload = load_checkpoint(tmp_path / "run" / "best.pt")  # as a checkpoint of before `inputs` was stored:
    del payload["inputs"]  # rebuilt from its training data, which is still here
    save_checkpoint(tmp_path / "old.pt", payload)
    old = Predictor.load(tmp_path / "old.pt")
    assert old.preprocessing == predictor.preprocessing
    torch.testing.assert_close(old.predict(fewshot_folder / "test", None, folder).logits, pred.logits)


def test_bad_input_is_refused_by_name(trained, tmp_path):
    ckpt, task, _ = trained["maml"]
    predictor = Predictor.load(ckpt)
    imgs = [x[0].numpy() for x in task.support_x]
    with pytest.raises(ValueError, match="head has 2 outputs: give support images of exactly 2 classes"):
        predictor.predict(imgs[:3], ["a", "b", "c"], imgs)
    with pytest.raises(ValueError, match="at least two"):
        predictor.predict(imgs, ["a"] * 4, imgs)
    with pytest.raises(ValueError, match="4 support images but 3 support labels"):
        predictor.predict(imgs, ["a", "b", "a"], imgs)
    with pytest.raises(ValueError, match="steps = -1 is invalid"):
        predictor.predict(imgs, ["a", "b", "a", "b"], imgs, steps=-1)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.png"):
        predictor.predict(imgs, ["a", "b", "a", "b"], [tmp_path / "bad.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images in .*empty.*it is empty"):
        predictor.predict(imgs, ["a", "b", "a", "b"], tmp_path / "empty")
    with pytest.raises(DataError, match="floats must lie in"):
        predictor.preprocess([np.full((5, 5), 2.0)])
    with pytest.raises(DataError, match="shape"):
        predictor.preprocess([np.zeros((5, 5, 2), dtype=np.uint8)])
    with pytest.raises(DataError, match="torch tensor"):
        predictor.preprocess(task.support_x)
    with pytest.raises(DataError, match="no class folders"):
        predictor.predict(tmp_path / "empty", None, imgs)


def test_an_old_checkpoint_without_inputs_and_data_names_what_is_missing(trained, tmp_path):
    ckpt, _, _ = trained["protonet"]
    payload = load_checkpoint(ckpt)
    del payload["inputs"]
    save_checkpoint(tmp_path / "old.pt", payload)
    with pytest.raises(CheckpointError, match=r"does not store its model's inputs .* Put the data back"):
        Predictor.load(tmp_path / "old.pt")
    payload = load_checkpoint(ckpt)
    payload["inputs"] = {"shape": "wrong"}
    save_checkpoint(tmp_path / "bad.pt", payload)
    with pytest.raises(CheckpointError, match="damaged"):
        Predictor.load(tmp_path / "bad.pt")


def test_a_regression_checkpoint_is_refused(tmp_path):
    cfg = Config().override({"out_dir": str(tmp_path / "run"), "train.iterations": 1, "train.validate_every": 1,
                             "train.val_tasks": 2, "eval.baseline": False, "eval.test_tasks": 2, "eval.steps": 1,
                             "eval.report_steps": [0, 1], "model.hidden": [8]})
    run(cfg, progress=False)
    with pytest.raises(CheckpointError, match="a predictor labels images"):
        Predictor.load(tmp_path / "run" / "best.pt")


def test_checkpoint_extras_cannot_replace_what_a_checkpoint_holds(tmp_path):
    module = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"checkpoint_extras may not set \['state'\]"):
        run_loop(module, lambda step: {"loss": 0.0}, Schedule(1), tmp_path, name="x",
                 checkpoint_extras={"state": {}})
    assert not (tmp_path / "last.pt").exists()
    run_loop(module, lambda step: {"loss": 0.0}, Schedule(1), tmp_path, name="x", progress=False,
             checkpoint_extras={"inputs": {"shape": [2]}})
    assert load_checkpoint(tmp_path / "last.pt")["inputs"] == {"shape": [2]}
