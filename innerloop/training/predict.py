"""Using a trained model on new data: adapt it to a few labelled images and label others.

:class:`Predictor` rebuilds the algorithm a checkpoint was trained with from the checkpoint alone
(:func:`~innerloop.training.run.load_for_inference`: the config and the model's inputs it stores, so
the training data need not be present), preprocesses images exactly as the run's loader did (the
:class:`~innerloop.data.images.ImagePreprocessing` the checkpoint stores: Omniglot's 8-bit grey,
Lanczos resize and ink = 1; an RGB family's resize), and runs the algorithm's own test-time
adaptation on one task made of the support images (any labels) and the query images.

The scores are those :meth:`~innerloop.algorithms.base.Algorithm.evaluate` computes for the same task:
the predictor runs ``evaluate`` itself and reads the query outputs after the last adaptation step, so
every algorithm (MAML and its variants, ProtoNets, MetaOptNet, the Baselines, ...) predicts with its
own inner loop, BatchNorm policy and head.

Images can be files, folders, encoded bytes, Pillow images or numpy arrays (``[H, W]``, ``[H, W, C]``,
any size, uint8 or float in [0, 1]); each is converted to the run's channels (grey or RGB) and size.
For a model trained on ink drawings (Omniglot: dark ink on white paper), ``ink="auto"`` detects light
ink on a dark background (the median of the image's border pixels is light after the training
inversion) and then does not invert it; ``ink="dark"`` / ``"light"`` say which it is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from innerloop.algorithms.base import Algorithm, ObjectiveFns
from innerloop.algorithms.registry import ALGORITHMS
from innerloop.data.download import DataError
from innerloop.data.images import IMAGE_SUFFIXES, ImagePreprocessing, ImageSource
from innerloop.tasks import Task, TaskBatch
from innerloop.training.checkpoint import CheckpointError
from innerloop.training.config import Config
from innerloop.training.device import place, to_device
from innerloop.training.run import load_for_inference

__all__ = ["INK", "Images", "Prediction", "Predictor", "folder_images", "support_folder"]

Ink = Literal["auto", "dark", "light"]
INK: tuple[str, ...] = ("auto", "dark", "light")
"""How ink drawings are drawn: ``dark`` ink on a light page (Omniglot's), ``light`` ink on a dark one,
or ``auto`` (detected per image from its border)."""
Images = ImageSource | Sequence[ImageSource]
"""One image or a sequence of them (a path that is a folder: its image files, see :func:`folder_images`)."""


@dataclass(frozen=True)
class Prediction:
    """The predictions for the query images of one task.

    Attributes:
        labels: ``[n_query]`` the predicted label of each query image (one of ``classes``).
        scores: ``[n_query, ways]`` float32 probabilities (each row sums to 1): the softmax of ``logits``.
        logits: ``[n_query, ways]`` float32, the algorithm's query outputs after adaptation (for Matching
            Networks, log-probabilities).
        classes: ``[ways]`` the label of each column, in the order the support first names them (a
            support folder: its class folders, sorted).
        names: ``[n_query]`` how each query image was given (its path, or ``query[i]``).
    """

    labels: list[Hashable]
    scores: Tensor
    logits: Tensor
    classes: list[Hashable]
    names: list[str]

    @property
    def confidence(self) -> Tensor:
        """``[n_query]`` the probability of each predicted label."""
        return self.scores.max(dim=-1).values

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per query image: ``name``, ``label``, ``score`` (its probability) and ``scores``
        (``{class: probability}``, every class)."""
        out = []
        for i, name in enumerate(self.names):
            probs = [float(v) for v in self.scores[i]]
            out.append({"name": name, "label": self.labels[i], "score": max(probs),
                        "scores": dict(zip(self.classes, probs, strict=True))})
        return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files (``.png``, ``.jpg``, ``.jpeg``; hidden files skipped) directly in ``folder``, sorted
    by name. :class:`~innerloop.data.download.DataError` for a missing folder or one without images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{str(folder)!r} is not a folder; give a folder of image files "
                        f"({', '.join(IMAGE_SUFFIXES)}).")
    files = _image_files(folder)
    if not files:
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        more = " ..." if len(others) > 4 else ""
        seen = f" (it holds {', '.join(others[:4])}{more})" if others else " (it is empty)"
        raise DataError(f"no images in {str(folder)!r}{seen}: put image files ending in "
                        f"{', '.join(IMAGE_SUFFIXES)} there.")
    return files


