"""A whole run from a :class:`Config`: build, meta-train, meta-test and report (the command line
draws the plots from the returned :class:`~innerloop.training.evaluate.RunResult`)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from innerloop.algorithms.base import Algorithm
from innerloop.algorithms.registry import ALGORITHMS, head_ways
from innerloop.data.download import DataError
from innerloop.data.factory import MissingDataError, task_family
from innerloop.data.images import ImagePreprocessing, deferred_cache_writes
from innerloop.data.omniglot import omniglot_preprocessing
from innerloop.data.sampling import IMAGE_FAMILIES
from innerloop.models.conv4 import Conv4
from innerloop.models.mlp import MLP
from innerloop.models.pretrained import load_pretrained
from innerloop.models.resnet import ResNet12
from innerloop.models.wrn import WRN28_10
from innerloop.tasks import Split, TaskFamily
from innerloop.training.checkpoint import CheckpointError, check_state_compatible, load_checkpoint
from innerloop.training.config import (
    MODEL_ADDED_KEYS,
    Config,
    ConfigError,
    apply_overrides,
    build_objective,
    config_from_dict,
    distinct_drawers,
    tta_augment,
    within_alphabet,
)
from innerloop.training.device import check_run_precision, run_device
from innerloop.training.distributed import barrier
from innerloop.training.distributed import rank as dist_rank
from innerloop.training.evaluate import (
    EvalResult,
    RunResult,
    batch_norm_policy,
    format_table,
    machine,
    meta_test,
    run_note,
    tta_note,
    write_results,
)
from innerloop.training.loggers import check_loggers
from innerloop.training.loop import BEST, MissingSplitError, TrainResult, clear_run, meta_train, plain_json


def build_family(cfg: Config, shots: int | None = None, queries: int | None = None,
                 ways: int | None = None, splits: Sequence[Split] | None = None, *,
                 tta: bool = False) -> TaskFamily:
    """The configured task family; ``shots``/``queries``/``ways`` override the training ones;
    ``splits``: only these splits (default all), so sizes are checked against them alone (a test
    family's 20 images per class need not serve the train split). Its meta-training tasks are
    augmented by ``[task.augment]``; ``tta``: a test family, with ``eval.tta`` copies per task and
    no training augmentation (``innerloop eval --split train`` scores the tasks as they are)."""
    t = cfg.task
    evaluation = shots is not None or queries is not None or ways is not None
    keys = "eval.shots, eval.queries and eval.ways" if evaluation else "task.shots, task.queries and task.ways"
    try:
        return task_family(t.family, shots=shots or t.shots, queries=queries or t.queries, seed=t.seed,
                           ways=ways or t.ways, split=t.split, within_alphabet=within_alphabet(t),
                           image_size=t.image_size, data_root=t.data_root, options=t.options,
                           split_options=t.split_options.omniglot_kwargs() if t.family == "omniglot" else None,
                           splits=splits, distinct_drawers=distinct_drawers(t),
                           augment=None if tta else t.augment.build(),
                           tta=cfg.eval.tta if tta else 1, tta_augment=tta_augment(cfg))
    except MissingDataError as err:
        raise ConfigError(str(err)) from err
    except TypeError as err:  # a key of task.options the family does not take
        if "unexpected keyword argument" not in str(err):
            raise
        raise ConfigError(f"task.options = {t.options!r} is invalid for task.family = {t.family!r}: {err}; "
                          "see the family's keyword arguments in innerloop.data.") from err
    except ValueError as err:  # sizes the data cannot serve: say which settings asked for them
        what = (f"{ways or t.ways}-way tasks of {shots or t.shots} + {queries or t.queries} examples per class"
                if t.family in IMAGE_FAMILIES else f"{shots or t.shots} + {queries or t.queries} examples")
        raise ConfigError(f"{keys} ask for {what}, which the data cannot serve: {err}") from err


def input_preprocessing(family: str, shape: Sequence[int]) -> ImagePreprocessing:
    """How the loader of image family ``family`` turns a source image into the stored ``shape`` ``(C, H, W)``
    (Omniglot: :func:`~innerloop.data.omniglot.omniglot_preprocessing`; tieredImageNet: bicubic, as its
    release; the others: Lanczos, grey for one channel, RGB for three)."""
    size = (int(shape[-2]), int(shape[-1]))
    if family == "omniglot":
        return omniglot_preprocessing(size)
    return ImagePreprocessing(size, "L" if int(shape[-3]) == 1 else "RGB",
                              "bicubic" if family == "tiered-imagenet" else "lanczos")


INPUTS_KEY = "inputs"
"""Where a checkpoint stores :func:`model_inputs` (beside, not in, its identity)."""


def model_inputs(cfg: Config, family: TaskFamily, name: str | None = None) -> dict[str, Any]:
    """What :func:`build_model` reads from the data, as plain data: ``shape`` (one example's, ``[C, H, W]``
    or an MLP's ``[features]``), ``outputs`` (the head's size for algorithm ``name``: 0 for an embedding
    network, the number of training classes, or the ways; an MLP's target features) and ``preprocessing``
    (an image family's :class:`~innerloop.data.images.ImagePreprocessing` as a dict, else None). Every
    checkpoint of :func:`run` stores it under :data:`INPUTS_KEY`, so the model rebuilds without the data
    (:func:`load_for_inference`)."""
    probe = family.task("train", 0)
    if cfg.model.name == "mlp":
        return {"shape": [int(probe.support_x.shape[-1])], "outputs": int(probe.support_y.shape[-1]),
                "preprocessing": None}
    shape = [int(s) for s in probe.support_x.shape[-3:]]
    preprocessing = (input_preprocessing(cfg.task.family, shape).to_dict() if cfg.task.family in IMAGE_FAMILIES
                     else None)
    return {"shape": shape, "outputs": head_ways(name or cfg.algorithm.name, cfg.task.ways, family),
            "preprocessing": preprocessing}


def model_for(cfg: Config, inputs: Mapping[str, Any], *, pretrained: bool = True) -> nn.Module:
    """The network of ``cfg.model`` for ``inputs`` (:func:`model_inputs`), initialised from ``train.seed``;
    ``pretrained=False``: without reading ``model.pretrained`` (a checkpoint's weights replace them)."""
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    shape, ways = [int(v) for v in inputs["shape"]], int(inputs["outputs"])
    if m.name == "mlp":
        return MLP(shape[-1], ways, m.hidden, m.activation)
    channels, size = shape[-3], shape[-1]
    # algorithm.batch_norm = running / per_step needs BatchNorm layers that keep running statistics
    tracking = m.norm == "batch" and getattr(cfg.algorithm.options, "batch_norm", "batch") != "batch"
    model: nn.Module
    if m.name == "resnet12":
        model = ResNet12(channels, ways, m.widths, size, m.drop_rate, m.dropblock_size, m.avg_pool, m.norm,
                         track_running_stats=tracking)
    elif m.name == "wrn28_10":
        model = WRN28_10(channels, ways, drop_rate=m.drop_rate, norm=m.norm, track_running_stats=tracking)
    else:
        model = Conv4(channels, ways, m.filters, size, m.pool, m.norm, track_running_stats=tracking)
    if m.pretrained is not None and pretrained:  # the body only: the head is sized for this run's ways
        try:
            load_pretrained(model, m.pretrained, key=m.pretrained_key, rename=m.pretrained_rename)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.pretrained = {m.pretrained!r}: {err}") from err
    return model


def build_model(cfg: Config, family: TaskFamily, name: str | None = None) -> nn.Module:
    """The network for ``family`` (its head sized for algorithm ``name``), initialised from ``train.seed``."""
    return model_for(cfg, model_inputs(cfg, family, name))


def build_algorithm(cfg: Config, family: TaskFamily, name: str | None = None) -> Algorithm:
    """The model wrapped in the configured algorithm, with the config's objective (``[objective]``) or
    the family's. ``name`` (the transfer baseline, ``pretrain``) builds another algorithm with the
    options it shares with the configured one (and the same objective). The model is built on the CPU;
    training and testing move it to ``execution.device``."""
    return algorithm_for(cfg, model_inputs(cfg, family, name), name)


def algorithm_for(cfg: Config, inputs: Mapping[str, Any], name: str | None = None, *,
                  pretrained: bool = True) -> Algorithm:
    """:func:`build_algorithm` from ``inputs`` (:func:`model_inputs`) instead of the data's family;
    ``pretrained``: as for :func:`model_for`."""
    name = name or cfg.algorithm.name
    entry = ALGORITHMS[name]
    if name == cfg.algorithm.name:
        options = cfg.algorithm.options
    else:
        shared = {k: getattr(cfg.algorithm.options, k) for k in entry.option_names()
                  if hasattr(cfg.algorithm.options, k)}
        options = entry.options(shared)
    objective = build_objective(cfg.objective, cfg.objective_kind) or cfg.objective_kind
    return entry.build(model_for(cfg, inputs, pretrained=pretrained), objective, options, cfg.execution)


DATASET_NAMES: dict[str, str] = {"omniglot": "Omniglot", "miniimagenet": "miniImageNet", "cifar-fs": "CIFAR-FS",
                                 "fc100": "FC100", "cub": "CUB-200-2011", "tiered-imagenet": "tieredImageNet"}
"""How titles and tables name a family's dataset (others by their ``task.family``)."""
SPLIT_NAMES: dict[str, str] = {"miniimagenet": "Ravi & Larochelle split"}
"""The class split of a family with one fixed split (Omniglot's is ``task.split``)."""


def dataset_title(cfg: Config, split: str | None = None) -> str:
    """The dataset and class split a results title names: ``Omniglot (vinyals split)``, ``Omniglot (lake
    split, 5 validation alphabets, within one alphabet)``, ``miniImageNet (Ravi & Larochelle split)``,
    ``image folder 'birds'`` (the folder's name, its own train/val/test), ``sinusoid``. ``split``: the
    split tested (named when it is not ``test``), whose sampling is named when within one alphabet."""
    t = cfg.task
    parts: list[str] = []
    if t.family == "omniglot":
        parts.append(f"{t.split} split")
        if t.split == "lake" and t.split_options.lake_val_alphabets != 5:
            parts.append(f"{t.split_options.lake_val_alphabets} validation alphabets")
        if t.split_options.split_seed and t.split in ("lake", "maml"):
            parts.append(f"split seed {t.split_options.split_seed}")
    elif t.family in SPLIT_NAMES:
        parts.append(SPLIT_NAMES[t.family])
    if t.family in IMAGE_FAMILIES and within_alphabet(t)[split or "test"]:
        parts.append("within one alphabet" if t.family == "omniglot" else "within one group")
    if t.family in IMAGE_FAMILIES and distinct_drawers(t)[split or "test"]:
        parts.append("support and query by different drawers")
    if split not in (None, "test"):
        parts.append(f"{split} tasks")
    if t.family == "image-folder":
        name = f"image folder {Path(t.data_root).name!r}" if t.data_root else "image folder"
    else:
        name = DATASET_NAMES.get(t.family, t.family)
    return f"{name} ({', '.join(parts)})" if parts else name


def tta_of(cfg: Config) -> str | None:
    """What a results table says of test-time augmentation (``eval.tta``): for image tasks always (``none``
    when off), for the others nothing (``None``)."""
    if cfg.task.family not in IMAGE_FAMILIES:
        return None
    return tta_note(cfg.eval.tta, tta_augment(cfg))


def refine_steps_of(cfg: Config) -> int:
    """ProtoNets' ``algorithm.transductive_steps`` (0 for every other algorithm): what a table says of it."""
    return int(getattr(cfg.algorithm.options, "transductive_steps", 0))


def batch_norm_of(cfg: Config) -> str:
    """The BatchNorm policy a results table names: ``none`` for an MLP or ``model.norm = "none"``, else
    ``algorithm.batch_norm``'s (``batch``: the statistics of each batch, transductive)."""
    norm = cfg.model.norm if cfg.model.name != "mlp" else None
    return batch_norm_policy(norm, str(getattr(cfg.algorithm.options, "batch_norm", "batch")))


# -- checkpoint identity, in the format of innerloop 0.1.0 (so its checkpoints still resume) --------------
LEGACY_ALGORITHM_DEFAULTS: dict[str, Any] = {
    "name": "maml", "inner_lr": 0.01, "inner_steps": 1, "first_order": False, "lr_mode": "fixed", "adapt": "all",
    "vectorize": "auto", "inner_optimizer": "sgd", "inner_betas": [0.0, 0.999], "reg_lambda": 2.0, "cg_steps": 5,
    "cosine_scale": 10.0, "msl_iterations": 0, "first_order_iterations": 0, "per_step_bn": True,
    "inner_weight_decay": 0.0, "weight_decay_mode": "fixed", "batch_norm": "batch",
}
"""innerloop 0.1.0's one flat ``[algorithm]`` table and its defaults: checkpoint identities are written
in that layout (one key per option, under its 0.1.0 name), so a 0.1.0 run resumes. Options added since
(``batch_norm``) enter an identity only when they differ from the default listed here."""
_NEW = object()  # an option 0.1.0 did not have: always part of the identity
_FIRST_ALGORITHM_KEYS = ("name", "inner_lr", "inner_steps", "first_order", "lr_mode", "adapt", "vectorize")
_ADDED_TRAIN_KEYS = ("lr_schedule", "final_outer_lr", "grad_clip")
_ADDED_TASK_KEYS = ("sampling", "split_options", "augment")
_ADDED_SAMPLING_KEYS = ("distinct_drawers",)
EVALUATION_OPTIONS = ("transductive_steps",)
"""Algorithm options that change evaluation (validation, test) but never a meta-gradient: like ``eval.*`` and
``train.val_tasks`` they are no part of a run's identity, so a trained run is resumed or re-tested with them
changed (ProtoNets' ``transductive_steps``)."""
_LEGACY_NAMES = {"weight_decay": "inner_weight_decay", "wd_mode": "weight_decay_mode", "betas": "inner_betas"}


def legacy_algorithm_table(cfg: Config) -> dict[str, Any]:
    """The algorithm's options (and ``execution.vectorize``) as 0.1.0's flat table."""
    table = dict(LEGACY_ALGORITHM_DEFAULTS)
    table["name"], table["vectorize"] = cfg.algorithm.name, cfg.execution.vectorize
    fixed = ALGORITHMS[cfg.algorithm.name].fixed
    for k, v in dataclasses.asdict(cfg.algorithm.options).items():
        if k not in fixed:
            table[_LEGACY_NAMES.get(k, k)] = list(v) if isinstance(v, tuple) else v
    return table


def identity(cfg: Config, algorithm: str) -> dict[str, Any]:
    """The settings a checkpoint must share with a run to be resumed by it."""
    d, default = cfg.to_dict(), Config().to_dict()
    tr = d["train"]
    # Options added after checkpoints were first written join the identity only when they differ
    # from their defaults, so the checkpoints of runs that do not use them still resume.
    algo = {k: v for k, v in legacy_algorithm_table(cfg).items()
            if (k in _FIRST_ALGORITHM_KEYS or v != LEGACY_ALGORITHM_DEFAULTS.get(k, _NEW))
            and k not in EVALUATION_OPTIONS}
    train = {k: tr[k] for k in ("meta_batch_size", "outer_lr", "optimizer", "seed")}
    train.update({k: tr[k] for k in _ADDED_TRAIN_KEYS if tr[k] != default["train"][k]})
    task = {k: v for k, v in d["task"].items() if k not in _ADDED_TASK_KEYS or v != default["task"][k]}
    if "sampling" in task:  # per-split keys added after the section: only when set (older identities stay)
        task["sampling"] = {split: {k: v for k, v in part.items() if k not in _ADDED_SAMPLING_KEYS or v}
                            for split, part in task["sampling"].items()}
    model = {k: v for k, v in d["model"].items() if k not in MODEL_ADDED_KEYS or v != default["model"][k]}
    out = {"algorithm": algorithm, "task": task, "model": model, "algorithm_cfg": algo, "train": train}
    if d["objective"] != default["objective"]:  # a loss of one's own (absent otherwise, as in 0.1.0)
        out["objective"] = d["objective"]
    return out


def config_tables_from_identity(ident: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``([algorithm] table, [execution] table)`` of a checkpoint identity's flat ``algorithm_cfg``:
    the keys of options the algorithm does not have must hold their defaults (a 0.1.0 table lists
    them all), else :class:`CheckpointError` names them."""
    flat = dict(ident["algorithm_cfg"])
    name = str(flat.get("name", "maml"))
    if name not in ALGORITHMS:
        raise CheckpointError(f"the checkpoint's algorithm {name!r} is not one of {list(ALGORITHMS)}.")
    entry = ALGORITHMS[name]
    own = {_LEGACY_NAMES.get(k, k) for k in entry.option_names()}
    aliases = {v: k for k, v in _LEGACY_NAMES.items()}
    table: dict[str, Any] = {"name": name}
    execution: dict[str, Any] = {}
    for k, v in flat.items():
        if k == "name":
            continue
        if k == "vectorize":
            execution["vectorize"] = v
        elif k in own:
            new_name = aliases.get(k, k)
            table[new_name if new_name in entry.option_names() else k] = v
        elif v != LEGACY_ALGORITHM_DEFAULTS.get(k, v):
            raise CheckpointError(f"the checkpoint sets algorithm.{k} = {v!r}, which {name} no longer has "
                                  f"(its options are {entry.option_names()}); it cannot be rebuilt as trained.")
    return table, execution


def _train_one(cfg: Config, families: tuple[TaskFamily, TaskFamily], name: str, run_dir: Path,
               iterations: int, progress: bool, resume: bool) -> tuple[Algorithm, TrainResult]:
    family, val_family = families
    inputs = model_inputs(cfg, family, name)
    algorithm = algorithm_for(cfg, inputs, name)
    train_cfg = dataclasses.replace(cfg.train, iterations=iterations)
    try:
        result = meta_train(algorithm, family, train_cfg, run_dir, identity=identity(cfg, name),
                            val_steps=algorithm.validation_steps, resume=resume, progress=progress,
                            desc=name, val_family=val_family, grad_clip=getattr(cfg.train, "grad_clip", None),
                            loggers=cfg.train.loggers, run_config=plain_json(cfg.to_dict()),
                            checkpoint_extras={INPUTS_KEY: inputs})
    except MissingSplitError as err:  # checked before the first step: a data/config mistake, one clear line
        raise ConfigError(str(err)) from err
    best = load_checkpoint(run_dir / BEST)
    algorithm.load_state_dict(best["state"])
    return algorithm, result


def run(cfg: Config, *, progress: bool = True, overwrite: bool = False) -> RunResult[Algorithm, TaskFamily]:
    """Meta-train the configured algorithm (and the baseline), meta-test both, and write
    ``results.json`` and ``results.md`` into ``cfg.out_dir``.

    Returns:
        the report (as a mapping: ``result["table"]``, ``result["runs"]``), with the trained
        algorithms and the test family for the plots (:func:`innerloop.plotting.plot_run`).
    """
    out = Path(cfg.out_dir)
    lead = dist_rank() == 0  # under torchrun, one rank writes the files
    device = check_device(cfg)  # a device this machine lacks, or fp16 on a CPU: before anything is touched
    check_loggers(cfg.train.loggers)  # a logger's missing package too: before --overwrite deletes anything
    if overwrite and lead:
        for sub in (out, out / "baseline"):
            clear_run(sub)
    barrier("barrier after --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    try:  # bad data or sizes (more ways than classes, ...) fail here, before any training
        with deferred_cache_writes():  # and then leave no preprocessed cache behind
            # each family holds only the split it serves, so its sizes are checked against that split
            # alone (60-way training tasks need not fit the test split's alphabets)
            family = build_family(cfg, ways=cfg.task.train_ways, splits=("train",))
            val_family = build_family(cfg, ways=cfg.eval.ways, splits=("val",))
            test_family = build_family(cfg, cfg.eval.shots, cfg.eval.queries, cfg.eval.ways, splits=("test",),
                                       tta=True)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    names = [cfg.algorithm.name]
    if cfg.eval.baseline and cfg.algorithm.name != "pretrain":
        names.append("pretrain")
    trained: dict[str, Algorithm] = {}
    results: dict[str, EvalResult] = {}
    batch_norm = batch_norm_of(cfg)
    report: dict[str, Any] = {
        "config": cfg.to_dict(), "machine": machine(device), "runs": {},
        "execution": {"device": str(device), "precision": cfg.execution.precision, "batch_norm": batch_norm,
                      "model_norm": cfg.model.norm if cfg.model.name != "mlp" else None},
    }
    for name in names:
        is_baseline = name != cfg.algorithm.name
        iters = (cfg.eval.baseline_iterations or cfg.train.iterations) if is_baseline else cfg.train.iterations
        algorithm, tr = _train_one(cfg, (family, val_family), name,
                                   out / "baseline" if is_baseline else out, iters, progress, resume=True)
        t0 = time.perf_counter()
        res = meta_test(algorithm, test_family, "test", cfg.eval.test_tasks, cfg.eval.steps, progress=progress,
                        desc=f"meta-test {name}")
        trained[name], results[name] = algorithm, res
        report["runs"][name] = {
            "iterations": iters, "best_step": tr.best_step, "best_val": tr.best_val,
            "train_wall_s": tr.wall_time_s, "eval_wall_s": time.perf_counter() - t0, "test": res.to_dict(),
        }
    e = cfg.eval
    title = f"{dataset_title(cfg)}: {e.shots or cfg.task.shots}-shot {results[names[0]].metric}"
    if family.objective == "classification":
        title = (f"{dataset_title(cfg)}: {e.ways or cfg.task.ways}-way "
                 f"{e.shots or cfg.task.shots}-shot {results[names[0]].metric}, BatchNorm: {batch_norm}")
    title += f", {e.test_tasks} fixed test tasks (mean ± 95% CI)"
    report["table"] = format_table(results, e.report_steps, title,
                                   run_note(device, cfg.execution.precision, batch_norm, tta_of(cfg),
                                            refine_steps_of(cfg)))
    result = RunResult(report, results, trained, test_family, title, out)
    if lead:
        write_results(result)
    return result


def check_device(cfg: Config) -> torch.device:
    """The run's device (:func:`~innerloop.training.device.run_device`), with its precision checked;
    :class:`ConfigError` naming ``execution.device`` or ``execution.precision`` otherwise."""
    try:
        device = run_device(cfg.execution.device)
        check_run_precision(cfg.execution.precision, device)
    except ValueError as err:
        raise ConfigError(f"execution.{err}") from err
    return device


STORED_CONFIG_SOURCE = "the checkpoint's own config"
"""How ``innerloop eval`` names the config a checkpoint stores (``payload["config"]``) as its settings' source."""
_MACHINE_KEYS = ("device", "precision")  # the evaluating machine's choice (--device, --precision), not the run's


def stored_config(payload: Mapping[str, Any], source: str = "the checkpoint") -> dict[str, Any] | None:
    """The run's whole config a checkpoint stores beside its identity (``payload["config"]``: the
    tables of ``Config.to_dict()``, written since innerloop 0.2), or None for an older checkpoint
    without one; :class:`CheckpointError` for an entry that is not a table of settings."""
    if "config" not in payload or payload["config"] is None:
        return None
    data = payload["config"]
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        shown = repr(data) if len(repr(data)) <= 80 else repr(data)[:77] + "..."
        raise CheckpointError(
            f"{source} stores a config that is not a table of settings ({type(data).__name__}: {shown}); the "
            "file is damaged or was not written by `innerloop train`. Evaluate the run's other checkpoint "
            "(best.pt or last.pt) or train again.")
    for section in ("task", "model", "algorithm", "train", "eval", "execution", "objective"):
        if section in data and not isinstance(data[section], dict):
            raise CheckpointError(
                f"{source} stores a config whose [{section}] is not a table of settings ({data[section]!r}); the "
                "file is damaged or was not written by `innerloop train`. Evaluate the run's other checkpoint "
                "(best.pt or last.pt) or train again.")
    return data


def checkpoint_config(payload: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                      source: str = "the checkpoint") -> Config:
    """The config a checkpoint's payload was trained with (written by innerloop 0.1.0 too), with the
    dotted keys of ``overrides`` changed and ``eval.baseline = false`` (evaluating trains nothing).

    What the weights need (task, model, algorithm, objective, the identity's training keys) comes from
    the checkpoint's identity, which resuming checks; everything else (``[eval]``, ``[execution]`` but
    its ``device`` and ``precision``, which stay this machine's defaults) from the config the checkpoint
    stores (:func:`stored_config`), or the defaults for a checkpoint without one (see
    :func:`run_eval_settings`). A stored config that does not build is a :class:`CheckpointError`."""
    ident = payload.get("identity")
    if not ident or "task" not in ident:
        raise CheckpointError(f"{source} carries no config; it was not written by `innerloop train`.")
    own = stored_config(payload, source)
    default = Config().to_dict()
    d = {**default, **{k: v for k, v in (own or {}).items() if k in default}}
    algorithm_table, execution_table = config_tables_from_identity(ident)
    execution = {**d["execution"], **{k: default["execution"][k] for k in _MACHINE_KEYS}, **execution_table}
    # keys added since a checkpoint was written (absent from its identity) keep their defaults
    d.update(task={**default["task"], **ident["task"]}, model=ident["model"], algorithm=algorithm_table,
             execution=execution, objective=ident.get("objective", default["objective"]),
             train={**d["train"], **ident["train"]}, eval={**d["eval"], "baseline": False})
    if own is not None:
        try:
            config_from_dict(d)
        except ConfigError as err:
            raise CheckpointError(f"the config stored in {source} is invalid: {err} The file is damaged or was "
                                  "written by another version of innerloop; evaluate the run's other checkpoint "
                                  "(best.pt or last.pt) or train again.") from None
    return config_from_dict(apply_overrides(d, overrides or {}))


def _eval_settings(cfg: Config) -> dict[str, Any]:
    e = cfg.eval
    return {"ways": e.ways or cfg.task.ways, "shots": e.shots or cfg.task.shots,
            "queries": e.queries or cfg.task.queries, "test_tasks": e.test_tasks, "steps": e.steps}


def run_eval_settings(checkpoint: str | Path, payload: Mapping[str, Any],
                      cfg: Config) -> tuple[dict[str, Any], str]:
    """``(eval settings, where they come from)``: the ``[eval]`` section (``ways``, ``shots``, ``queries``,
    ``test_tasks``, ``steps``) of the run that wrote ``checkpoint``, in this order: the config the
    checkpoint stores (``cfg``'s, see :func:`checkpoint_config`; source :data:`STORED_CONFIG_SOURCE`);
    for an older checkpoint without one, the ``results.json`` beside it (or one folder up, for
    ``baseline/``) when that report's config has the checkpoint's identity; otherwise derived from
    the checkpoint's training tasks: a classification run's ways, shots and queries, a regression
    run's default test protocol (5 + 100 points). ``ways`` is None for regression."""
    def settings(c: Config) -> dict[str, Any]:
        return {**_eval_settings(c), **({} if c.objective_kind == "classification" else {"ways": None})}

    if stored_config(payload, str(checkpoint)) is not None:
        return settings(cfg), STORED_CONFIG_SOURCE
    ident = payload.get("identity")
    here = Path(checkpoint).parent
    for report_path in (here / "results.json", here.parent / "results.json"):
        try:
            report = json.loads(report_path.read_text())
            saved = config_from_dict(report["config"])
        except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable, or of another version
            continue
        if ident is not None and any(identity(saved, n) == ident for n in (saved.algorithm.name, "pretrain")):
            return settings(saved), str(report_path)
    e, t = cfg.eval, cfg.task
    if cfg.objective_kind == "classification":
        return ({"ways": t.ways, "shots": t.shots, "queries": t.queries, "test_tasks": e.test_tasks,
                 "steps": e.steps}, "the checkpoint's training tasks")
    return ({"ways": None, "shots": e.shots or t.shots, "queries": e.queries or t.queries,
             "test_tasks": e.test_tasks, "steps": e.steps}, "the default test protocol")


def load_for_eval(checkpoint: str | Path, overrides: Mapping[str, Any] | None = None,
                  payload: Mapping[str, Any] | None = None) -> tuple[Config, Algorithm]:
    """Rebuild the algorithm a checkpoint was trained with (by innerloop 0.1.0 too) and load its weights
    (written on any device: they load on the CPU and follow the model). ``overrides``: dotted config keys
    to change, e.g. ``{"execution.device": "cuda", "execution.precision": "bf16"}``; ``payload``: the
    checkpoint already read (:func:`~innerloop.training.checkpoint.load_checkpoint`). The model is built
    on the CPU and :func:`~innerloop.training.evaluate.meta_test` moves it to ``execution.device``."""
    if payload is None:
        payload = load_checkpoint(checkpoint)
    cfg = checkpoint_config(payload, overrides, str(checkpoint))
    check_device(cfg)  # before building: the algorithm refuses a device this machine lacks
    name = payload["identity"]["algorithm"]
    inputs = stored_inputs(payload, str(checkpoint))  # None: an older checkpoint, rebuilt from the data
    algorithm = (build_algorithm(cfg, build_family(cfg, ways=cfg.task.train_ways, splits=("train",)), name)
                 if inputs is None
                 else algorithm_for(cfg, inputs, name, pretrained=False))
    check_state_compatible(algorithm, payload["state"], str(checkpoint))
    algorithm.load_state_dict(payload["state"])
    return cfg, algorithm


def stored_inputs(payload: Mapping[str, Any], source: str = "the checkpoint") -> dict[str, Any] | None:
    """The :func:`model_inputs` a checkpoint stores (under :data:`INPUTS_KEY`, since innerloop 0.2), or None
    for an older checkpoint; :class:`CheckpointError` for an entry that is not what :func:`model_inputs` writes."""
    data = payload.get(INPUTS_KEY)
    if data is None:
        return None
    ok = (isinstance(data, dict) and isinstance(data.get("shape"), list | tuple) and len(data["shape"]) in (1, 3)
          and all(isinstance(v, int) and v >= 1 for v in data["shape"])
          and isinstance(data.get("outputs"), int) and data["outputs"] >= 0
          and (data.get("preprocessing") is None or isinstance(data.get("preprocessing"), dict)))
    if ok and data.get("preprocessing") is not None:
        try:
            ImagePreprocessing.from_dict(data["preprocessing"])
        except (KeyError, TypeError, ValueError):
            ok = False
    if not ok:
        shown = repr(data) if len(repr(data)) <= 120 else repr(data)[:117] + "..."
        raise CheckpointError(f"{source} stores model inputs that are not what `innerloop train` writes "
                              f"({shown}); the file is damaged. Use the run's other checkpoint (best.pt or "
                              "last.pt) or train again.")
    return dict(data)


def load_for_inference(checkpoint: str | Path, overrides: Mapping[str, Any] | None = None,
                       payload: Mapping[str, Any] | None = None) -> tuple[Config, Algorithm, dict[str, Any]]:
    """``(config, algorithm, inputs)``: the algorithm a checkpoint was trained with, its weights loaded, rebuilt
    from the checkpoint alone (its config and :func:`model_inputs`, :func:`stored_inputs`): the training data
    need not be present. ``overrides`` and ``payload`` as for :func:`load_for_eval`.

    A checkpoint written before checkpoints stored their inputs is rebuilt from its training data when that
    is still where the run had it; else :class:`CheckpointError` names what is missing."""
    if payload is None:
        payload = load_checkpoint(checkpoint)
    cfg = checkpoint_config(payload, overrides, str(checkpoint))
    check_device(cfg)
    name = payload["identity"]["algorithm"]
    inputs = stored_inputs(payload, str(checkpoint))
    if inputs is None:
        try:
            inputs = model_inputs(cfg, build_family(cfg, ways=cfg.task.train_ways, splits=("train",)), name)
        except (ConfigError, DataError, OSError, ValueError) as err:
            raise CheckpointError(
                f"{checkpoint} does not store its model's inputs (the input shape, the head's size and the image "
                "preprocessing, which checkpoints store since innerloop 0.2), and its training data, which would "
                f"give them, is not where the run had it ({err}). Put the data back (task.data_root or "
                "$INNERLOOP_DATA) or train again with this version.") from None
    algorithm = algorithm_for(cfg, inputs, name, pretrained=False)
    check_state_compatible(algorithm, payload["state"], str(checkpoint))
    algorithm.load_state_dict(payload["state"])
    return cfg, algorithm, inputs
