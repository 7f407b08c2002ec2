"""Algorithms by name, derived from the algorithm classes: each class registers its own ``name``
and its ``variants`` (other names with fixed option values)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from innerloop.algorithms.anil import ANIL, BOIL
from innerloop.algorithms.base import Algorithm, AlgorithmOptions, Capabilities, ObjectiveFns, resolve_aliases
from innerloop.algorithms.baseline import Baseline, BaselinePP, train_classes
from innerloop.algorithms.imaml import IMAML
from innerloop.algorithms.maml import MAML
from innerloop.algorithms.mamlpp import MAMLPlusPlus
from innerloop.algorithms.matchingnet import MatchingNet
from innerloop.algorithms.metaoptnet import MetaOptNet
from innerloop.algorithms.pretrain import Pretrain
from innerloop.algorithms.protonet import ProtoNet
from innerloop.algorithms.reptile import Reptile
from innerloop.execution import Execution
from innerloop.tasks import Objective

CLASSES: tuple[type[Algorithm], ...] = (
    MAML, ANIL, BOIL, MAMLPlusPlus, Reptile, IMAML, ProtoNet, MatchingNet, MetaOptNet, Baseline, BaselinePP,
    Pretrain,
)


@dataclass(frozen=True)
class Entry:
    """A registered name: the class, and the option values the name fixes (``fomaml``: first order)."""

    cls: type[Algorithm]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def capabilities(self) -> Capabilities:
        return self.cls.capabilities

    def option_names(self) -> list[str]:
        """The options a config may set for this name (the class's, less the fixed ones)."""
        return [n for n in self.cls.option_names() if n not in self.fixed]

    def options(self, values: Mapping[str, Any] | None = None) -> AlgorithmOptions:
        """The options of this name from ``values`` (validated; unknown and fixed names refused)."""
        values = resolve_aliases(self.cls.Options, values or {})
        for key in values:
            if key in self.fixed:
                raise ValueError(f"{key} is fixed to {self.fixed[key]!r} by this algorithm; leave it out.")
        options: AlgorithmOptions = self.cls.make_options(None, {**values, **self.fixed})
        return options

    def build(self, model: nn.Module, objective: Objective | ObjectiveFns, options: AlgorithmOptions | None = None,
              execution: Execution | None = None) -> Algorithm:
        """The algorithm around ``model`` (``options`` default: this name's defaults)."""
        return self.cls(model, objective, self.options() if options is None else options, execution)


def _entries() -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for cls in CLASSES:
        out[cls.name] = Entry(cls)
        for variant, fixed in cls.variants.items():
            out[variant] = Entry(cls, dict(fixed))
    return out


ALGORITHMS: dict[str, Entry] = _entries()
"""Every algorithm name a config may give, in a stable order."""


def head_ways(name: str, ways: int, family: Any) -> int:
    """Output size of the model's ``head`` for algorithm ``name`` on a classification ``family``
    of ``ways``-way tasks: 0 (an embedding network), the number of training classes, or ``ways``."""
    head = ALGORITHMS[name].capabilities.head
    if head == "none":
        return 0
    if head == "train_classes":
        return train_classes(family)
    return ways
