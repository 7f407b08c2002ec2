"""Checkpoints under hostile and damaged files: a pickle payload never runs on any loading path, a
truncated file is named with the way out, interrupted writes are cleaned up, the umask is respected."""

from __future__ import annotations

import builtins
import enum
import os
import pickle
import stat
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from innerloop.cli import main
from innerloop.io import atomic_write_bytes, atomic_write_text, clean_partial_writes, current_umask
from innerloop.training.checkpoint import CheckpointError, load_checkpoint, plain_data, save_checkpoint
from innerloop.training.config import Config
from innerloop.training.loop import meta_train
from innerloop.training.run import build_algorithm, build_family, identity, load_for_eval


class Payload:
    """What an attacker plants: unpickling it writes ``marker`` (through ``exec``, a builtin)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _cfg(out: Path) -> Config:
    return Config().override({"model.hidden": [8], "train.iterations": 2, "train.meta_batch_size": 2,
                              "train.validate_every": 2, "train.val_tasks": 4, "out_dir": str(out)})


def _train(cfg: Config, run_dir: Path) -> None:
    family = build_family(cfg)
    meta_train(build_algorithm(cfg, family), family, cfg.train, run_dir, identity=identity(cfg, "maml"),
               progress=False)


def _hostile_files(genuine: Path, folder: Path, marker: Path) -> dict[str, Path]:
    """Three hostile files: a bare pickle (protocols 2 and 4) and a genuine checkpoint with the payload
    hidden among its entries (torch's zip format)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for proto in (2, 4):
        out[f"pickle{proto}"] = folder / f"pickle{proto}.pt"
        out[f"pickle{proto}"].write_bytes(pickle.dumps({"format": "innerloop-checkpoint-v1", "x": Payload(marker)},
                                                       protocol=proto))
    payload = load_checkpoint(genuine)
    payload["extra"] = {"loss_scale": Payload(marker)}
    out["hidden"] = folder / "hidden.pt"
    torch.save(payload, out["hidden"])
    return out


def test_the_payload_would_run_under_an_unsafe_load(tmp_path):
    """The planted files are real attacks: ``weights_only=False`` runs them."""
    marker = tmp_path / "marker"
    _train(_cfg(tmp_path / "run"), tmp_path / "run")
    files = _hostile_files(tmp_path / "run" / "last.pt", tmp_path / "h", marker)
    torch.load(files["hidden"], weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A trained run folder, and the hostile files to plant into copies of it."""
    root = tmp_path_factory.mktemp("planted")
    _train(_cfg(root / "run"), root / "run")
    return root


def _assert_refused(err: str, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the payload ran"
    assert "\n" not in err.strip()
    assert str(path) in err
    assert "not a plain-data innerloop checkpoint" in err or "not a readable checkpoint" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["pickle2", "pickle4", "hidden"])
def test_a_payload_never_runs_on_any_loading_path(planted, tmp_path, kind, capsys):
    marker = tmp_path / "marker"
    hostile = _hostile_files(planted / "run" / "last.pt", tmp_path / "h", marker)[kind]
    run = tmp_path / "run"
    run.mkdir()
    cfg = _cfg(run).override({"train.iterations": 4})
    (run / "last.pt").write_bytes(hostile.read_bytes())
    (run / "best.pt").write_bytes(hostile.read_bytes())

    with pytest.raises(CheckpointError) as err:  # the Python API
        load_checkpoint(run / "last.pt")
    _assert_refused(str(err.value), run / "last.pt", marker)
    if kind != "pickle4":  # protocol 4 frames are refused before the unpickler sees the import
        assert "not a plain-data innerloop checkpoint" in str(err.value) and "exec" in str(err.value)
    with pytest.raises(CheckpointError) as err:  # resume: meta_train -> run_loop -> resume_into
        _train(cfg, run)
    _assert_refused(str(err.value), run / "last.pt", marker)
    with pytest.raises(CheckpointError) as err:
        load_for_eval(run / "best.pt")
    _assert_refused(str(err.value), run / "best.pt", marker)

    capsys.readouterr()
    assert main(["eval", str(run / "best.pt"), "--tasks", "4", "--steps", "1"]) == 2  # `innerloop eval`
    _assert_refused(capsys.readouterr().err, run / "best.pt", marker)
    config = tmp_path / "c.toml"
    config.write_text(f'out_dir = "{run}"\n[model]\nhidden = [8]\n[train]\niterations = 4\nmeta_batch_size = 2\n'
                      "validate_every = 2\nval_tasks = 4\n")
    assert main(["train", "--config", str(config), "--no-progress"]) == 2  # `innerloop train` resuming
    _assert_refused(capsys.readouterr().err, run / "last.pt", marker)


@pytest.mark.slow
def test_a_payload_never_runs_on_the_rl_paths(tmp_path, capsys):
    from innerloop.rl.train import load_rl_checkpoint

    out = tmp_path / "rl"
    config = tmp_path / "rl.toml"
    config.write_text(f'out_dir = "{out}"\n[env]\nhorizon = 4\n[policy]\nhidden = [4]\n[algorithm]\nrollouts = 2\n'
                      "[train]\niterations = 1\nmeta_batch_size = 2\nfisher_subsample = 0.5\n"
                      "[eval]\ntest_tasks = 2\nrollouts = 2\nsteps = 1\npretrain = false\nrandom_init = false\n"
                      "plot_tasks = 1\n")
    assert main(["rl", "train", "--config", str(config), "--no-progress"]) == 0
    marker = tmp_path / "marker"
    hostile = _hostile_files(out / "last.pt", tmp_path / "h", marker)["hidden"]
    (out / "last.pt").write_bytes(hostile.read_bytes())
    capsys.readouterr()
    with pytest.raises(CheckpointError) as err:
        load_rl_checkpoint(out / "last.pt")
    _assert_refused(str(err.value), out / "last.pt", marker)
    assert main(["rl", "eval", str(out / "last.pt"), "--tasks", "2", "--steps", "1", "--rollouts", "2"]) == 2
    _assert_refused(capsys.readouterr().err, out / "last.pt", marker)
    config.write_text(config.read_text().replace("iterations = 1", "iterations = 2"))
    assert main(["rl", "train", "--config", str(config), "--no-progress"]) == 2  # resume
    _assert_refused(capsys.readouterr().err, out / "last.pt", marker)


def test_what_a_run_saves_loads_as_plain_data(planted):
    for name in ("last.pt", "best.pt"):
        payload = torch.load(planted / "run" / name, weights_only=True)
        assert payload["step"] == 2 and payload["optimizer"]["state"] and payload["torch_rng"].dtype == torch.uint8


def test_fp16_loss_scale_and_numpy_values_are_saved_as_plain_data(tmp_path):
    from innerloop.training.device import LossScaler

    class Colour(enum.Enum):
        RED = "red"

    class MyInt(int):
        pass

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.1, betas=(0.9, 0.99))
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    payload = {"step": np.int64(3), "best_val": np.float32(0.5), "arr": np.arange(3), "colour": Colour.RED,
               "n": MyInt(4), "where": tmp_path, "extra": {"loss_scale": LossScaler(scale=8.0).state_dict()},
               "optimizer": optimizer.state_dict(), "shape": torch.Size([2, 3]), "dtype": torch.float16}
    save_checkpoint(tmp_path / "c.pt", payload)
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["step"] == 3 and type(back["step"]) is int and type(back["best_val"]) is float
    assert torch.equal(back["arr"], torch.arange(3)) and back["colour"] == "red" and type(back["n"]) is int
    assert back["where"] == str(tmp_path) and back["extra"]["loss_scale"]["scale"] == 8.0
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99) and back["dtype"] == torch.float16
    restored = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    restored.load_state_dict(back["optimizer"])


def test_a_state_dicts_metadata_survives_and_objects_are_refused_before_writing(tmp_path):
    state = torch.nn.BatchNorm1d(3).state_dict()
    assert plain_data(state) is state and isinstance(state, OrderedDict)
    save_checkpoint(tmp_path / "c.pt", {"state": state})
    assert load_checkpoint(tmp_path / "c.pt")["state"]._metadata == state._metadata  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"payload\['extra'\]\['x'\] is a .*Payload; a checkpoint holds plain"):
        save_checkpoint(tmp_path / "d.pt", {"extra": {"x": Payload(tmp_path / "m")}})
    assert not (tmp_path / "d.pt").exists() and not (tmp_path / "m").exists()


def test_a_0_1_0_style_file_of_plain_data_loads(tmp_path):
    """innerloop 0.1.0 wrote ``torch.save`` of plain dicts (state dicts, the optimiser's, the RNG state)."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())
    torch.save({"format": "innerloop-checkpoint-v1", "algorithm": "maml", "identity": {"a": [1, 2.0, None]},
                "step": 5, "state": model.state_dict(), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "wall_s": 1.5}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["step"] == 5


@pytest.mark.parametrize("cut", [0, 10, 0.5, -10])
def test_a_truncated_checkpoint_names_the_file_and_the_way_out(planted, tmp_path, cut, capsys):
    data = (planted / "run" / "best.pt").read_bytes()
    n = int(cut * len(data)) if isinstance(cut, float) else cut if cut >= 0 else len(data) + cut
    path = tmp_path / "best.pt"
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "truncated or corrupt" in msg and "Errno" not in msg and "\n" not in msg
    assert "Delete that file" in msg and "--overwrite, which also deletes best.pt" in msg
    assert main(["eval", str(path), "--tasks", "4", "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_garbage_is_not_readable(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint: it is corrupt"):
        load_checkpoint(tmp_path / "x.pt")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_interrupted_writes_are_cleaned_up_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    old = time.time() - 3600
    files = {
        "dead": tmp_path / f".last.pt.tmp-{dead}-abc123xy",
        "live": tmp_path / f".last.pt.tmp-{live}-abc123xy",  # our parent: alive, started before the file
        "mine_now": tmp_path / f".best.pt.tmp-{os.getpid()}-zzzzzzzz",
        "mine_reused": tmp_path / f".best.pt.tmp-{os.getpid()}-yyyyyyyy",  # our pid, from before we started
        "old_style": tmp_path / ".last.pt.k2j_4xq9.tmp",
        "other": tmp_path / "notes.tmp-1-x",
        "checkpoint": tmp_path / "last.pt",
    }
    for p in files.values():
        p.write_bytes(b"x")
    for key in ("mine_reused", "old_style"):
        os.utime(files[key], (old, old))
    removed = clean_partial_writes(tmp_path)
    assert sorted(removed) == sorted([files["dead"], files["mine_reused"], files["old_style"]])
    assert {k for k, p in files.items() if p.exists()} == {"live", "mine_now", "other", "checkpoint"}
    assert clean_partial_writes(tmp_path / "missing") == []


def test_temp_files_are_named_for_their_writer(tmp_path):
    seen = []
    atomic_write_bytes(tmp_path / "last.pt", lambda f: seen.extend(p.name for p in tmp_path.iterdir()))
    assert len(seen) == 1 and seen[0].startswith(f".last.pt.tmp-{os.getpid()}-")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_killed_writer_leaves_a_file_the_next_start_removes(tmp_path):
    code = ("import os, sys; from innerloop.io import atomic_write_bytes\n"
            f"atomic_write_bytes({str(tmp_path / 'last.pt')!r}, lambda f: (f.write(b'x' * 100), f.flush(), "
            "os._exit(9)))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".last.pt.tmp-")
    assert clean_partial_writes(tmp_path) == left and not any(tmp_path.iterdir())


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, mask):
    before = os.umask(mask)
    try:
        assert current_umask() == mask
        atomic_write_text(tmp_path / "a.txt", "hi")
        save_checkpoint(tmp_path / "c.pt", {"step": 1})
    finally:
        os.umask(before)
    for name in ("a.txt", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
