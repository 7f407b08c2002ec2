"""Algorithms by name, as a config names them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from innerloop.algorithms.anil import ANIL, BOIL
from innerloop.algorithms.base import Algorithm, GradientBased
from innerloop.algorithms.baseline import Baseline, BaselinePP, train_classes
from innerloop.algorithms.imaml import IMAML
from innerloop.algorithms.maml import MAML
from innerloop.algorithms.mamlpp import MAMLPlusPlus
from innerloop.algorithms.matchingnet import MatchingNet
from innerloop.algorithms.pretrain import Pretrain
from innerloop.algorithms.protonet import ProtoNet
from innerloop.algorithms.reptile import Reptile
from innerloop.tasks import Objective


def _maml(model: nn.Module, objective: Objective, cfg: Any) -> GradientBased:
    return MAML(model, objective, cfg.inner_lr, cfg.inner_steps, cfg.first_order, cfg.lr_mode,
                cfg.adapt, cfg.vectorize, cfg.inner_weight_decay, cfg.weight_decay_mode)


def _fomaml(model: nn.Module, objective: Objective, cfg: Any) -> GradientBased:
    return MAML(model, objective, cfg.inner_lr, cfg.inner_steps, True, cfg.lr_mode, cfg.adapt,
                cfg.vectorize, cfg.inner_weight_decay, cfg.weight_decay_mode)


def _metasgd(model: nn.Module, objective: Objective, cfg: Any) -> GradientBased:
    return MAML(model, objective, cfg.inner_lr, cfg.inner_steps, cfg.first_order, "per_element",
                cfg.adapt, cfg.vectorize, cfg.inner_weight_decay, cfg.weight_decay_mode)


def _anil(model: nn.Module, objective: Objective, cfg: Any) -> GradientBased:
    return ANIL(model, objective, cfg.inner_lr, cfg.inner_steps, cfg.first_order, cfg.lr_mode, cfg.vectorize)


def _boil(model: nn.Module, objective: Objective, cfg: Any) -> GradientBased:
    return BOIL(model, objective, cfg.inner_lr, cfg.inner_steps, cfg.first_order, cfg.lr_mode, cfg.vectorize)


def _mamlpp(model: nn.Module, objective: Objective, cfg: Any) -> GradientBased:
    return MAMLPlusPlus(model, objective, cfg.inner_lr, cfg.inner_steps, cfg.msl_iterations,
                        cfg.first_order_iterations, cfg.first_order, cfg.per_step_bn, cfg.adapt, cfg.vectorize)


def _reptile(model: nn.Module, objective: Objective, cfg: Any) -> GradientBased:
    return Reptile(model, objective, cfg.inner_lr, cfg.inner_steps, cfg.inner_optimizer, cfg.inner_betas,
                   cfg.adapt, cfg.vectorize)


def _imaml(model: nn.Module, objective: Objective, cfg: Any) -> GradientBased:
    return IMAML(model, objective, cfg.inner_lr, cfg.inner_steps, cfg.reg_lambda, cfg.cg_steps, cfg.vectorize)


def _protonet(model: nn.Module, objective: Objective, cfg: Any) -> Algorithm:
    return ProtoNet(model)


def _matchingnet(model: nn.Module, objective: Objective, cfg: Any) -> Algorithm:
    return MatchingNet(model)


def _baseline(model: nn.Module, objective: Objective, cfg: Any) -> Algorithm:
    return Baseline(model, "linear", cfg.inner_lr)


def _baselinepp(model: nn.Module, objective: Objective, cfg: Any) -> Algorithm:
    return BaselinePP(model, cfg.inner_lr, cfg.cosine_scale)


def _pretrain(model: nn.Module, objective: Objective, cfg: Any) -> GradientBased:
    return Pretrain(model, objective, cfg.inner_lr, cfg.inner_steps, cfg.adapt)


WEIGHT_DECAY: tuple[str, ...] = ("maml", "fomaml", "metasgd")
"""Algorithms with the (learnable) inner weight decay option."""

FIXED_ADAPT: dict[str, str] = {"anil": "head.*", "boil": "features.*"}
"""Algorithms that fix which parameters adapt (``algorithm.adapt`` must stay ``all``)."""

EMBEDDING: tuple[str, ...] = ("protonet", "matchingnet")
"""Metric-based algorithms: the model is an embedding network without a head, so they classify
tasks of any number of ways and may meta-train with more ways (``task.train_ways``) than they test."""

GLOBAL_HEAD: tuple[str, ...] = ("baseline", "baselinepp")
"""Pre-training baselines: the model's head has one output per training class (a global label
space), and a new head is fitted per test task, so any number of test ways works."""

CLASSIFICATION_ONLY: tuple[str, ...] = EMBEDDING + GLOBAL_HEAD
"""Algorithms that need a classification family."""

ANY_TEST_WAYS: tuple[str, ...] = EMBEDDING + GLOBAL_HEAD
"""Algorithms whose test tasks may have another number of ways than ``task.ways``."""


def head_ways(name: str, ways: int, family: Any) -> int:
    """Output size of the model's ``head`` for algorithm ``name`` on a classification ``family``
    of ``ways``-way tasks: 0 (no head: an embedding network) for :data:`EMBEDDING`, the number
    of training classes for :data:`GLOBAL_HEAD`, else ``ways``."""
    if name in EMBEDDING:
        return 0
    if name in GLOBAL_HEAD:
        return train_classes(family)
    return ways


ALGORITHMS: dict[str, Callable[[nn.Module, Objective, Any], Algorithm]] = {
    "maml": _maml,
    "fomaml": _fomaml,
    "metasgd": _metasgd,
    "anil": _anil,
    "boil": _boil,
    "mamlpp": _mamlpp,
    "reptile": _reptile,
    "imaml": _imaml,
    "protonet": _protonet,
    "matchingnet": _matchingnet,
    "baseline": _baseline,
    "baselinepp": _baselinepp,
    "pretrain": _pretrain,
}
