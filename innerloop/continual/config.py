"""The settings of one continual-Omniglot run (``configs/continual_<method>.toml``): a frozen
dataclass, checked when built; read by ``benchmarks/continual_omniglot.py``.

A config file is one flat TOML table of the fields of :class:`ContinualConfig`; an unknown key, a
value of the wrong type or out of range is refused naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_type_hints

from innerloop.training.config import read_config_file
from innerloop.typecheck import typed

__all__ = ["METHODS", "ContinualConfig", "continual_config_from_dict", "load_continual_config"]

Method = Literal["oml", "anml", "pretrain"]
METHODS: tuple[str, ...] = ("oml", "anml", "pretrain")


@dataclass(frozen=True)
class ContinualConfig:
    """One method's network, training and meta-test settings on continual Omniglot."""

    method: Method
    """``oml``, ``anml`` (meta-learned) or ``pretrain`` (the OML network trained i.i.d.: the baseline)."""
    channels: int = 64
    """Conv width of the representation / prediction network (the papers: 256)."""
    nm_channels: int = 32
    """Conv width of ANML's neuromodulatory network (narrower than the prediction network in the ANML code)."""
    hidden: int = 256
    """Hidden width of OML's PLN (0: one linear layer)."""
    image_size: int = 28
    """Image side in pixels (ANML: 28; OML: 84)."""
    iterations: int = 20000
    """Most outer steps (ANML: 20,000); a ``--minutes`` budget may stop earlier."""
    inner_lr: float = 0.03
    """Meta-training inner SGD rate (one step per trajectory image)."""
    meta_lr: float = 1e-3
    """Adam rate of the outer loop."""
    remember: int = 64
    """Remember-batch images per task (ANML: 64)."""
    shots: int = 20
    """Trajectory images per class (all 20 drawings of a character)."""
    pretrain_lr: float = 0.05
    """The baseline's SGD rate."""
    pretrain_momentum: float = 0.9
    """The baseline's SGD momentum."""
    pretrain_batch: int = 64
    """The baseline's minibatch size."""
    classes: tuple[int, ...] = (10, 50, 100, 200, 300, 400, 500, 600)
    """Meta-test stream lengths ``N`` (at most the 659 evaluation characters)."""
    seeds: int = 3
    """Meta-test streams per ``N``."""
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)
    """Online rates searched per ``N`` on a separate stream."""
    seed: int = 0
    """Seeds the network's initialisation, the tasks and the reset rows."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, typed(getattr(self, f.name), hints[f.name], f.name))
        positive = ("channels", "nm_channels", "image_size", "remember", "shots", "pretrain_batch", "seeds")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} = {getattr(self, key)} must be >= 1.")
        for key in ("hidden", "iterations"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} = {getattr(self, key)} must be >= 0.")
        for key in ("inner_lr", "meta_lr", "pretrain_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} = {getattr(self, key)} must be > 0.")
        if not 0 <= self.pretrain_momentum < 1:
            raise ValueError(f"pretrain_momentum = {self.pretrain_momentum} must be in [0, 1).")
        if not self.classes or any(not 1 <= n <= 659 for n in self.classes):
            raise ValueError(f"classes = {list(self.classes)}: give stream lengths in 1..659 (the evaluation "
                             "characters).")
        if not self.lrs or any(not r > 0 for r in self.lrs):
            raise ValueError(f"lrs = {list(self.lrs)}: give one or more online rates > 0.")

    def override(self, changes: dict[str, Any]) -> ContinualConfig:
        """A copy with ``changes`` applied (checked again); unknown keys are refused."""
        return continual_config_from_dict({**dataclasses.asdict(self), **changes})


def continual_config_from_dict(data: dict[str, Any]) -> ContinualConfig:
    """:class:`ContinualConfig` from plain data (a TOML table), refusing unknown keys."""
    names = [f.name for f in dataclasses.fields(ContinualConfig)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown continual config key(s) {unknown}; the keys are {names}.")
    if "method" not in data:
        raise ValueError(f"a continual config needs method = one of {list(METHODS)}.")
    return ContinualConfig(**data)


def load_continual_config(path: str | Path) -> ContinualConfig:
    """Read ``path`` (one flat TOML or JSON table; see :class:`ContinualConfig`); a missing, unreadable or
    malformed file is refused naming it (:func:`innerloop.training.config.read_config_file`)."""
    path = Path(path)
    data = read_config_file(path)
    try:
        return continual_config_from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
