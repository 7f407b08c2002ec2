"""Meta-Dataset episodes: the variable-way, variable-shot sampler of Triantafillou et al. (2020).

An episode is drawn in this order (the rules of the paper's appendix and of its reference code,
``meta_dataset/data/sampling.py``, with its defaults):

1. a **source** (uniformly among the sources that have the split, or by ``source_weights``);
2. a **class pool**: the source's classes with at least ``min_images`` images, or, for a source in
   ``within_group`` (Omniglot), the classes of one group (alphabet) drawn uniformly among the
   groups with at least ``min_ways`` such classes (the paper's bi-level hierarchy);
3. the **ways** ``N ~ U{min_ways, ..., min(max_ways, |pool|)}`` and ``N`` distinct classes of the
   pool, in a random order (class ``j`` of it gets label ``j``);
4. the **query size per class** ``q = min(max_query_per_class, min_c floor(|Im(c)| / 2))`` (every
   class gets ``q``: the query set is balanced);
5. the **support size** ``|S| = min(max_support, sum_c floor(beta * min(max_support_per_class,
   |Im(c)| - q)) + 1)`` with ``beta ~ U[0, 1)``, i.e. ``ceil(beta' * ...)`` with ``beta'`` in
   ``(0, 1]``, so ``|S| >= N``;
6. the **shots** ``k_c = min(floor(R_c * (|S| - N)) + 1, |Im(c)| - q)`` with
   ``R_c = |Im(c)| exp(alpha_c) / sum_c' |Im(c')| exp(alpha_c')`` and
   ``alpha_c ~ U[log 0.5, log 2)``: shares follow the class sizes, with noise, so supports are
   class-imbalanced;
7. ``k_c + q`` distinct images of each class: the first ``k_c`` for the support, the others for
   the query (no image is in both).

ImageNet's hierarchy-based class sampling (WordNet sub-graphs) is left out: every source other
than those in ``within_group`` is flat. Steps 1-6 are the :class:`EpisodeDescription` of
:meth:`MetaDatasetEpisodes.describe`, computed without reading an image.

Episode ``i`` of a split is a pure function of (family seed, split, ``i``, the sources and the
options): a :class:`torch.Generator` seeded with ``task_seed(seed, split, i)``. The test protocol is
the first ``n`` (the paper: 600) episodes of the ``test`` split (:meth:`MetaDatasetEpisodes.episodes`,
what :func:`~innerloop.training.evaluate.meta_test` evaluates), per source with
:meth:`MetaDatasetEpisodes.for_source`.

Episodes differ in ways and shots, which a :class:`~innerloop.tasks.TaskBatch` cannot stack: a
meta-batch holds one episode (``meta_batch_size = 1``; ``meta_test`` reads
:attr:`MetaDatasetEpisodes.max_meta_batch` and evaluates one episode at a time).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from innerloop.data.factory import MissingDataError, image_splits
from innerloop.data.images import ImageClassDataset, size_pair
from innerloop.data.omniglot import META_DATASET_VAL_ALPHABETS
from innerloop.data.sampling import IMAGE_FAMILIES
from innerloop.tasks import SPLITS, Objective, Split, Task, TaskBatch, check_split, task_seed

__all__ = ["EpisodeDescription", "MetaDatasetEpisodes", "load_sources"]

SourceSplits = Mapping[str, ImageClassDataset]
"""``{split: ImageClassDataset}`` of one source (e.g. :class:`~innerloop.data.omniglot.Omniglot`)."""

GREY_TO_LUMA = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights (what Pillow's ``convert("L")`` uses) for an RGB source seen in grey."""


