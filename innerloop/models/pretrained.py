"""Load your own pretrained weights into a backbone's body (ANIL, ProtoNets, Baseline++, fine-tuning).

:func:`load_pretrained` reads a state dict with ``torch.load(weights_only=True)`` (a file cannot run
code), renames its keys to the model's (strip ``module.`` / ``encoder.``, or map one prefix onto
another), and copies the tensors into the model only after every check has passed: a shape that
differs is refused naming the key and both shapes, missing and unexpected keys are named, and the
head (``head.*``, sized to the ways of the run that wrote the file) is left alone unless asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did, by the model's key names.

    Attributes:
        loaded: keys copied into the model.
        missing: the model's keys the file did not give (kept as they were; only with ``strict=False``).
        unexpected: the file's keys (renamed) the model does not have (only with ``strict=False``).
        skipped: the file's head keys, left out because ``head=False``.
        ignored: the file's BatchNorm running statistics for layers that keep none (the model
            normalises with batch statistics).
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    skipped: tuple[str, ...]
    ignored: tuple[str, ...]


def _renamed(key: str, strip: Sequence[str], rename: Mapping[str, str]) -> str:
    for p in strip:
        if key.startswith(p):
            key = key[len(p):]
            break
    for old in sorted(rename, key=len, reverse=True):  # the longest matching prefix wins
        if key.startswith(old):
            return rename[old] + key[len(old):]
    return key


def _state_dict(path: Path, key: str | None) -> dict[str, Tensor]:
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"pretrained weights {str(path)!r} not found; give the path of a saved "
                                "state dict (torch.save(model.state_dict(), path)).") from None
    except Exception as err:  # an unpickling refusal (code in the file) or not a torch file
        raise ValueError(f"{str(path)!r} is not a state dict torch.load(weights_only=True) can read "
                         f"(only tensors and plain containers are allowed): {err}") from err
    where = repr(str(path))
    if key is not None:
        if not isinstance(data, Mapping) or key not in data:
            found = list(data)[:10] if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"{where} has no entry {key!r} (its top-level keys: {found}); give key=None or "
                             "one of those.")
        data, where = data[key], f"{where}[{key!r}]"
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{where} holds {type(data).__name__}, not a state dict (a non-empty mapping of names "
                         "to tensors); save model.state_dict().")
    others = [k for k, v in data.items() if not isinstance(v, Tensor)]
    if others:
        hint = (f"; the state dict may sit under one of them: give key={others[0]!r}"
                if any(isinstance(data[k], Mapping) for k in others) else "")
        raise ValueError(f"{where} is not a state dict: entries {others[:5]} are not tensors{hint}.")
    return {str(k): v for k, v in data.items()}


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    key: str | None = None,
    prefix: str | Sequence[str] | None = None,
    rename: Mapping[str, str] | None = None,
    head: bool = False,
    strict: bool = True,
) -> LoadReport:
    """Copy a saved state dict into ``model`` (in place, on the model's device and dtype).

    Args:
        model: the network (e.g. :class:`~innerloop.models.ResNet12`); its own key names are the target.
        path: a file written by ``torch.save(state_dict, path)`` (read with ``weights_only=True``).
        key: the entry of the file that holds the state dict (``"state_dict"``, FEAT's ``"params"``,
            ...); ``None``: the file is the state dict.
        prefix: prefix(es) stripped from the file's keys where present (``"module."`` of
            ``DataParallel``, ``"encoder."``).
        rename: prefix replacements applied after ``prefix`` (the longest match wins), e.g.
            ``{"encoder.": "features."}`` for a FEAT ResNet-12, ``{"": "features."}`` for a body saved
            on its own (MetaOptNet's: ``key="embedding", prefix="module."`` with it).
        head: also load ``head.*`` (same ways as the file's); ``False`` (default) leaves the model's
            head as it is and skips the file's.
        strict: refuse missing and unexpected keys (outside the head); ``False`` loads what matches
            and lists the rest in the report. Shapes that differ are refused either way.

    Returns:
        a :class:`LoadReport`.

    Raises:
        ValueError: naming the key and both shapes for a shape mismatch, the keys for a strict load,
            and the way out; nothing is copied then.
    """
    strip = [prefix] if isinstance(prefix, str) else list(prefix or ())
    rename = dict(rename or {})
    own = model.state_dict()
    source = _state_dict(Path(path), key)
    mapped: dict[str, Tensor] = {}
    for k, v in source.items():
        new = _renamed(k, strip, rename)
        if new in mapped:
            raise ValueError(f"two keys of the file map to {new!r} (one of them {k!r}); change prefix= or "
                             "rename=.")
        mapped[new] = v

    def is_head(name: str) -> bool:
        return name == "head" or name.startswith("head.")

    skipped = sorted(k for k in mapped if is_head(k) and not head)
    stats = {n.rsplit(".", 1)[0] for n in own if n.endswith(RUNNING_STATS)}
    ignored = sorted(k for k in mapped if k not in own and k.endswith(RUNNING_STATS)
                     and k.rsplit(".", 1)[0] not in stats and not is_head(k))
    wanted = {k: v for k, v in mapped.items() if k not in skipped and k not in ignored}
    unexpected = sorted(k for k in wanted if k not in own)
    missing = sorted(k for k in own if k not in wanted and (head or not is_head(k)))
    for k, v in wanted.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"pretrained {k}: the file's shape {tuple(v.shape)} differs from the model's "
                             f"{tuple(own[k].shape)}; build the model with the file's sizes (widths, channels, "
                             "ways for a head), or map the key elsewhere with rename=.")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"the model's {missing[:6]}{' ...' if len(missing) > 6 else ''} ({len(missing)}) are "
                         "not in the file")
        if unexpected:
            parts.append(f"the file's {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} ({len(unexpected)}) "
                         "are not in the model")
        sample = next(iter(source))
        raise ValueError(f"pretrained weights {str(path)!r} do not match the model: {'; '.join(parts)}. The "
                         f"file's keys look like {sample!r}, the model's like {next(iter(own))!r}: map them with "
                         "prefix= / rename=, or load what matches with strict=False.")
    loaded = sorted(k for k in wanted if k in own)
    if not loaded:
        raise ValueError(f"no key of {str(path)!r} matches the model (the file's look like "
                         f"{next(iter(source))!r}, the model's like {next(iter(own))!r}); map them with "
                         "prefix= / rename=.")
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(wanted[k])
    return LoadReport(tuple(loaded), tuple(missing), tuple(unexpected), tuple(skipped), tuple(ignored))
