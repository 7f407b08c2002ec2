"""Checkpoints written atomically, loaded without running code, and checked against the model they
are loaded into.

A checkpoint holds plain data only: tensors, numbers, strings, lists, tuples, dicts and None.
:func:`save_checkpoint` converts what is not (numpy scalars and arrays, enums, paths) and refuses the
rest; :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``, so a file carrying a pickle
payload (a ``__reduce__`` that imports ``os.system``, say) is refused before anything in it runs.
"""

from __future__ import annotations

import enum
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from torch import nn

from innerloop.io import atomic_write_bytes, clean_partial_writes

FORMAT = "innerloop-checkpoint-v1"

__all__ = ["FORMAT", "CheckpointError", "check_state_compatible", "clean_partial_writes", "identity_differences",
           "load_checkpoint", "load_state", "plain_data", "resume_into", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, not plain data, or was saved for another model or config."""


_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def plain_data(obj: Any, where: str = "payload") -> Any:
    """``obj`` as the plain data ``torch.load(weights_only=True)`` reads back: tensors, numbers,
    strings, bytes, None, dtypes and devices, in dicts, lists and tuples. numpy scalars become Python
    numbers, numpy arrays tensors, enums their values, paths strings, subclasses of ``int``/``float``/
    ``str`` the base type; anything else is a :class:`TypeError` naming where it sits (``where``)."""
    if isinstance(obj, enum.Enum):
        return plain_data(obj.value, where)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{where} is a numpy array of objects; a checkpoint holds plain data only.")
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, PurePath):
        return str(obj)
    if type(obj) in _LEAVES or isinstance(obj, torch.Tensor):
        return obj
    # a subclass (an IntEnum's value, a numpy-free str subclass): its pickle would import the class
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, complex):
        return complex(obj)
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, bytes):
        return bytes(obj)
    if isinstance(obj, Mapping):
        items = {plain_data(k, f"a key of {where}"): plain_data(v, f"{where}[{k!r}]") for k, v in obj.items()}
        if type(obj) in (dict, OrderedDict) and all(
                a is b and va is vb for (a, va), (b, vb) in zip(obj.items(), items.items(), strict=True)):
            return obj  # unchanged: keeps a state dict's ``_metadata``
        if not isinstance(obj, OrderedDict):
            return items
        out: OrderedDict[Any, Any] = OrderedDict(items)
        if hasattr(obj, "_metadata"):  # a state dict's versions, read by load_state_dict
            out._metadata = plain_data(obj._metadata, f"{where}._metadata")  # type: ignore[attr-defined]
        return out
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, list | tuple):
        items_ = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if type(obj) in (list, tuple) and all(a is b for a, b in zip(obj, items_, strict=True)):
            return obj
        return items_ if isinstance(obj, list) else tuple(items_)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds plain "
                    "data only (tensors, numbers, strings, lists, tuples, dicts, None).")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` (tensors, dicts, numbers: see :func:`plain_data`) to ``path`` atomically."""
    data = plain_data({"format": FORMAT, **payload})
    atomic_write_bytes(Path(path), lambda f: torch.save(data, f))


_WAY_OUT = ("Delete that file: without last.pt the run trains again from step 0 (and keeps best.pt until a "
            "better validation replaces it); or pass --overwrite, which also deletes best.pt and the log.")


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size} bytes"
    except OSError:
        return "size unknown"


def _reason(err: BaseException) -> str:
    """What torch's error says, in a few plain words (never a raw ``[Errno 22]``)."""
    text = str(err)
    if isinstance(err, EOFError) or not text:
        return "it ends before its first record"
    if "central directory" in text:
        return "the end of the file is missing"
    if "not a ZIP archive" in text:
        return "it is not a torch zip archive"
    if isinstance(err, OSError):
        return "a record ends early"
    return "a record is damaged"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, its tensors on ``map_location`` (default
    the CPU: a checkpoint written on a GPU loads on a machine without one, and ``load_state_dict``
    copies the weights to wherever the model lives).

    Reads plain data only (``torch.load(weights_only=True)``): a file whose pickle would import
    anything (and so could run code) is refused with a :class:`CheckpointError` before anything in it
    runs; so are a truncated or corrupt file, each in one line naming the file and the way out."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}.")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise CheckpointError(
                f"{str(path)!r} is not a plain-data innerloop checkpoint: it asks to import {found.group(1)}, "
                "which could run code, so it was refused unread (nothing in it ran). Do not use a run "
                "folder or a checkpoint you did not write yourself.") from None
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint: it is corrupt, or not a plain-data innerloop "
            "checkpoint (only tensors, numbers, strings, lists and dicts are read; nothing in it ran). "
            + _WAY_OUT) from None
    except PermissionError as err:
        raise CheckpointError(f"{str(path)!r} cannot be read: {err.strerror or err}.") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        # a cut-off zip (no central directory; or "[Errno 22] Invalid argument" when cut inside a
        # tensor record), an empty file, a damaged record
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint: it is truncated or corrupt "
            f"({_size(path)}, {_reason(err)}). " + _WAY_OUT) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an innerloop checkpoint ({FORMAT}).")
    return payload


def check_state_compatible(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming the first difference between the tensors in
    ``state`` and those of ``module``: a missing or extra name, or a shape."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise CheckpointError(
            f"{source} was saved for another model: it lacks {missing[:4]} and has extra "
            f"{extra[:4]}. Load it with the config it was trained with (the checkpoint stores "
            "it: `innerloop eval CHECKPOINT`), or train into a new --out folder."
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source} was saved for another model: {k} has shape {tuple(state[k].shape)} "
                f"there but {tuple(v.shape)} here. Use the checkpoint's own config, or a new --out."
            )


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` after :func:`check_state_compatible` (a clear error instead
    of torch's list of mismatched keys)."""
    check_state_compatible(module, state, source)
    module.load_state_dict(state)


def identity_differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """``"key: checkpoint X, this run Y"`` for every setting where two identities differ (dotted keys)."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(wanted), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                out.append(f"{name}: not in the checkpoint, this run {wanted[key]!r}")
            elif key not in wanted:
                out.append(f"{name}: checkpoint {saved[key]!r}, not in this run")
            else:
                out += identity_differences(saved[key], wanted[key], name)
        return out
    return [] if saved == wanted else [f"{prefix or 'identity'}: checkpoint {saved!r}, this run {wanted!r}"]


def resume_into(module: nn.Module, path: str | Path, identity: dict[str, Any] | None) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``module`` for resuming a run, and return its payload.

    Refuses (with :class:`CheckpointError`) a checkpoint written with another ``identity`` (the
    settings a run must share with the one it continues) or for another model.
    """
    payload = load_checkpoint(path)
    if identity is not None and payload.get("identity") != identity:
        changed = identity_differences(payload.get("identity"), identity)
        raise CheckpointError(
            f"{path} belongs to a run with another configuration ({'; '.join(changed[:4])}); resume it with "
            "its own config, pass --overwrite to start again, or choose a new --out folder."
        )
    load_state(module, payload["state"], str(path))
    return payload

