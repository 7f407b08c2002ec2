"""Task augmentation for image tasks: random affine distortions, rotation classes, test-time copies.

Everything here is a function of a task's seed: task ``i`` of a split is augmented with a
:class:`torch.Generator` seeded with ``task_seed(family.seed, split, i, "augment")`` (test-time
copies: salt ``"tta"``), so a resumed run, an uninterrupted one, prefetching on or off, any number
of loader workers and any meta-batch split see the same augmented tasks. The random draws are
tiny (a few numbers per image) and made on the CPU; the images are transformed in torch on the
device they are on (one :func:`torch.nn.functional.grid_sample` for a whole meta-batch; no numpy,
no per-image Python loop).

Affine distortions follow Koch, Zemel & Salakhutdinov (2015), "Siamese Neural Networks for
One-shot Image Recognition", section 4.1: each image gets ``T = (theta, rho_x, rho_y, s_x, s_y,
t_x, t_y)`` with ``theta`` in [-10, 10] degrees, shears ``rho`` in [-0.3, 0.3], scales ``s`` in
[0.8, 1.2] and translations ``t`` in [-2, 2] pixels (of their 105 x 105 images), each component
included with probability 0.5 (:data:`KOCH`; here the translation is a fraction of the image side,
2/105, so the same distortion applies at 28, 56, 84 or 105 pixels). The four components are
rotation, shear (both axes), scale (both axes) and translation (both axes); each is kept or left
out as a whole. Pixels that come from outside the image are 0 (Omniglot's background: ink is 1).

Rotation classes (``class_rotations``): every class of a task is turned by a quarter turn drawn
uniformly from 0/90/180/270 degrees, the same for all its support and query images, so a rotated
character acts as a new class (the task-level counterpart of the Vinyals split's rotation classes;
``Omniglot(split="lake", rotations=True)`` adds them as dataset classes instead).

Test-time augmentation (:class:`TTAFamily`): ``copies`` versions of each task's support and
query (copy 0 the original, copies 1.. affinely distorted), laid out copy-major; the evaluation
pools the support copies and averages the predictions of each query's copies
(:func:`innerloop.training.evaluate.tta_objective`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from innerloop.tasks import Objective, Split, Task, TaskBatch, TaskFamily, task_seed

__all__ = [
    "KOCH",
    "Augment",
    "AugmentedFamily",
    "TTAFamily",
    "affine_theta",
    "augment_batch",
    "augment_labelled",
    "augment_task",
    "distort",
    "sample_affine",
    "tta_batch",
]

AFFINE_KEYS: tuple[str, ...] = ("rotation", "shear_x", "shear_y", "scale_x", "scale_y", "shift_x", "shift_y")
"""The per-image parameters :func:`sample_affine` draws, in this order."""


@dataclass(frozen=True)
class Augment:
    """How the images of a task are distorted (all ranges symmetric about the identity).

    Attributes:
        rotation: largest rotation, degrees (``theta`` uniform in ``[-rotation, rotation]``).
        shear: largest shear factor, per axis, in [0, 1) (``rho`` uniform in ``[-shear, shear]``).
        scale: largest relative scale change, per axis, in [0, 1) (``s`` in ``[1 - scale, 1 + scale]``).
        translation: largest shift, per axis, as a fraction of the image side (2/105: Koch's 2 pixels).
        probability: each of the four components (rotation, shear, scale, translation) is applied to an
            image with this probability, independently (Koch: 0.5).
        class_rotations: turn every class of a task by a random multiple of 90 degrees (a new class).
        strength: multiplies every range (0: the identity, 1: as given).
    """

    rotation: float = 0.0
    shear: float = 0.0
    scale: float = 0.0
    translation: float = 0.0
    probability: float = 0.5
    class_rotations: bool = False
    strength: float = 1.0

    def __post_init__(self) -> None:
        for key, rule in (("rotation", "[0, 180] degrees"), ("shear", "[0, 1)"), ("scale", "[0, 1)"),
                          ("translation", "[0, 1) (a fraction of the image side)")):
            v = getattr(self, key)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0.0
            if not ok or (v > 180.0 if key == "rotation" else v >= 1.0):
                raise ValueError(f"augment {key} = {v!r} is invalid: give a number in {rule} (0: off).")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"augment probability = {self.probability!r} is invalid: give a number in [0, 1].")
        if not (self.strength >= 0.0 and math.isfinite(self.strength)):
            raise ValueError(f"augment strength = {self.strength!r} is invalid: give a number >= 0 (0: identity).")
        if self.strength * max(self.shear, self.scale) >= 1.0:
            raise ValueError(f"augment strength = {self.strength!r} makes shear or scale reach 1 (a degenerate "
                             f"transform): keep strength * max(shear, scale) < 1.")

    @property
    def affine(self) -> bool:
        """Whether any affine distortion can happen."""
        ranges = (self.rotation, self.shear, self.scale, self.translation)
        return self.strength > 0 and self.probability > 0 and any(r > 0 for r in ranges)

    @property
    def active(self) -> bool:
        """Whether this changes any image."""
        return self.affine or self.class_rotations

    def describe(self) -> str:
        """One line for a results table: ``rotation 10 deg, shear 0.3, scale 0.2, translation 0.019 (p 0.5)``."""
        parts = [f"{k} {v:.3g}{' deg' if k == 'rotation' else ''}"
                 for k, v in (("rotation", self.rotation), ("shear", self.shear), ("scale", self.scale),
                              ("translation", self.translation)) if v > 0]
        text = ", ".join(parts)
        if text:
            text += f" (each with p {self.probability:g}" + (f", strength {self.strength:g})"
                                                              if self.strength != 1 else ")")
        if self.class_rotations:
            text = ", ".join(p for p in (text, "rotation classes") if p)
        return text or "none"


KOCH = Augment(rotation=10.0, shear=0.3, scale=0.2, translation=2 / 105, probability=0.5)
"""Koch et al. (2015)'s affine distortions (see the module docstring)."""


def sample_affine(aug: Augment, n: int, generator: torch.Generator) -> dict[str, Tensor]:
    """The parameters of ``n`` random distortions, float64 ``[n]`` each (:data:`AFFINE_KEYS`): rotation in
    degrees, shears, scales, shifts (fractions of the side); a component left out holds its identity value
    (0, or 1 for scales). Always draws ``11 n`` numbers from ``generator``, whatever ``aug`` says."""
    u = torch.rand(n, 7, generator=generator, dtype=torch.float64) * 2 - 1
    on = torch.rand(n, 4, generator=generator, dtype=torch.float64) < aug.probability
    k = aug.strength
    ranges = torch.tensor([aug.rotation, aug.shear, aug.shear, aug.scale, aug.scale, aug.translation,
                           aug.translation], dtype=torch.float64) * k
    which = on[:, [0, 1, 1, 2, 2, 3, 3]]
    v = torch.where(which, u * ranges, torch.zeros((), dtype=torch.float64))
    out = dict(zip(AFFINE_KEYS, v.unbind(1), strict=True))
    out["scale_x"], out["scale_y"] = 1 + out["scale_x"], 1 + out["scale_y"]
    return out


def affine_theta(p: dict[str, Tensor]) -> Tensor:
    """``[n, 2, 3]`` float64 matrices for :func:`torch.nn.functional.affine_grid` (output -> input
    coordinates, normalised to [-1, 1]) of the distortions ``p`` (:func:`sample_affine`'s).

    The forward map takes an input point ``q`` to ``R(theta) Sh(rho) S(s) q + t`` (scale, then shear,
    then rotate, then shift by ``2 * shift`` normalised units, i.e. ``shift`` of the side); the grid
    needs its inverse. As displayed (rows down), a positive rotation turns clockwise (90 degrees is
    ``torch.rot90(x, -1, dims=(-2, -1))``), ``shift_x > 0`` moves right and ``shift_y > 0`` down."""
    th = torch.deg2rad(p["rotation"])
    c, s = torch.cos(th), torch.sin(th)
    one = torch.ones_like(c)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    shear = torch.stack([torch.stack([one, p["shear_x"]], -1), torch.stack([p["shear_y"], one], -1)], -2)
    scale = torch.diag_embed(torch.stack([p["scale_x"], p["scale_y"]], -1))
    a = rot @ shear @ scale
    t = 2 * torch.stack([p["shift_x"], p["shift_y"]], -1)
    inv = torch.linalg.inv(a)
    return torch.cat([inv, -(inv @ t.unsqueeze(-1))], -1)


def distort(x: Tensor, theta: Tensor) -> Tensor:
    """Images ``x [n, C, H, W]`` resampled (bilinear, zeros outside) through ``theta [n, 2, 3]``
    (output -> input, normalised coordinates), on ``x``'s device; an image whose ``theta`` is the
    identity is returned unchanged (bit for bit)."""
    if x.dim() != 4 or theta.shape != (x.shape[0], 2, 3):
        raise ValueError(f"distort needs x [n, C, H, W] and theta [n, 2, 3]; got {tuple(x.shape)} and "
                         f"{tuple(theta.shape)}.")
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=theta.dtype)
    moved = (theta != eye).flatten(1).any(1)
    if not bool(moved.any()):
        return x
    idx = moved.nonzero().reshape(-1).to(x.device)
    src = x.index_select(0, idx)
    th = theta[moved].to(x.device, src.dtype)
    grid = F.affine_grid(th, list(src.shape), align_corners=False)
    out = x.clone()
    out.index_copy_(0, idx, F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    return out


def _turn(x: Tensor, turns: Tensor) -> Tensor:
    """``x [n, C, H, W]`` with image ``i`` turned by ``turns[i]`` quarter turns (``torch.rot90``)."""
    if not bool((turns % 4 != 0).any()):
        return x
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation classes need square images, got {tuple(x.shape[-2:])}; set "
                         "class_rotations = false.")
    out = x.clone()
    for k in (1, 2, 3):
        sel = (turns % 4 == k).nonzero().reshape(-1).to(x.device)
        if sel.numel():
            out.index_copy_(0, sel, torch.rot90(x.index_select(0, sel), k, dims=(-2, -1)))
    return out


