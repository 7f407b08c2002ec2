"""Checkpoints written atomically, and checked against the model they are loaded into."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from innerloop.io import atomic_write_bytes

FORMAT = "innerloop-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or was saved for another model or config."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` (tensors, dicts, numbers) to ``path`` atomically."""
    atomic_write_bytes(Path(path), lambda f: torch.save({"format": FORMAT, **payload}, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, its tensors on ``map_location`` (default
    the CPU: a checkpoint written on a GPU loads on a machine without one, and ``load_state_dict``
    copies the weights to wherever the model lives)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # corrupt or not a torch file
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint: {err}") from err
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