@dataclass(frozen=True)
class EpisodeDescription:
    """The composition of one episode, drawn without reading an image.

    Attributes:
        source: the source's name.
        split: the split it is drawn from.
        classes: ``[ways]`` class indices into ``sources[source][split]``, in label order.
        shots: ``[ways]`` support images of each class (``k_c``, >= 1).
        queries: query images of every class (``q``).
        support_images: per class, the ``shots[c]`` image indices (within the class) of the support.
        query_images: per class, the ``queries`` image indices of the query (disjoint from the support's).
    """

    source: str
    split: Split
    classes: tuple[int, ...]
    shots: tuple[int, ...]
    queries: int
    support_images: tuple[tuple[int, ...], ...]
    query_images: tuple[tuple[int, ...], ...]

    @property
    def ways(self) -> int:
        """Classes in the episode (``N``)."""
        return len(self.classes)

    @property
    def support_size(self) -> int:
        """``|S| = sum_c shots[c]``."""
        return sum(self.shots)

    @property
    def query_size(self) -> int:
        """``N * queries``."""
        return self.ways * self.queries


def _count(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")
    return value


def _as_sources(
    sources: Mapping[str, SourceSplits] | Sequence[tuple[str, SourceSplits]],
) -> dict[str, SourceSplits]:
    items = list(sources.items()) if isinstance(sources, Mapping) else list(sources)
    if not items:
        raise ValueError("Meta-Dataset episodes need at least one source; got none. Give "
                         "{name: {split: dataset}}.")
    out: dict[str, SourceSplits] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and item[0]):
            raise ValueError(f"a source must be a (name, {{split: dataset}}) pair with a non-empty name, "
                             f"got {item!r}.")
        name, splits = item
        if name in out:
            raise ValueError(f"the source name {name!r} is given twice; give every source once, under its own "
                             "name.")
        if not isinstance(splits, Mapping):
            raise ValueError(f"source {name!r} must be a mapping {{split: ImageClassDataset}}, got "
                             f"{type(splits).__name__}.")
        for split in splits:
            check_split(split)
            if not isinstance(splits[split], ImageClassDataset):
                raise ValueError(f"source {name!r}, split {split!r}: expected an ImageClassDataset, got "
                                 f"{type(splits[split]).__name__}.")
        out[name] = splits
    return out