def _check_images(batch: TaskBatch) -> None:
    if batch.support_x.dim() != 5:
        raise ValueError(f"augmentation needs image tasks (support_x [tasks, n, C, H, W]), got support_x of "
                         f"shape {tuple(batch.support_x.shape)}; augment image families only.")


def augment_batch(batch: TaskBatch, aug: Augment, seeds: Sequence[int]) -> TaskBatch:
    """Every task of ``batch`` augmented by ``aug``, task ``t`` from a generator seeded with ``seeds[t]``.

    Per task, the draws are: the quarter turn of each class (``class_rotations``: one per label
    ``0..max label``), then the distortion of each support image, then of each query image. Shapes and
    labels are unchanged: ``support_x [tasks, s, C, H, W]``, ``query_x [tasks, q, C, H, W]``; the images
    stay on their device."""
    _check_images(batch)
    tasks, s = batch.support_x.shape[:2]
    q = batch.query_x.shape[1]
    if len(seeds) != tasks:
        raise ValueError(f"{tasks} tasks but {len(seeds)} seeds; give one seed per task.")
    if not aug.active:
        return batch
    sy, qy = batch.support_y.cpu(), batch.query_y.cpu()
    turns, thetas = [], []
    for t, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        if aug.class_rotations:
            ways = int(max(int(sy[t].max()), int(qy[t].max()))) + 1
            per_class = torch.randint(4, (ways,), generator=g)
            turns.append(torch.cat([per_class[sy[t]], per_class[qy[t]]]))
        if aug.affine:
            thetas.append(affine_theta(sample_affine(aug, s + q, g)))
    x = torch.cat([batch.support_x, batch.query_x], 1)
    shape = x.shape
    flat = x.reshape(tasks * (s + q), *shape[2:])
    if turns:
        flat = _turn(flat, torch.cat(turns))
    if thetas:
        flat = distort(flat, torch.cat(thetas))
    x = flat.reshape(shape)
    return TaskBatch(x[:, :s], batch.support_y, x[:, s:], batch.query_y)