def support_folder(folder: str | os.PathLike[str]) -> tuple[list[Path], list[str]]:
    """``(files, labels)`` of a support folder: one sub-folder per class, named by its label, holding that
    class's images (classes sorted by name). :class:`~innerloop.data.download.DataError` for a missing
    folder, no class folder, a class folder without images, or images lying directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"support {str(folder)!r} is not a folder; give a folder with one sub-folder of images "
                        "per class, named by the class's label.")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = _image_files(folder)
    if loose:
        raise DataError(f"support folder {str(folder)!r} holds images directly ({loose[0].name}, ...); put each "
                        "class's images in a sub-folder named by its label.")
    if not classes:
        raise DataError(f"support folder {str(folder)!r} has no class folders; give one sub-folder of images per "
                        "class, named by the class's label.")
    files: list[Path] = []
    labels: list[str] = []
    for c in classes:
        mine = _image_files(c)
        if not mine:
            raise DataError(f"class folder {str(c)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); add the "
                            "class's support images or remove the folder.")
        files += mine
        labels += [c.name] * len(mine)
    return files, labels


def _as_list(images: Images, what: str) -> tuple[list[ImageSource], list[str]]:
    """``(sources, names)`` of ``images``: one image, a folder (its files) or a sequence."""
    if isinstance(images, str | os.PathLike) and Path(images).is_dir():
        files = folder_images(images)
        return list(files), [str(f) for f in files]
    if isinstance(images, bytes | str | os.PathLike | Image.Image | np.ndarray):
        items: list[ImageSource] = [images]
    elif isinstance(images, torch.Tensor):
        raise DataError(f"{what} is a torch tensor; give numpy arrays ([H, W] or [H, W, C], e.g. t.numpy()), "
                        "PIL images or files.")
    elif isinstance(images, Sequence):
        items = list(cast(Sequence[ImageSource], images))  # bytes, a Sequence too, was taken above
    else:
        raise DataError(f"{what} is a {type(images).__name__}; give image files, a folder, PIL images or numpy "
                        "arrays.")
    if not items:
        raise DataError(f"{what} holds no images; give at least one.")
    names = [str(x) if isinstance(x, str | os.PathLike) else f"{what}[{i}]" for i, x in enumerate(items)]
    return items, names


class _Capture:
    """An objective that scores like ``fns`` and keeps the last query prediction its metric sees."""

    def __init__(self, fns: ObjectiveFns) -> None:
        self.last: Tensor | None = None
        self.calls = 0

        def metric(pred: Tensor, target: Tensor) -> Tensor:
            self.last, self.calls = pred.detach().clone(), self.calls + 1
            return fns.metric(pred, target)

        self.fns = dataclasses.replace(fns, metric=metric, targets="any")


class Predictor:
    """A trained algorithm that labels new images after adapting to a few labelled ones.

    Args:
        algorithm: the trained algorithm (classification); its model is moved to ``device``.
        preprocessing: how an image becomes the model's input (what its training loader did).
        cfg: the run's config (``eval.steps`` is the default number of adaptation steps).
        outputs: the size of the model's head (``model_inputs``' ``outputs``): the number of classes an
            algorithm with a head of the task's ways (MAML, ...) takes.
        device: where to run (``auto``: CUDA when present).

    Build it with :meth:`load`.
    """

    def __init__(self, algorithm: Algorithm, preprocessing: ImagePreprocessing, cfg: Config, outputs: int,
                 device: str = "auto") -> None:
        if algorithm.objective != "classification":
            raise ValueError(f"a predictor labels images; {algorithm.name} was trained on {algorithm.objective} "
                             "tasks.")
        self.algorithm, self.preprocessing, self.cfg = algorithm, preprocessing, cfg
        self.device = place(algorithm, device, cfg.execution.precision)
        self.steps = int(cfg.eval.steps)
        """Adaptation steps when :meth:`predict` is not given ``steps``: the run's ``eval.steps``."""
        self.fixed_ways = int(outputs) if ALGORITHMS[algorithm.name].capabilities.head == "ways" else None
        """The only number of classes the algorithm takes (a head of that size, MAML's), or None (any)."""

    @classmethod
    def load(cls, checkpoint: str | os.PathLike[str], *, device: str | None = None,
             precision: str | None = None) -> Predictor:
        """The predictor of a checkpoint of ``innerloop train`` (best.pt, last.pt), rebuilt without its
        training data (:func:`~innerloop.training.run.load_for_inference`). ``device`` / ``precision``:
        this machine's choice (default ``auto`` and ``fp32``).

        Raises:
            CheckpointError: the file is not a readable checkpoint, is not of an image classifier, or
                lacks what rebuilds its model (naming it).
            ConfigError: a device or precision this machine cannot run.
        """
        overrides: dict[str, Any] = {"execution.vectorize": "loop", "execution.task_threads": 1}
        if device is not None:
            overrides["execution.device"] = device
        if precision is not None:
            overrides["execution.precision"] = precision
        cfg, algorithm, inputs = load_for_inference(Path(checkpoint), overrides)
        if inputs.get("preprocessing") is None or cfg.objective_kind != "classification":
            raise CheckpointError(f"{os.fspath(checkpoint)!r} is a {cfg.task.family} model "
                                  f"({cfg.objective_kind}); a predictor labels images with a model trained on "
                                  "an image family (omniglot, miniimagenet, image-folder, ...).")
        return cls(algorithm, ImagePreprocessing.from_dict(inputs["preprocessing"]), cfg, int(inputs["outputs"]),
                   cfg.execution.device)

    # -- images -----------------------------------------------------------------------------------
    def preprocess(self, images: Images, *, ink: Ink = "auto", what: str = "images") -> tuple[Tensor, list[str]]:
        """``(x, names)``: ``images`` as the model's input, float32 ``[n, C, H, W]`` in [0, 1] (exactly the
        training loader's tensor for the same file), and how each was given.

        Raises:
            DataError: an unreadable image (naming it), an empty folder, an unsupported kind of input.
            ValueError: ``ink`` other than ``auto`` for a model not trained on ink drawings.
        """
        if ink not in INK:
            raise ValueError(f"ink = {ink!r} is invalid: choose one of {INK}.")
        prep = self.preprocessing
        if ink != "auto" and not prep.invert:
            raise ValueError(f"ink = {ink!r} is for models trained on ink drawings (Omniglot); this one reads "
                             f"{prep.mode} images as they are: leave ink = 'auto'.")
        sources, names = _as_list(images, what)
        out = np.empty((len(sources), *prep.shape), dtype=np.uint8)
        for i, (source, name) in enumerate(zip(sources, names, strict=True)):
            arr = prep(source, name=name)
            if prep.invert and (ink == "light" or (ink == "auto" and _light_on_dark(arr))):
                arr = np.subtract(255, arr, dtype=np.uint8)  # already light ink on dark: as training stores it
            out[i] = arr
        return torch.from_numpy(out).float() / 255.0, names

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, support: Images, support_labels: Sequence[Hashable] | None, query: Images, *,
                steps: int | None = None, ink: Ink = "auto") -> Prediction:
        """Adapt to the labelled ``support`` images and label the ``query`` images.

        BatchNorm with batch statistics and ProtoNets' ``transductive_steps`` see all the images of one call,
        so a query's scores then depend on the other queries given with it (as in the run's evaluation).

        Args:
            support: the labelled images; a support folder (one sub-folder per class, see
                :func:`support_folder`) with ``support_labels=None``, else images as for :meth:`preprocess`.
            support_labels: one label per support image, any hashable (``None`` for a support folder). The
                number of distinct labels is the task's ways; it must be one the algorithm takes (MAML's
                head has a fixed size; ProtoNets, MetaOptNet and the Baselines take any).
            query: the images to label: a folder of image files, or images as for :meth:`preprocess`.
            steps: adaptation steps (default :attr:`steps`, the run's ``eval.steps``).
            ink: see the module docstring (models trained on ink drawings only).

        Returns:
            the :class:`Prediction`: ``scores [n_query, ways]``, columns in the order of ``classes``.

        Raises:
            DataError: an unreadable image, an empty folder (naming it).
            ValueError: labels that do not match the support images, fewer than two classes, a way count
                the algorithm does not take, or a negative ``steps``.
        """
        steps = self.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps = {steps!r} is invalid: give an integer >= 0 (adaptation steps).")
        if support_labels is None:
            if not (isinstance(support, str | os.PathLike) and Path(support).is_dir()):
                raise ValueError("support_labels is None but support is not a folder of class folders; give one "
                                 "label per support image, or a support folder with one sub-folder per class.")
            files, folder_labels = support_folder(support)
            support = list(files)
            labels: list[Hashable] = list(folder_labels)
        else:
            labels = list(support_labels)
        sx, _ = self.preprocess(support, ink=ink, what="support")
        if len(labels) != len(sx):
            raise ValueError(f"{len(sx)} support images but {len(labels)} support labels; give one label per "
                             "image.")
        try:
            classes = list(dict.fromkeys(labels))
        except TypeError as err:
            raise ValueError(f"support labels must be hashable (strings, numbers): {err}.") from None
        ways = len(classes)
        if ways < 2:
            raise ValueError(f"the support names {ways} class ({classes!r}); a prediction needs at least two.")
        if self.fixed_ways is not None and ways != self.fixed_ways:
            raise ValueError(f"the support names {ways} classes, but this {self.algorithm.name} model's head "
                             f"has {self.fixed_ways} outputs: give support images of exactly {self.fixed_ways} "
                             "classes (ProtoNets, MetaOptNet and the Baselines take any number).")
        qx, names = self.preprocess(query, ink=ink, what="query")
        index = {c: j for j, c in enumerate(classes)}
        sy = torch.tensor([index[c] for c in labels], dtype=torch.int64)
        order = torch.argsort(sy, stable=True)  # class-major, as the training tasks are laid out
        task = Task(sx[order], sy[order], qx, torch.zeros(len(qx), dtype=torch.int64))
        logits = self._query_outputs(TaskBatch.stack([task]), steps).float().cpu()
        if logits.shape != (len(qx), ways):
            raise RuntimeError(f"{self.algorithm.name} gave query outputs of shape {tuple(logits.shape)}, not "
                               f"[{len(qx)}, {ways}].")
        scores = logits.softmax(dim=-1)
        return Prediction([classes[int(j)] for j in logits.argmax(dim=-1)], scores, logits, classes, names)

    def _query_outputs(self, batch: TaskBatch, steps: int) -> Tensor:
        """``[n_query, ways]``: the query outputs the algorithm's ``evaluate`` scores after ``steps`` steps
        (its metric's last input: every ``evaluate`` scores the query after 0..steps steps in order)."""
        algorithm = self.algorithm
        fns, capture = algorithm.fns, _Capture(algorithm.fns)
        was_training = algorithm.training
        algorithm.eval()
        algorithm.fns = capture.fns
        try:
            algorithm.evaluate(to_device(batch, self.device), steps)
        finally:
            algorithm.fns = fns
            algorithm.train(was_training)
        if capture.last is None:
            raise RuntimeError(f"{algorithm.name}.evaluate scored no query prediction through its objective; it "
                               "cannot be used by the predictor.")
        return capture.last

    def __repr__(self) -> str:
        ways = self.fixed_ways if self.fixed_ways is not None else "any"
        return (f"Predictor({self.algorithm.name}, inputs {list(self.preprocessing.shape)} "
                f"({self.preprocessing.mode}), ways {ways}, {self.steps} steps, on {self.device})")


def _light_on_dark(arr: np.ndarray) -> bool:
    """Whether a preprocessed (inverted) ink image ``[1, H, W]`` had light ink on a dark page: its border
    (first and last rows and columns) is mostly light after the inversion."""
    a = arr[0]
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    return bool(np.median(border) > 127)