def _convert(x: Tensor, channels: int, size: tuple[int, int]) -> Tensor:
    """``x [m, C, H, W]`` (float in [0, 1]) with ``channels`` channels and ``size`` pixels:
    grey repeated to ``channels``, RGB to grey by luma, resized bilinearly with anti-aliasing."""
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:  # 3 -> 1 (checked when the family is built)
            w = torch.tensor(GREY_TO_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    return x.contiguous()


class MetaDatasetEpisodes:
    """Variable-way, variable-shot, class-imbalanced episodes over several image sources.

    The sampling rules are in the module docstring; the defaults are the paper's. Shapes of
    :meth:`task`: ``support_x [|S|, C, H, W]`` float32 with examples grouped by class (``shots[0]``
    of label 0, then ``shots[1]`` of label 1, ...), ``support_y [|S|]`` int64 in ``0..N-1``,
    ``query_x [N * q, C, H, W]``, ``query_y [N * q]`` (``q`` of each label, in order).

    Args:
        sources: ``{name: {split: ImageClassDataset}}`` (or a sequence of ``(name, splits)`` pairs),
            e.g. from :func:`load_sources`. A split of the family is drawn from the sources that
            have it; the class names of the splits of one source must be disjoint.
        seed: the family seed.
        min_ways: the fewest classes of an episode (5).
        max_ways: the most classes of an episode (50).
        max_support: the largest support set ``|S|`` (500).
        max_support_per_class: the most a class contributes to ``|S|``'s draw (100).
        max_query_per_class: the most query images per class (10).
        min_log_weight: lower end of the log-importance ``alpha_c`` (``log 0.5``).
        max_log_weight: upper end of ``alpha_c`` (``log 2``).
        min_images: classes with fewer images are left out of the pools (>= 2: one support and one
            query image); they are listed in :attr:`excluded`.
        source_weights: ``{source: weight > 0}``, the probability of each source up to normalisation
            over the sources that have the split (default: uniform).
        within_group: the sources whose episodes take all classes from one group (the Omniglot
            alphabet: ``ImageClassDataset.groups``); default: the source named ``omniglot``, if any.
        image_size: ``(height, width)`` (or an int for a square) every episode's images are resized
            to (bilinear, anti-aliased) when read; default: the sources' common size (sources of
            different sizes need it).
        channels: 1 or 3, the channels every episode has (grey is repeated, RGB becomes luma);
            default: the sources' common number, or 3 when grey and RGB sources are mixed.
    """

    objective: Objective = "classification"
    max_meta_batch: int = 1
    """Episodes per :class:`~innerloop.tasks.TaskBatch`: one, since episodes differ in shape."""

    def __init__(
        self,
        sources: Mapping[str, SourceSplits] | Sequence[tuple[str, SourceSplits]],
        *,
        seed: int = 0,
        min_ways: int = 5,
        max_ways: int = 50,
        max_support: int = 500,
        max_support_per_class: int = 100,
        max_query_per_class: int = 10,
        min_log_weight: float = math.log(0.5),
        max_log_weight: float = math.log(2.0),
        min_images: int = 2,
        source_weights: Mapping[str, float] | None = None,
        within_group: Collection[str] | None = None,
        image_size: int | tuple[int, int] | None = None,
        channels: int | None = None,
    ) -> None:
        self.sources = _as_sources(sources)
        self.seed = int(seed)
        self.min_ways = _count("min_ways", min_ways, 1)
        self.max_ways = _count("max_ways", max_ways, 1)
        if self.max_ways < self.min_ways:
            raise ValueError(f"max_ways = {max_ways} is below min_ways = {min_ways}; use max_ways >= min_ways.")
        self.max_support = _count("max_support", max_support, 1)
        if self.max_support < self.max_ways:
            raise ValueError(f"max_support = {max_support} cannot give each of up to max_ways = {max_ways} "
                             f"classes a support image; use max_support >= {max_ways} or a smaller max_ways.")
        self.max_support_per_class = _count("max_support_per_class", max_support_per_class, 1)
        self.max_query_per_class = _count("max_query_per_class", max_query_per_class, 1)
        self.min_images = _count("min_images", min_images, 2)
        lo, hi = min_log_weight, max_log_weight
        if not (isinstance(lo, int | float) and isinstance(hi, int | float) and math.isfinite(lo)
                and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"min_log_weight = {lo!r} and max_log_weight = {hi!r} must be finite numbers with "
                             "min_log_weight <= max_log_weight (the paper: log 0.5 and log 2).")
        self.min_log_weight, self.max_log_weight = float(lo), float(hi)
        self.source_weights = self._check_weights(source_weights)
        self.within_group = self._check_groups(within_group)
        self.image_size, self.channels = self._check_shapes(image_size, channels)
        self.excluded: dict[tuple[str, str], list[str]] = {}
        """``{(source, split): [names of the classes with fewer than min_images images]}``."""
        self._pools: dict[tuple[str, str], list[Tensor]] = {}
        self._split_sources: dict[str, list[str]] = {}
        for name, splits in self.sources.items():
            self._check_disjoint(name, splits)
            for split in splits:
                self._pools[(name, split)] = self._make_pools(name, split, splits[split])
        for split in SPLITS:
            present = [n for n, s in self.sources.items() if split in s]
            if present:
                self._split_sources[split] = present
                if not any(self.source_weights[n] > 0 for n in present):
                    raise ValueError(f"source_weights give every source of the {split} split "
                                     f"({', '.join(present)}) weight 0; give one of them a weight > 0.")

    # --- checks ---------------------------------------------------------------------------------

    def _check_weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        if weights is None:
            return {n: 1.0 for n in self.sources}
        unknown = [k for k in weights if k not in self.sources]
        if unknown:
            raise ValueError(f"source_weights names {unknown[0]!r}, which is not a source; the sources are "
                             f"{', '.join(self.sources)}.")
        out = {}
        for n in self.sources:
            w = weights.get(n, 0.0)
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise ValueError(f"source_weights[{n!r}] = {w!r} is invalid: give a finite number >= 0.")
            out[n] = float(w)
        if not any(out.values()):
            raise ValueError(f"source_weights {dict(weights)} give no source a weight > 0; give at least one.")
        return out

    def _check_groups(self, within_group: Collection[str] | None) -> frozenset[str]:
        if within_group is None:
            return frozenset({"omniglot"} & set(self.sources))
        names = [within_group] if isinstance(within_group, str) else list(within_group)
        unknown = [n for n in names if n not in self.sources]
        if unknown:
            raise ValueError(f"within_group names {unknown[0]!r}, which is not a source; the sources are "
                             f"{', '.join(self.sources)}.")
        return frozenset(names)

    def _check_shapes(self, image_size: int | tuple[int, int] | None,
                      channels: int | None) -> tuple[tuple[int, int], int]:
        shapes = {(n, s): ds.image_shape for n, splits in self.sources.items() for s, ds in splits.items()}
        if not shapes:
            raise ValueError(f"the sources {', '.join(self.sources)} have no splits; give each "
                             "{split: dataset}.")
        chans = {c for c, _, _ in shapes.values()}
        sizes = {(h, w) for _, h, w in shapes.values()}
        if channels is None:
            if len(chans) > 1 and chans != {1, 3}:
                raise ValueError(f"the sources have images of {sorted(chans)} channels; give channels=1 or 3.")
            out_c = max(chans)
        elif channels in (1, 3) and not isinstance(channels, bool):
            out_c = channels
        else:
            raise ValueError(f"channels = {channels!r} is invalid: choose 1 (grey) or 3 (RGB).")
        bad = sorted(c for c in chans if c not in (out_c, 1, 3))
        if bad:
            raise ValueError(f"sources with {bad} channels cannot be shown with {out_c}: only grey -> RGB and "
                             "RGB -> grey are converted; give every source 1 or 3 channels.")
        if image_size is None:
            if len(sizes) > 1:
                listed = ", ".join(f"{n}/{s}: {h}x{w}" for (n, s), (_, h, w) in sorted(shapes.items()))
                raise ValueError(f"the sources' images differ in size ({listed}); give image_size=<int> (e.g. 84, "
                                 "the paper's) to resize every episode to one size.")
            out_hw = next(iter(sizes))
        else:
            out_hw = size_pair(image_size)
        return out_hw, out_c

    @staticmethod
    def _check_disjoint(name: str, splits: SourceSplits) -> None:
        keys = list(splits)
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                both = sorted(set(splits[a].names) & set(splits[b].names))
                if both:
                    raise ValueError(f"source {name!r}: the {a} and {b} splits share {len(both)} class name(s) "
                                     f"({', '.join(both[:3])}); the splits of a source must hold disjoint "
                                     "classes.")

    def _make_pools(self, name: str, split: str, ds: ImageClassDataset) -> list[Tensor]:
        ok = ds.counts >= self.min_images
        left_out = [ds.names[i] for i in (~ok).nonzero().reshape(-1).tolist()]
        if left_out:
            self.excluded[(name, split)] = left_out
        if name in self.within_group:
            pools = [torch.tensor(ix, dtype=torch.int64) for ix in
                     ([i for i in members if bool(ok[i])] for members in ds.group_classes().values())
                     if len(ix) >= self.min_ways]
            if not pools:
                raise ValueError(f"source {name!r}, split {split}: no group (alphabet) has {self.min_ways} "
                                 f"classes with >= {self.min_images} images, as within-group episodes need; lower "
                                 f"min_ways or leave {name!r} out of within_group.")
            return pools
        pool = ok.nonzero().reshape(-1)
        if pool.numel() < self.min_ways:
            raise ValueError(f"source {name!r}, split {split}: {pool.numel()} classes with >= {self.min_images} "
                             f"images, fewer than min_ways = {self.min_ways}; lower min_ways or give the split "
                             "more classes.")
        return [pool]

    # --- sampling ------------------------------------------------------------------------------

    def _sources_of(self, split: Split) -> list[str]:
        check_split(split)
        if split not in self._split_sources:
            have = [s for s in SPLITS if s in self._split_sources]
            raise KeyError(f"no source has a {split!r} split; this family has {', '.join(have) or 'none'}.")
        return self._split_sources[split]

    def describe(self, split: Split, index: int) -> EpisodeDescription:
        """Episode ``index`` of ``split``: its source, classes, shots and image indices (no image read)."""
        names = self._sources_of(split)
        g = torch.Generator().manual_seed(task_seed(self.seed, split, index, "MetaDatasetEpisodes"))
        weights = torch.tensor([self.source_weights[n] for n in names], dtype=torch.float64)
        source = names[int(torch.multinomial(weights, 1, generator=g))]
        ds = self.sources[source][split]
        pools = self._pools[(source, split)]
        pool = pools[int(torch.randint(len(pools), (1,), generator=g))]
        top = min(self.max_ways, pool.numel())
        ways = int(torch.randint(self.min_ways, top + 1, (1,), generator=g))
        classes = pool[torch.randperm(pool.numel(), generator=g)[:ways]]
        images = ds.counts[classes]  # [ways] int64
        queries = min(self.max_query_per_class, int((images // 2).min()))
        remaining = images - queries
        beta = torch.rand((), dtype=torch.float64, generator=g)
        contribution = remaining.clamp(max=self.max_support_per_class).double()
        support = min(int(torch.floor(beta * contribution + 1).sum()), self.max_support)
        alpha = torch.rand(ways, dtype=torch.float64, generator=g)
        alpha = self.min_log_weight + (self.max_log_weight - self.min_log_weight) * alpha
        share = images.double() * torch.exp(alpha)
        share = share / share.sum()
        shots = torch.minimum(torch.floor(share * (support - ways)).long() + 1, remaining)
        picks = [torch.randperm(int(n), generator=g)[: int(k) + queries].tolist()
                 for n, k in zip(images.tolist(), shots.tolist(), strict=True)]
        ks = shots.tolist()
        return EpisodeDescription(
            source, split, tuple(classes.tolist()), tuple(ks), queries,
            tuple(tuple(p[:k]) for p, k in zip(picks, ks, strict=True)),
            tuple(tuple(p[k:]) for p, k in zip(picks, ks, strict=True)),
        )

    def episodes(self, split: Split = "test", n: int = 600) -> list[EpisodeDescription]:
        """The fixed evaluation protocol: episodes ``0..n-1`` of ``split`` (what ``meta_test`` scores)."""
        _count("n", n, 1)
        return [self.describe(split, i) for i in range(n)]

    def task(self, split: Split, index: int) -> Task:
        """Episode ``index`` of ``split`` with its images (shapes in the class docstring)."""
        d = self.describe(split, index)
        ds = self.sources[d.source][split]
        cls = torch.tensor(d.classes, dtype=torch.int64)
        shots = torch.tensor(d.shots, dtype=torch.int64)
        rows = torch.cat([cls.repeat_interleave(shots), cls.repeat_interleave(d.queries)])
        picks = [i for p in (*d.support_images, *d.query_images) for i in p]
        index_in_class = torch.tensor(picks, dtype=torch.int64)
        x = _convert(ds.gather(rows, index_in_class), self.channels, self.image_size)
        labels = torch.arange(d.ways, dtype=torch.int64)
        n = d.support_size
        return Task(x[:n], labels.repeat_interleave(shots), x[n:], labels.repeat_interleave(d.queries))

    def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch:
        """A meta-batch of ONE episode: ``support_x [1, |S|, C, H, W]``, ... (episodes differ in shape)."""
        idx = [int(i) for i in indices]
        if len(idx) != 1:
            raise ValueError(
                f"a Meta-Dataset meta-batch holds one episode, got {len(idx)} indices: episodes differ in ways "
                "and shots, which one TaskBatch cannot stack. Use meta_batch_size = 1 for training and "
                "chunk = 1 for meta_test (which it picks itself from max_meta_batch)."
            )
        return TaskBatch.stack([self.task(split, idx[0])])

    def for_source(self, name: str) -> MetaDatasetEpisodes:
        """The same family (seed, options) over the source ``name`` alone: per-source evaluation, as
        the paper reports it (its episodes differ from the mixed family's)."""
        if name not in self.sources:
            raise KeyError(f"no source {name!r}; the sources are {', '.join(self.sources)}.")
        return MetaDatasetEpisodes(
            {name: self.sources[name]}, seed=self.seed, min_ways=self.min_ways, max_ways=self.max_ways,
            max_support=self.max_support, max_support_per_class=self.max_support_per_class,
            max_query_per_class=self.max_query_per_class, min_log_weight=self.min_log_weight,
            max_log_weight=self.max_log_weight, min_images=self.min_images,
            within_group=[name] if name in self.within_group else [], image_size=self.image_size,
            channels=self.channels,
        )

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}({', '.join(f'{s}={d.num_classes}' for s, d in sp.items())})"
                          for n, sp in self.sources.items())
        return (f"MetaDatasetEpisodes({self.min_ways}..{self.max_ways} ways, |S| <= {self.max_support}, "
                f"q <= {self.max_query_per_class}, {self.channels}x{self.image_size[0]}x{self.image_size[1]}, "
                f"seed={self.seed}; sources: {parts})")


def load_sources(
    sources: Sequence[str] | Mapping[str, str | None], image_size: int = 84
) -> dict[str, SourceSplits]:
    """``{name: {split: ImageClassDataset}}`` for :class:`MetaDatasetEpisodes`, every image ``image_size``
    pixels square (the paper's 84), loaded and cached on disk once.

    Args:
        sources: source names, or ``{name: folder}``. A name :func:`~innerloop.data.factory.image_splits`
            knows (:data:`~innerloop.data.sampling.IMAGE_FAMILIES`: ``omniglot``, ``miniimagenet``, ...)
            loads that family from ``folder`` (``None``: its default under ``$INNERLOOP_DATA``); Omniglot
            takes Meta-Dataset's alphabet split (``lake`` with
            :data:`~innerloop.data.omniglot.META_DATASET_VAL_ALPHABETS`: the other 25 background
            alphabets to train, those 5 to validate, the 20 evaluation alphabets to test). Any other
            name is a folder of ``train/``, ``val/``, ``test/`` holding ``<class>/<image>`` files.
        image_size: height and width of every image.
    """
    items = list(sources.items()) if isinstance(sources, Mapping) else [(n, None) for n in sources]
    out: dict[str, SourceSplits] = {}
    for name, root in items:
        if name == "omniglot":
            val_alphabets = (("lake_val_alphabets", META_DATASET_VAL_ALPHABETS),)
            out[name] = image_splits(name, root, "lake", image_size, val_alphabets)
            continue
        if name in IMAGE_FAMILIES and name != "image-folder":
            out[name] = image_splits(name, root, "vinyals", image_size)
            continue
        if root is None:
            raise MissingDataError(f"source {name!r} is not a built-in image family "
                                   f"({', '.join(IMAGE_FAMILIES)}); give its folder "
                                   f"({{{name!r}: '<folder with train/, val/, test/>'}}).")
        splits = image_splits("image-folder", root, "vinyals", image_size)
        if not splits:
            raise MissingDataError(f"source {name!r}: {root} has none of train/, val/, test/; put one folder of "
                                   "class folders per split there.")
        out[name] = splits
    return out


if TYPE_CHECKING:  # static check (mypy): the episodes are a TaskFamily
    from innerloop.tasks import TaskFamily

    _FAMILY_TYPE: type[TaskFamily] = MetaDatasetEpisodes