def augment_task(task: Task, aug: Augment, seed: int) -> Task:
    """One task augmented as :func:`augment_batch` augments it inside a batch (the same images)."""
    return augment_batch(TaskBatch.stack([task]), aug, [seed]).task(0)


def augment_labelled(x: Tensor, labels: Tensor, classes: int, aug: Augment, seed: int) -> tuple[Tensor, Tensor]:
    """Images with global labels (a supervised batch) augmented by ``aug`` from a generator seeded with ``seed``.

    ``class_rotations``: image ``i`` is turned by ``k_i`` quarter turns (``k_i`` uniform in 0..3) and labelled
    ``labels[i] + k_i * classes``, so the rotated characters are new classes (``4 * classes`` in all); then
    each image is distorted by ``aug``'s affine part. Draws: the turns, then the distortions.

    Args:
        x: ``[n, C, H, W]`` images (any device; they stay there).
        labels: ``[n]`` int64 global labels in ``0..classes-1``.
        classes: the number of classes before rotation.

    Returns:
        ``(x [n, C, H, W], labels [n])``.
    """
    if x.dim() != 4 or labels.shape != x.shape[:1]:
        raise ValueError(f"augment_labelled needs x [n, C, H, W] and labels [n]; got {tuple(x.shape)} and "
                         f"{tuple(labels.shape)}.")
    g = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    if aug.class_rotations:
        turns = torch.randint(4, (n,), generator=g)
        x, labels = _turn(x, turns), labels + turns.to(labels.device) * classes
    if aug.affine:
        x = distort(x, affine_theta(sample_affine(aug, n, g)))
    return x, labels


