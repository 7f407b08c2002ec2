"""Typed run configuration, read from TOML or JSON and validated before any work starts.

The default :class:`Config` *is* the embedded default run (MAML on the sinusoid family), so
``innerloop train`` with no arguments and ``innerloop train --config FILE`` share one path: a
file only overrides what it names.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

from innerloop.algorithms.base import Algorithm, AlgorithmOptions, ObjectiveFns, custom_objective, resolve_aliases
from innerloop.algorithms.baseline import Baseline
from innerloop.algorithms.registry import ALGORITHMS
from innerloop.data.augment import KOCH, Augment
from innerloop.data.regression import FAMILIES
from innerloop.data.sampling import IMAGE_FAMILIES
from innerloop.execution import Execution
from innerloop.models.mlp import ACTIVATIONS
from innerloop.training.loggers import LOGGER_NAMES
from innerloop.typecheck import typed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class TaskConfig:
    """Which task family to meta-learn on."""

    family: str = "sinusoid"
    """Regression: ``sinusoid``, ``sinusoid-shifted``, ``sinusoid-sum``, ``linear``.
    Classification: ``omniglot``, ``miniimagenet``, ``image-folder``."""
    shots: int = 10
    """Support examples per task (regression) or per class (classification) in meta-training (K)."""
    queries: int = 10
    """Query examples per task (regression) or per class (classification) in meta-training."""
    seed: int = 0
    """Family seed: fixes every task of every split."""
    ways: int = 5
    """Classes per task (N), classification only."""
    train_ways: int | None = None
    """Classes per meta-training task when it differs from ``ways`` (ProtoNets trains with more)."""
    split: str = "vinyals"
    """Omniglot class split: ``vinyals``, ``lake`` or ``maml``."""
    within_alphabet: bool = False
    """Omniglot: draw all classes of a task from one alphabet (the harder original protocol), in every
    split; ``sampling.<split>.within_alphabet`` sets it for one split."""
    image_size: int | None = None
    """Side of the resized images (default 28 for Omniglot, 32 for CIFAR-FS and FC100, 84 for the others)."""
    data_root: str | None = None
    """Omniglot: the folder with the archives (default ``$INNERLOOP_DATA/omniglot``);
    miniImageNet: the folder with the images (default ``$INNERLOOP_DATA/miniimagenet/images``);
    image-folder: a folder with ``train/``, ``val/``, ``test/`` each holding ``<class>/*.png``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the family (e.g. ``amplitude_range = [0.1, 5.0]``)."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig())
    """How the tasks of each split are drawn: ``[task.sampling.train]``, ``[task.sampling.val]``,
    ``[task.sampling.test]``."""
    split_options: SplitOptions = field(default_factory=lambda: SplitOptions())
    """How the Omniglot class split is made: ``[task.split_options]``."""
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig())
    """Task augmentation of the meta-training tasks (image families): ``[task.augment]``; off by default."""


@dataclass(frozen=True)
class SplitSampling:
    """How the tasks of one split are drawn (classification families)."""

    within_alphabet: bool | None = None
    """Draw all classes of a task from one alphabet (Omniglot; one group of an image dataset);
    ``None``: ``task.within_alphabet``."""
    distinct_drawers: bool = False
    """Omniglot: the support images of a task by ``shots`` drawers and its queries by ``queries`` other
    drawers, the same for every class (Lake et al. 2015's one-shot runs: with ``within_alphabet``,
    ``eval.ways = 20``, ``eval.shots = 1``, ``eval.queries = 1`` on the ``lake`` split's test split)."""


@dataclass(frozen=True)
class SamplingConfig:
    """Per-split sampling options; a split's ``None`` keeps the value of ``task``."""

    train: SplitSampling = field(default_factory=SplitSampling)
    """Meta-training tasks."""
    val: SplitSampling = field(default_factory=SplitSampling)
    """Validation tasks (they pick ``best.pt``)."""
    test: SplitSampling = field(default_factory=SplitSampling)
    """Test tasks."""


@dataclass(frozen=True)
class SplitOptions:
    """How Omniglot's classes are split (``task.split``); see :class:`innerloop.data.omniglot.Omniglot`."""

    rotations: bool | None = None
    """Rotations by 90/180/270 degrees as extra classes (``None``: the split's own rule: vinyals and
    maml yes, lake no)."""
    split_seed: int = 0
    """Seeds the held-out validation alphabets of ``lake`` and the character order of ``maml``."""
    lake_val_alphabets: int = 5
    """``lake``: background alphabets held out for validation (0 to 29)."""
    maml_train: int = 1200
    """``maml``: characters for train + val (the rest is test)."""
    maml_val: int = 100
    """``maml``: of those, characters held out for validation (0: no val split)."""

    def omniglot_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~innerloop.data.omniglot.Omniglot` these stand for."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AugmentConfig:
    """Task augmentation (:mod:`innerloop.data.augment`): each meta-training task is distorted, the same
    way for the same task index in every run (resumed or not, prefetching or not). All off by default."""

    preset: Literal["", "koch"] = ""
    """``koch``: Koch et al. (2015)'s affine ranges (rotation 10 degrees, shear 0.3, scale 0.2,
    translation 2/105 of the side, each with probability 0.5); then leave the four ranges at 0."""
    rotation: float = 0.0
    """Largest rotation in degrees (0 to 180)."""
    shear: float = 0.0
    """Largest shear factor per axis (0 to < 1)."""
    scale: float = 0.0
    """Largest relative scale change per axis (0 to < 1)."""
    translation: float = 0.0
    """Largest shift per axis, a fraction of the image side (0 to < 1)."""
    probability: float = 0.5
    """Each component (rotation, shear, scale, translation) applies to an image with this probability."""
    class_rotations: bool = False
    """Turn every class of a task by a random multiple of 90 degrees (rotated characters as new classes)."""
    strength: float = 1.0
    """Multiplies every range (0: no distortion)."""

    def build(self) -> Augment:
        """The :class:`~innerloop.data.augment.Augment` this stands for (:class:`ValueError` if invalid)."""
        ranges = {"rotation": self.rotation, "shear": self.shear, "scale": self.scale,
                  "translation": self.translation}
        if self.preset == "koch":
            given = [k for k, v in ranges.items() if v]
            if given:
                raise ValueError(f"{given[0]} = {ranges[given[0]]!r} is set with preset = 'koch', which fixes the "
                                 "ranges; leave the ranges out or set preset = ''.")
            ranges = {k: getattr(KOCH, k) for k in ranges}
        return Augment(**ranges, probability=self.probability, class_rotations=self.class_rotations,
                       strength=self.strength)


def within_alphabet(task: TaskConfig) -> dict[str, bool]:
    """``{split: within_alphabet}`` of a task config: each split's own value, else ``task.within_alphabet``."""
    s = task.sampling
    return {name: task.within_alphabet if part.within_alphabet is None else part.within_alphabet
            for name, part in (("train", s.train), ("val", s.val), ("test", s.test))}


def distinct_drawers(task: TaskConfig) -> dict[str, bool]:
    """``{split: distinct_drawers}`` of a task config (``task.sampling.<split>.distinct_drawers``)."""
    s = task.sampling
    return {name: part.distinct_drawers for name, part in (("train", s.train), ("val", s.val), ("test", s.test))}


def tta_augment(cfg: Config) -> Augment:
    """The distortions of test-time augmentation (``eval.tta``): ``task.augment``'s affine ranges when it
    has any, else Koch et al.'s (:data:`~innerloop.data.augment.KOCH`); never rotation classes."""
    aug = dataclasses.replace(cfg.task.augment.build(), class_rotations=False)
    return aug if aug.affine else KOCH


@dataclass(frozen=True)
class ModelConfig:
    """The network adapted to each task."""

    name: Literal["mlp", "conv4", "resnet12", "wrn28_10"] = "mlp"
    """``mlp`` (regression); for images ``conv4``, ``resnet12`` (MetaOptNet / FEAT's ResNet-12) or
    ``wrn28_10`` (WRN-28-10)."""
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    """MLP hidden widths."""
    activation: str = "relu"
    """MLP activation."""
    filters: int = 64
    """conv4: filters per block (64 Omniglot, 32 MAML's miniImageNet)."""
    pool: Literal["max", "stride"] = "max"
    """conv4: 2x2 max-pool after each block, or stride-2 convolutions."""
    norm: Literal["batch", "none"] = "batch"
    """conv4, resnet12, wrn28_10: BatchNorm with the statistics of each batch (transductive), or none."""
    widths: list[int] = field(default_factory=lambda: [64, 160, 320, 640])
    """resnet12: filters of the four blocks."""
    drop_rate: float = 0.0
    """resnet12: dropout (blocks 1-2) and DropBlock (blocks 3-4) rate; wrn28_10: dropout in each block.
    Training only; a loop over tasks (``execution.vectorize = "vmap"`` cannot draw the masks)."""
    dropblock_size: int = 5
    """resnet12: DropBlock's block side."""
    avg_pool: bool = True
    """resnet12: global average pool (``[batch, 640]``) or flatten (MetaOptNet's ``640 * 5 * 5`` at 84 px)."""
    pretrained: str | None = None
    """A state dict (``torch.save(model.state_dict(), path)``, read with ``weights_only=True``) loaded into
    the body before training; the head is left as built (:func:`innerloop.models.load_pretrained`)."""
    pretrained_key: str | None = None
    """The entry of the ``pretrained`` file that holds the state dict (``"state_dict"``, FEAT's ``"params"``)."""
    pretrained_rename: dict[str, str] = field(default_factory=dict)
    """Key prefixes of the ``pretrained`` file mapped to the model's (``{"encoder." = "features."}``)."""


MODEL_ADDED_KEYS: tuple[str, ...] = ("widths", "drop_rate", "dropblock_size", "avg_pool", "pretrained",
                                     "pretrained_key", "pretrained_rename")
"""``model`` settings added after 0.1.0: part of a checkpoint identity only when they differ from
their defaults (so older checkpoints still resume)."""
IMAGE_MODELS: tuple[str, ...] = ("conv4", "resnet12", "wrn28_10")


CONFIG_INNER_STEPS = 1
"""``algorithm.inner_steps`` of a config that does not set it, for every algorithm (0.1.0's default;
the Python keyword defaults differ: ``Reptile(model)`` takes 5 steps, ``IMAML(model)`` 10)."""


def _default_options() -> AlgorithmOptions:
    return ALGORITHMS["maml"].options()


@dataclass(frozen=True)
class AlgorithmConfig:
    """The meta-learning algorithm: ``name`` and that algorithm's options.

    In a config file the options sit beside the name (``[algorithm] name = "maml"  inner_lr = 0.4``);
    which keys are allowed, their types and ranges come from the algorithm's own options dataclass
    (``innerloop.algorithms.MAMLOptions``, ...), so a file cannot set an option the algorithm lacks.
    """

    name: str = "maml"
    """One of :data:`innerloop.algorithms.ALGORITHMS`: ``maml``, ``fomaml``, ``metasgd``, ``anil``,
    ``boil``, ``mamlpp``, ``reptile``, ``imaml``, ``protonet``, ``matchingnet``, ``baseline``,
    ``baselinepp``, ``pretrain``."""
    options: AlgorithmOptions = field(default_factory=_default_options)
    """The algorithm's options (an instance of its ``Options`` dataclass)."""

    def __post_init__(self) -> None:
        if self.name not in ALGORITHMS:
            raise ConfigError(f"algorithm.name = {self.name!r} is invalid: choose one of {list(ALGORITHMS)}.")
        entry = ALGORITHMS[self.name]
        if not isinstance(self.options, entry.cls.Options):
            raise ConfigError(f"algorithm.options for {self.name} must be {entry.cls.Options.__name__}, "
                              f"got {type(self.options).__name__}.")
        for key, value in entry.fixed.items():
            given = getattr(self.options, key)
            if given != value:
                raise ConfigError(f"algorithm.{key} = {given!r} is invalid: {self.name} fixes it to {value!r} "
                                  f"(use name = {entry.cls.name!r} to choose it).")

    def __getattr__(self, key: str) -> Any:
        # cfg.algorithm.inner_lr reads the option (the sections of a config read alike)
        if key in ("name", "options"):
            raise AttributeError(key)
        return getattr(self.options, key)

    def to_dict(self) -> dict[str, Any]:
        """The flat table of a config file: ``name`` and every option."""
        return {"name": self.name, **{k: (list(v) if isinstance(v, tuple) else v)
                                      for k, v in dataclasses.asdict(self.options).items()
                                      if k not in ALGORITHMS[self.name].fixed}}

    @staticmethod
    def from_table(table: Mapping[str, Any], key: str = "algorithm") -> AlgorithmConfig:
        """From a config file's flat ``[algorithm]`` table, every option type-checked and validated."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{key} must be a table of settings, got {table!r}.")
        values = dict(table)
        name = values.pop("name", "maml")
        if not isinstance(name, str) or name not in ALGORITHMS:
            raise ConfigError(f"{key}.name = {name!r} is invalid: choose one of {list(ALGORITHMS)}.")
        entry = ALGORITHMS[name]
        hints = get_type_hints(entry.cls.Options)
        aliases = entry.cls.Options.aliases
        allowed = entry.option_names()
        try:
            resolve_aliases(entry.cls.Options, values)
        except ValueError as err:
            raise ConfigError(f"{key}.{err}") from err
        checked = {}
        for k, v in values.items():
            field_name = aliases.get(k, k)
            if field_name not in allowed:
                hint = ""
                if field_name in entry.fixed:
                    hint = f" ({field_name} is fixed to {entry.fixed[field_name]!r} by {name})"
                pattern = getattr(entry.cls, "adapt_pattern", None)
                if field_name == "adapt" and pattern:
                    hint = f" ({name} always adapts {pattern!r}; use name = 'maml' with your adapt patterns)"
                raise ConfigError(f"unknown config key {f'{key}.{k}'!r} for {name}{hint}; {name}'s options are: "
                                  f"name, {', '.join(allowed)}.")
            checked[field_name] = _check(v, hints[field_name], f"{key}.{k}")
        if "inner_steps" in allowed:  # a config's default, as in 0.1.0, whatever the class's keyword default
            checked.setdefault("inner_steps", CONFIG_INNER_STEPS)
        try:
            return AlgorithmConfig(name, entry.options(checked))
        except ValueError as err:
            raise ConfigError(f"{key}.{err}") from err


@dataclass(frozen=True)
class TrainConfig:
    """The outer loop."""

    iterations: int = 10000
    meta_batch_size: int = 25
    outer_lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    """The outer optimiser. Reptile's interpolation ``theta += eps (phi - theta)`` is ``sgd`` with
    ``outer_lr = eps``."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Outer learning rate over training: ``constant``; ``linear`` from ``outer_lr`` to
    ``final_outer_lr`` (Reptile's annealed step size); ``cosine`` from ``outer_lr`` to
    ``final_outer_lr`` (MAML++). A function of the iteration, so resumes stay exact."""
    final_outer_lr: float = 0.0
    """The outer learning rate that ``linear`` and ``cosine`` reach at the last iteration."""
    validate_every: int = 1000
    val_tasks: int = 200
    log_every: int = 50
    seed: int = 0
    """Seed of the model's initialisation (tasks are fixed by ``task.seed``)."""
    dist_timeout_s: float = 300.0
    """Under torchrun: seconds a collective waits for the other ranks before the run stops."""
    grad_clip: float | None = None
    """Clip the meta-gradient's global L2 norm to this (``None``: no clipping); the norm before
    clipping is logged as ``grad_norm``."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where the metrics go: any of ``jsonl`` (``metrics.jsonl`` in the run folder), ``tensorboard``,
    ``wandb``, ``csv``; ``[]``: none."""


@dataclass(frozen=True)
class EvalConfig:
    """Meta-testing: fixed test tasks, metric after 0..steps adaptation steps, with 95% CIs."""

    test_tasks: int = 600
    steps: int = 10
    ways: int | None = None
    """Classes per test task (``None``: ``task.ways``)."""
    report_steps: list[int] = field(default_factory=lambda: [0, 1, 5, 10])
    shots: int | None = 5
    """Support examples per test task (``None``: as in training)."""
    queries: int | None = 100
    """Query examples per test task (``None``: as in training)."""
    baseline: bool = True
    """Also train and test the transfer-learning baseline (pre-train, then fine-tune)."""
    baseline_iterations: int | None = None
    """Pre-training iterations of the baseline (``None``: as many as meta-training)."""
    plot_tasks: int = 3
    tta: int = 1
    """Test-time augmentation: copies of each test task (1: off). Copy 0 is the task, the others are
    distorted (``task.augment``'s affine ranges, else Koch et al.'s); the support copies are pooled and
    each query's class probabilities averaged over its copies; the loss column is the mean over copies."""


@dataclass(frozen=True)
class ObjectiveConfig:
    """A loss (and metric) of your own instead of the family's (MSE for regression; cross-entropy and
    accuracy for classification), given by import path: ``loss = "mypackage.losses:l1"`` names a
    function ``(pred, target) -> scalar tensor`` (differentiable, twice for second-order algorithms).
    The paths are imported when the config is checked, so a wrong one fails before any work."""

    loss: str = ""
    """``"package.module:function"``: the loss to train and adapt with; empty: the family's default
    (and then no other key of this section may be set)."""
    metric: str = ""
    """``"package.module:function"``: the metric reported after adaptation; empty: the loss itself
    (lower is better)."""
    metric_name: str = ""
    """The metric's name in logs and tables (empty: the function's name)."""
    higher_is_better: bool | None = None
    """Whether a higher metric is better (it picks the best checkpoint); needed with a ``metric``."""
    targets: Literal["", "values", "labels", "any"] = ""
    """The shape rule checked on every call: ``values`` (prediction and target of the same shape),
    ``labels`` (``[n, classes]`` scores and ``[n]`` integer labels) or ``any``; empty: the family's
    (``values`` for regression, ``labels`` for classification)."""


def load_callable(path: str, key: str) -> Callable[..., Any]:
    """The callable that the import path ``"package.module:name"`` (``name`` may be dotted) names;
    :class:`ConfigError` naming ``key`` and ``path`` when it does not import or is not callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key} = {path!r} is invalid: give an import path 'package.module:function' "
                          "(e.g. 'torch.nn.functional:l1_loss').")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own error while importing
        why = f"{type(err).__name__}: {err}"
        raise ConfigError(f"{key} = {path!r}: module {module_name!r} does not import ({why}); check the "
                          "spelling and that the package is installed or on PYTHONPATH.") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key} = {path!r}: {module_name!r} has no {attr!r}; name a function defined there.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key} = {path!r} names {type(obj).__name__} {obj!r}, not a function; name a function "
                          "(pred, target) -> scalar tensor.")
    fn: Callable[..., Any] = obj
    return fn


def build_objective(o: ObjectiveConfig, kind: Literal["regression", "classification"]) -> ObjectiveFns | None:
    """The :class:`~innerloop.algorithms.base.ObjectiveFns` of an ``[objective]`` section for tasks of
    ``kind``; ``None`` when it sets no loss (the family's default). Raises :class:`ConfigError`."""
    if not o.loss:
        given = [f.name for f in dataclasses.fields(o) if getattr(o, f.name) != f.default]
        if given:
            raise ConfigError(f"objective.{given[0]} = {getattr(o, given[0])!r} is set without objective.loss; "
                              "set objective.loss too (a metric goes with a loss of your own), or leave the "
                              "section out.")
        return None
    loss = load_callable(o.loss, "objective.loss")
    metric = load_callable(o.metric, "objective.metric") if o.metric else None
    try:
        return custom_objective(loss, metric, kind=kind, metric_name=o.metric_name or None,
                                higher_is_better=o.higher_is_better, targets=o.targets or None)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"objective: {err}") from err


@dataclass(frozen=True)
class Config:
    """A whole run."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    execution: Execution = field(default_factory=Execution)
    """How meta-batches run (vmap, loop, task threads, memory layout, checkpointed inner steps) and where
    (``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``precision``: ``fp32``, ``bf16``,
    ``fp16``): the fields of :class:`innerloop.execution.Execution`. The same results on every setting
    of the first five; the device is checked to exist when the run starts."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """A loss and metric of your own (import paths), instead of the family's."""
    out_dir: str = "runs/sinusoid-maml"

    def to_dict(self) -> dict[str, Any]:
        """The config as the tables of a config file (the algorithm's options flat beside its name)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: (v.to_dict() if isinstance(v, AlgorithmConfig) else
                    dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v)
                for k, v in out.items()}

    def __post_init__(self) -> None:
        self._check()

    def validate(self) -> Config:
        """The config itself: a :class:`Config` is checked when it is built (and frozen after), so it
        is valid by construction. Kept for callers of innerloop 0.1.0."""
        return self

    def override(self, changes: Mapping[str, Any]) -> Config:
        """A new config with ``changes`` applied, checked like a config file: keys are dotted paths
        (``"train.iterations"``, ``"algorithm.inner_lr"``, ``"out_dir"``); a changed
        ``algorithm.name`` starts that algorithm from its defaults (plus the ``algorithm.*`` given)."""
        data = self.to_dict()
        if "algorithm.name" in changes and changes["algorithm.name"] != self.algorithm.name:
            data["algorithm"] = {}
        moved = {f"algorithm.{k}": f"execution.{k}" for k in LEGACY_ALGORITHM_KEYS}  # 0.1.0's place of them
        return config_from_dict(apply_overrides(data, {moved.get(k, k): v for k, v in changes.items()}))

    def _check(self) -> None:
        """Types (for a config built in Python; a file's are checked as it is read) and the ranges
        that types alone cannot express; raises :class:`ConfigError`."""
        for section in ("task", "model", "train", "eval", "objective"):
            check_types(getattr(self, section), section)
        _check(self.out_dir, str, "out_dir")

        def need(ok: bool, key: str, value: Any, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{key} = {value!r} is invalid: {rule}.")

        t, m, a, tr, e = self.task, self.model, self.algorithm, self.train, self.eval
        can = ALGORITHMS[a.name].capabilities
        families = [*FAMILIES, *IMAGE_FAMILIES]
        need(t.family in families, "task.family", t.family, f"choose one of {families}")
        need(t.shots >= 1, "task.shots", t.shots, "K must be >= 1")
        need(t.queries >= 1, "task.queries", t.queries, "must be >= 1")
        need(t.ways >= 1, "task.ways", t.ways, "N must be >= 1")
        need(t.train_ways is None or t.train_ways >= t.ways, "task.train_ways", t.train_ways,
             f"must be >= task.ways ({t.ways}) or null")
        need(t.split in ("vinyals", "lake", "maml"), "task.split", t.split, "choose vinyals, lake or maml")
        need(t.image_size is None or t.image_size >= 16, "task.image_size", t.image_size, "must be >= 16")
        try:
            aug = t.augment.build()
        except ValueError as err:
            raise ConfigError(f"task.augment.{err}") from err
        need(not aug.active or t.family in IMAGE_FAMILIES, "task.augment", dataclasses.asdict(t.augment),
             f"augmentation distorts images; task.family {t.family!r} has none (leave [task.augment] out)")
        cls = ALGORITHMS[self.algorithm.name].cls
        # the Baseline's global-label batches are augmented as the tasks are (rotation classes: new classes)
        reaches = cls.training_family in (Algorithm.training_family, Baseline.training_family)
        need(not aug.active or reaches, "task.augment",
             dataclasses.asdict(t.augment), f"algorithm {self.algorithm.name!r} pre-trains on batches of its own "
             "(training_family), which task augmentation does not reach; leave [task.augment] out")
        need(not any(distinct_drawers(t).values()) or t.family == "omniglot", "task.sampling.<split>."
             "distinct_drawers", distinct_drawers(t), "only Omniglot records who drew each image; set it false")
        need(self.eval.tta >= 1, "eval.tta", self.eval.tta, "give the copies per test task (1: off)")
        need(self.eval.tta == 1 or t.family in IMAGE_FAMILIES, "eval.tta", self.eval.tta,
             f"test-time augmentation distorts images; task.family {t.family!r} has none (set 1)")
        so = t.split_options
        need(t.family == "omniglot" or so == SplitOptions(), "task.split_options", dataclasses.asdict(so),
             f"these options make Omniglot's class split; task.family {t.family!r} takes none (leave them out)")
        need(so.lake_val_alphabets >= 0, "task.split_options.lake_val_alphabets", so.lake_val_alphabets,
             "must be >= 0 (and less than the 30 background alphabets)")
        need(so.maml_train >= 1, "task.split_options.maml_train", so.maml_train, "must be >= 1")
        need(0 <= so.maml_val < so.maml_train, "task.split_options.maml_val", so.maml_val,
             f"must lie in 0..maml_train - 1 ({so.maml_train - 1})")
        unknown = [n for n in tr.loggers if n not in LOGGER_NAMES]
        need(not unknown, "train.loggers", tr.loggers, f"choose among {list(LOGGER_NAMES)}")
        need(len(set(tr.loggers)) == len(tr.loggers), "train.loggers", tr.loggers, "name each logger once")
        images = t.family in IMAGE_FAMILIES
        need(images == (m.name in IMAGE_MODELS), "model.name", m.name,
             f"task.family {t.family!r} needs model.name = "
             + (f"one of {list(IMAGE_MODELS)}" if images else "'mlp'"))
        need(len(m.widths) == 4 and all(w >= 1 for w in m.widths), "model.widths", m.widths,
             "give four widths >= 1 (e.g. [64, 160, 320, 640])")
        need(0.0 <= m.drop_rate < 1.0, "model.drop_rate", m.drop_rate, "must lie in [0, 1)")
        need(m.dropblock_size >= 1, "model.dropblock_size", m.dropblock_size, "must be >= 1")
        need(m.drop_rate == 0.0 or m.name in ("resnet12", "wrn28_10"), "model.drop_rate", m.drop_rate,
             "only resnet12 and wrn28_10 have dropout; set 0")
        need(m.drop_rate == 0.0 or self.execution.vectorize != "vmap", "model.drop_rate", m.drop_rate,
             "dropout masks cannot be drawn under execution.vectorize = 'vmap'; use 'auto' or 'loop', or 0")
        need(m.pretrained is None or m.name in IMAGE_MODELS, "model.pretrained", m.pretrained,
             "pretrained weights are for the image backbones (conv4, resnet12, wrn28_10)")
        need(m.filters >= 1, "model.filters", m.filters, "must be >= 1")
        need("classification" in can.objectives or not images, "algorithm.name", a.name,
             f"{a.name} learns regression tasks only")
        need("regression" in can.objectives or images, "algorithm.name", a.name,
             f"{a.name} needs a classification family")
        need(not (e.baseline and images), "eval.baseline", e.baseline,
             "the transfer baseline is for regression families here; set eval.baseline = false")
        need(e.ways is None or e.ways >= 1, "eval.ways", e.ways, "N must be >= 1")
        need(can.any_test_ways or (e.ways or t.ways) == t.ways, "eval.ways", e.ways,
             f"a model with a {t.ways}-way head is tested on {t.ways}-way tasks; set eval.ways = {t.ways}")
        need(can.more_train_ways or t.train_ways in (None, t.ways), "task.train_ways", t.train_ways,
             f"{a.name} trains and tests with the same ways; only algorithms without a head (protonet, "
             "matchingnet) train with more")
        need(all(h >= 1 for h in m.hidden), "model.hidden", m.hidden, "widths must be >= 1")
        need(m.activation in ACTIVATIONS, "model.activation", m.activation,
             f"choose one of {list(ACTIVATIONS)}")
        need(tr.iterations >= 1, "train.iterations", tr.iterations, "must be >= 1")
        need(tr.meta_batch_size >= 1, "train.meta_batch_size", tr.meta_batch_size, "must be >= 1")
        need(tr.outer_lr > 0, "train.outer_lr", tr.outer_lr, "must be > 0")
        need(tr.final_outer_lr >= 0, "train.final_outer_lr", tr.final_outer_lr,
             "must be >= 0 (the rate a linear or cosine lr_schedule ends at)")
        need(tr.validate_every >= 1, "train.validate_every", tr.validate_every, "must be >= 1")
        need(tr.val_tasks >= 1, "train.val_tasks", tr.val_tasks, "must be >= 1")
        need(tr.log_every >= 1, "train.log_every", tr.log_every, "must be >= 1")
        need(tr.dist_timeout_s > 0, "train.dist_timeout_s", tr.dist_timeout_s, "must be > 0")
        need(tr.grad_clip is None or tr.grad_clip > 0, "train.grad_clip", tr.grad_clip,
             "must be > 0 (or null: off)")
        need(e.test_tasks >= 1, "eval.test_tasks", e.test_tasks, "must be >= 1 (600 for a paper table)")
        need(e.steps >= 0, "eval.steps", e.steps, "must be >= 0")
        need(all(0 <= s <= e.steps for s in e.report_steps), "eval.report_steps", e.report_steps,
             f"each must lie in 0..eval.steps ({e.steps})")
        need(e.shots is None or e.shots >= 1, "eval.shots", e.shots, "K must be >= 1")
        need(e.queries is None or e.queries >= 1, "eval.queries", e.queries, "must be >= 1")
        need(e.baseline_iterations is None or e.baseline_iterations >= 1,
             "eval.baseline_iterations", e.baseline_iterations, "must be >= 1")
        need(e.plot_tasks >= 0, "eval.plot_tasks", e.plot_tasks, "must be >= 0")
        for key, value in (("train.val_tasks", tr.val_tasks), ("eval.test_tasks", e.test_tasks)):
            need(value <= MAX_TASKS, key, value, f"at most {MAX_TASKS:,} tasks are evaluated")
        refuse_what_cannot_fit(memory_estimates(self))
        build_objective(self.objective, self.objective_kind)  # imports the paths: a wrong one fails here

    @property
    def objective_kind(self) -> Literal["regression", "classification"]:
        """``classification`` for the image families, ``regression`` for the rest."""
        return "classification" if self.task.family in IMAGE_FAMILIES else "regression"


MAX_TASKS = 1_000_000
"""The most validation or test tasks a config may ask for."""
EVAL_CHUNK_TASKS = 100
"""Tasks that :func:`~innerloop.training.evaluate.meta_test` holds at once."""


def memory_budget() -> int:
    """The bytes a run may plan to hold: this machine's physical memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not Linux
        return 64 * 2**30


def _example_bytes(cfg: Config) -> int:
    """Bytes of one input example (float32) and its target."""
    t = cfg.task
    if t.family in IMAGE_FAMILIES:
        side = t.image_size or {"omniglot": 28, "cifar-fs": 32, "fc100": 32}.get(t.family, 84)
        channels = 1 if t.family == "omniglot" else 3
        return 4 * channels * side * side + 8
    dim = int(t.options.get("dim", 1)) if isinstance(t.options.get("dim", 1), int) else 1
    return 4 * (dim + 1)


MemoryEstimate = tuple[str, Any, int, str]
"""``(setting, its value, bytes it implies at least, what those bytes hold)``."""


def training_bytes(widths: Sequence[int]) -> int:
    """Bytes of an MLP of ``widths`` in training: parameters, meta-gradient and Adam's two moments, four
    float32 copies."""
    return 4 * 4 * sum(a * b + b for a, b in itertools.pairwise(widths))


def refuse_what_cannot_fit(estimates: Iterable[MemoryEstimate]) -> None:
    """:class:`ConfigError` for the first setting whose estimate exceeds :func:`memory_budget`."""
    budget = memory_budget()
    for key, value, need_bytes, what in estimates:
        if need_bytes > budget:
            raise ConfigError(f"{key} = {value!r} is invalid: it implies about {need_bytes / 2**30:.1f} GiB "
                              f"of {what}, more than this machine's {budget / 2**30:.1f} GiB of memory; make it "
                              "smaller.")


def memory_estimates(cfg: Config) -> list[MemoryEstimate]:
    """Lower bounds on the bytes settings imply: one meta-batch's inputs (``train.meta_batch_size``),
    the tasks ``meta_test`` holds at once (``eval.shots`` / ``eval.queries``), and the model's parameters
    (``model.hidden``, for MLPs). Used to refuse what cannot fit before any allocation; the real use is a
    few times larger (activations, gradients)."""
    t, tr, e, m = cfg.task, cfg.train, cfg.eval, cfg.model
    images = t.family in IMAGE_FAMILIES
    per = _example_bytes(cfg)
    train_ways = (t.train_ways or t.ways) if images else 1
    test_ways = (e.ways or t.ways) if images else 1
    chunk = min(EVAL_CHUNK_TASKS, max(e.test_tasks, tr.val_tasks))
    out: list[MemoryEstimate] = [
        ("train.meta_batch_size", tr.meta_batch_size,
         tr.meta_batch_size * (t.shots + t.queries) * train_ways * per, "inputs for one meta-batch"),
        ("eval.shots", e.shots, chunk * ((e.shots or t.shots) + (e.queries or t.queries)) * test_ways * per,
         f"inputs for one chunk of {EVAL_CHUNK_TASKS} evaluation tasks"),
    ]
    if m.name == "mlp":
        out.append(("model.hidden", m.hidden, training_bytes([1, *m.hidden, 1]),
                    "parameters, meta-gradient and optimiser state"))
    return out


def _check(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (nested dataclasses from tables); raise ConfigError."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # a section built in Python: its fields are checked as a file's
            check_types(value, key)
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table of settings, got {value!r}.")
        return from_dict(tp, value, key)
    try:
        return typed(value, tp, key)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a config table: every key type-checked against the field's
    annotation (nested dataclasses from nested tables); unknown keys and wrong types, and the
    dataclass's own checks, raise :class:`ConfigError` naming the key."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f" Did you mean {(f'{prefix}.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}; valid keys here are: {', '.join(names)}.{hint}")
        if hints[key] is AlgorithmConfig or hints[key] == "AlgorithmConfig":
            values[key] = AlgorithmConfig.from_table(value, full)
        else:
            values[key] = _check(value, hints[key], full)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as err:  # a dataclass's own range checks (innerloop.execution.Execution, ...)
        raise ConfigError(f"{prefix}.{err}" if prefix else str(err)) from err



def check_types(section: Any, prefix: str) -> None:
    """Check every field of the dataclass ``section`` against its annotation (as a config file's
    values are); :class:`ConfigError` names the key."""
    hints = get_type_hints(type(section))
    for f in dataclasses.fields(section):
        _check(getattr(section, f.name), hints[f.name], f"{prefix}.{f.name}")


def apply_overrides(data: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a config as tables) with each dotted key of ``changes`` set (``"train.iterations"``);
    a path through something that is not a table raises :class:`ConfigError`. Checking the result is
    the caller's (build the config from it)."""
    for key, value in changes.items():
        *path, last = key.split(".")
        node = data
        for depth, part in enumerate(path):
            if not isinstance(node.get(part), dict):
                names = [k for k, v in node.items() if isinstance(v, dict)]
                close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
                fixed = [*path[:depth], close[0], *path[depth + 1 :], last] if close else []
                hint = f" Did you mean {'.'.join(fixed)!r}?" if close else ""
                raise ConfigError(f"unknown config key {key!r}: {part!r} is not a section (sections: "
                                  f"{', '.join(names)}).{hint}")
            node = node[part]
        node[last] = value
    return data


LEGACY_ALGORITHM_KEYS: tuple[str, ...] = ("vectorize",)
"""``[algorithm]`` keys of innerloop 0.1.0 that moved to ``[execution]``."""


def upgrade(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config table of innerloop 0.1.0 in today's layout: ``algorithm.vectorize`` moves to
    ``execution.vectorize``. Anything else is left for :func:`from_dict` to check."""
    out = dict(data)
    algorithm = out.get("algorithm")
    if isinstance(algorithm, Mapping) and any(k in algorithm for k in LEGACY_ALGORITHM_KEYS):
        algorithm = dict(algorithm)
        execution = dict(out.get("execution") or {})
        for k in LEGACY_ALGORITHM_KEYS:
            if k in algorithm:
                execution.setdefault(k, algorithm.pop(k))
        out["algorithm"], out["execution"] = algorithm, execution
    return out


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config`; unknown keys and wrong types raise ConfigError."""
    cfg: Config = from_dict(Config, upgrade(data))
    return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw contents of a ``.toml`` or ``.json`` config file; a missing, unreadable or
    malformed file raises :class:`ConfigError` naming it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give a .toml or .json file in it.")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} could not be read: {err}") from err
    if not text.strip():
        raise ConfigError(f"config file {str(path)!r} is empty; give the settings to change (or run "
                          "`innerloop train` without --config for the embedded default run).")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"config file {str(path)!r}: use a .toml or .json file.")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} could not be parsed: {err}") from err
    return data


def load_config(path: str | Path) -> Config:
    """Read a ``.toml`` or ``.json`` config file; everything it omits keeps its default."""
    return config_from_dict(read_config_file(path))


__all__ = [
    "AlgorithmConfig", "AugmentConfig", "Config", "ConfigError", "EvalConfig", "ModelConfig", "ObjectiveConfig",
    "SamplingConfig", "SplitOptions", "SplitSampling", "TaskConfig", "TrainConfig", "apply_overrides",
    "build_objective", "config_from_dict", "distinct_drawers", "from_dict", "load_callable", "load_config",
    "read_config_file", "tta_augment", "upgrade", "within_alphabet",
]