def tta_batch(batch: TaskBatch, aug: Augment, copies: int, seeds: Sequence[int]) -> TaskBatch:
    """``copies`` versions of every task of ``batch`` laid out copy-major, for test-time augmentation.

    Copy 0 is the task itself; copies ``1..copies-1`` are distorted by ``aug``'s affine part
    (``class_rotations`` is not used: it would change the classes). Task ``t``'s draws come from a
    generator seeded with ``seeds[t]``: all of copy 1's images (support, then query), then copy 2's, ...

    Returns:
        ``support_x [tasks, copies * s, C, H, W]`` (rows ``j*s .. (j+1)*s - 1``: copy ``j``),
        ``support_y [tasks, copies * s]`` (the labels repeated), ``query_x [tasks, copies * q, C, H, W]``,
        ``query_y [tasks, copies * q]``.
    """
    _check_images(batch)
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"test-time augmentation copies must be an integer >= 1 (1: off), got {copies!r}.")
    tasks, s = batch.support_x.shape[:2]
    q = batch.query_x.shape[1]
    if len(seeds) != tasks:
        raise ValueError(f"{tasks} tasks but {len(seeds)} seeds; give one seed per task.")
    if copies == 1:
        return batch
    if not aug.affine:
        raise ValueError(f"test-time augmentation with {copies} copies needs affine distortions, but {aug} has "
                         "none; give rotation, shear, scale or translation ranges (e.g. KOCH).")
    extra = copies - 1
    thetas = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        thetas.append(affine_theta(sample_affine(aug, extra * (s + q), g)).reshape(extra, s + q, 2, 3))
    theta = torch.stack(thetas)  # [tasks, extra, s + q, 2, 3]
    x = torch.cat([batch.support_x, batch.query_x], 1)  # [tasks, s + q, C, H, W]
    rep = x.unsqueeze(1).expand(tasks, extra, *x.shape[1:]).reshape(-1, *x.shape[2:])
    moved = distort(rep, theta.reshape(-1, 2, 3)).reshape(tasks, extra, s + q, *x.shape[2:])
    sx = torch.cat([batch.support_x.unsqueeze(1), moved[:, :, :s]], 1).flatten(1, 2)
    qx = torch.cat([batch.query_x.unsqueeze(1), moved[:, :, s:]], 1).flatten(1, 2)
    sy = batch.support_y.repeat(1, copies, *([1] * (batch.support_y.dim() - 2)))
    qy = batch.query_y.repeat(1, copies, *([1] * (batch.query_y.dim() - 2)))
    return TaskBatch(sx, sy, qx, qy)


class _Wrapper:
    """A task family that changes the batches of another; everything else is the other's."""

    def __init__(self, family: TaskFamily) -> None:
        self.family = family

    @property
    def objective(self) -> Objective:
        return self.family.objective

    @property
    def seed(self) -> int:
        return self.family.seed

    def __getattr__(self, name: str) -> Any:  # ways, shots, splits, within(), ... of the wrapped family
        if name == "family":
            raise AttributeError(name)
        return getattr(self.family, name)


class AugmentedFamily(_Wrapper):
    """``family`` whose tasks of ``splits`` (default: meta-training only) are augmented by ``aug``.

    Task ``i`` of ``split`` is ``family.task(split, i)`` augmented with the seed
    ``task_seed(family.seed, split, i, "augment")``: a function of (seed, split, index), as every task.
    ``batch(split, indices)`` builds the whole meta-batch and augments it at once (on the batch's device).
    """

    def __init__(self, family: TaskFamily, aug: Augment, splits: Sequence[str] = ("train",)) -> None:
        super().__init__(family)
        self.augment, self.augmented_splits = aug, tuple(splits)

    def _seeds(self, split: str, indices: Sequence[int]) -> list[int]:
        return [task_seed(self.family.seed, split, int(i), "augment") for i in indices]

    def task(self, split: Split, index: int) -> Task:
        t = self.family.task(split, index)
        if split not in self.augmented_splits:
            return t
        return augment_task(t, self.augment, self._seeds(split, [index])[0])

    def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch:
        b = self.family.batch(split, indices)
        return augment_batch(b, self.augment, self._seeds(split, indices)) if split in self.augmented_splits else b

    def __repr__(self) -> str:
        return f"AugmentedFamily({self.family!r}, {self.augment.describe()}, splits={list(self.augmented_splits)})"


class TTAFamily(_Wrapper):
    """``family`` whose batches hold ``copies`` versions of each task (:func:`tta_batch`), seeded with
    ``task_seed(family.seed, split, i, "tta")``. ``tta_copies`` tells
    :func:`~innerloop.training.evaluate.meta_test` to average each query's predictions over its copies.
    ``task(split, i)`` is the plain task (TTA is a property of how a batch is scored)."""

    def __init__(self, family: TaskFamily, aug: Augment, copies: int) -> None:
        super().__init__(family)
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise ValueError(f"test-time augmentation copies must be an integer >= 1 (1: off), got {copies!r}.")
        if copies > 1 and not aug.affine:
            raise ValueError(f"test-time augmentation with {copies} copies needs affine distortions; give "
                             "rotation, shear, scale or translation ranges.")
        self.augment, self.tta_copies = aug, copies

    def task(self, split: Split, index: int) -> Task:
        return self.family.task(split, index)

    def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch:
        seeds = [task_seed(self.family.seed, split, int(i), "tta") for i in indices]
        return tta_batch(self.family.batch(split, indices), self.augment, self.tta_copies, seeds)

    def __repr__(self) -> str:
        return f"TTAFamily({self.family!r}, {self.tta_copies} copies, {self.augment.describe()})"
