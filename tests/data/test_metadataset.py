"""Meta-Dataset episodes: the published invariants of the sampler over thousands of episodes
(descriptions only, no image read), the images of a task, purity, conversion, errors, evaluation."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from innerloop.algorithms.baseline import BaselinePP
from innerloop.algorithms.protonet import ProtoNet
from innerloop.data.factory import MissingDataError
from innerloop.data.images import ImageClassDataset
from innerloop.data.metadataset import EpisodeDescription, MetaDatasetEpisodes, load_sources
from innerloop.models import Conv4
from innerloop.tasks import TaskFamily
from innerloop.training.config import TrainConfig
from innerloop.training.evaluate import meta_test
from innerloop.training.loop import meta_train


def dataset(prefix: str, counts: list[int], shape: tuple[int, int, int] = (1, 2, 2),
            groups: list[str] | None = None) -> ImageClassDataset:
    """Classes ``<prefix><i>`` with ``counts[i]`` images; image ``j`` of the storage is filled with
    ``j`` (float), so every image is told apart by its value."""
    total = sum(counts)
    data = torch.arange(total, dtype=torch.float32).view(total, 1, 1, 1).expand(total, *shape).contiguous()
    return ImageClassDataset(data, counts, [f"{prefix}{i}" for i in range(len(counts))], groups)


def counts(n: int, lo: int, hi: int, seed: int) -> list[int]:
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def sources() -> dict[str, dict[str, ImageClassDataset]]:
    """A large source (varied class sizes, some tiny), a small one, and an alphabet-grouped one."""
    alphabets = [f"alpha{i // 12}" for i in range(48)] + [f"tiny{i}" for i in range(3)]  # 4 x 12 + 3 x 1
    return {
        "large": {"train": dataset("L", [1, *counts(119, 2, 700, 0)]), "val": dataset("LV", counts(20, 2, 50, 1)),
                  "test": dataset("LT", counts(30, 2, 300, 2))},
        "small": {"train": dataset("S", counts(7, 20, 40, 3)), "test": dataset("ST", counts(6, 3, 9, 4))},
        "omniglot": {"train": dataset("O", [20] * 51, groups=alphabets),
                     "test": dataset("OT", [20] * 24, groups=[f"b{i // 8}" for i in range(24)])},
    }


@pytest.fixture(scope="module")
def family(sources: dict[str, dict[str, ImageClassDataset]]) -> MetaDatasetEpisodes:
    return MetaDatasetEpisodes(sources, seed=3)


def check_invariants(fam: MetaDatasetEpisodes, d: EpisodeDescription) -> None:
    ds = fam.sources[d.source][d.split]
    n = ds.counts[list(d.classes)]
    pool = int((ds.counts >= 2).sum())
    if d.source in fam.within_group:
        groups = {ds.groups[c] for c in d.classes}
        assert len(groups) == 1
        pool = sum(1 for g in ds.groups if g in groups)
    assert 5 <= d.ways <= min(50, pool)
    assert len(set(d.classes)) == d.ways and all(0 <= c < ds.num_classes for c in d.classes)
    assert bool((n >= 2).all())  # classes with a single image are never drawn
    assert d.queries == min(10, int((n // 2).min()))  # query size: the published rule exactly
    assert d.support_size <= min(500, int(torch.clamp(n - d.queries, max=100).sum()))
    assert d.support_size >= d.ways
    for c, k, s, q in zip(n.tolist(), d.shots, d.support_images, d.query_images, strict=True):
        assert k >= 1 and k + d.queries <= c
        assert len(s) == k and len(q) == d.queries
        assert len(set(s) | set(q)) == k + d.queries  # no image in both, none twice
        assert all(0 <= i < c for i in (*s, *q))


def test_published_invariants_over_thousands_of_episodes(family: MetaDatasetEpisodes) -> None:
    seen: Counter[str] = Counter()
    for split, n in (("train", 3000), ("val", 300), ("test", 600)):
        for i in range(n):
            d = family.describe(split, i)  # type: ignore[arg-type]
            assert d.split == split and split in family.sources[d.source]
            check_invariants(family, d)
            seen[f"{d.source}/{split}"] += 1
    # the source is uniform over the sources that have the split (3 for train, 1 for val, 3 for test)
    for s in ("large", "small", "omniglot"):
        assert 850 < seen[f"{s}/train"] < 1150
    assert seen["large/val"] == 300
    assert family.excluded == {("large", "train"): ["L0"]}


def test_support_reaches_its_caps() -> None:
    """Large classes reach the published caps: 50 ways, q = 10, and supports near |S| = 500 (the
    shots, floored shares of |S| - N plus one each, sum to at most |S|)."""
    fam = MetaDatasetEpisodes({"big": {"train": dataset("B", [600] * 60)}}, seed=0)
    ds = [fam.describe("train", i) for i in range(400)]
    assert max(d.ways for d in ds) == 50 and min(d.ways for d in ds) == 5
    assert 450 < max(d.support_size for d in ds) <= 500
    assert {d.queries for d in ds} == {10}


def test_ways_are_uniform_over_their_range() -> None:
    fam = MetaDatasetEpisodes({"s": {"train": dataset("C", [40] * 30)}}, seed=11)
    n = 5200
    freq = Counter(fam.describe("train", i).ways for i in range(n))
    assert set(freq) == set(range(5, 31))
    expected = n / 26
    chi2 = sum((freq[w] - expected) ** 2 / expected for w in range(5, 31))
    assert chi2 < 52.6  # the 0.999 quantile of chi-square with 25 degrees of freedom


def test_supports_are_class_imbalanced() -> None:
    """Equal class sizes still give unequal shots (the log-uniform importance noise), and the
    shares follow the class sizes when these differ."""
    equal = MetaDatasetEpisodes({"s": {"train": dataset("E", [200] * 20)}}, seed=5)
    ds = [equal.describe("train", i) for i in range(300)]
    assert sum(len(set(d.shots)) > 1 for d in ds) > 0.8 * len(ds)
    ratio = [max(d.shots) / min(d.shots) for d in ds if min(d.shots) >= 5]
    assert ratio and max(ratio) <= 4.5  # exp(alpha) lies in [0.5, 2): at most 4x, plus flooring
    skewed = MetaDatasetEpisodes({"s": {"train": dataset("K", [30] * 10 + [300] * 10)}}, seed=5)
    small = large = 0
    for i in range(300):
        d = skewed.describe("train", i)
        for c, k in zip(d.classes, d.shots, strict=True):
            small, large = (small + k, large) if c < 10 else (small, large + k)
    assert large > 2 * small


def test_grouped_source_draws_one_alphabet(family: MetaDatasetEpisodes) -> None:
    assert family.within_group == frozenset({"omniglot"})
    alone = family.for_source("omniglot")
    for i in range(300):
        d = alone.describe("train", i)
        assert len({alone.sources["omniglot"]["train"].groups[c] for c in d.classes}) == 1
        assert d.ways <= 12  # an alphabet has 12 classes; the 1-class "tiny" groups are never chosen
    flat = MetaDatasetEpisodes({"omniglot": family.sources["omniglot"]}, within_group=[], seed=3)
    assert max(flat.describe("train", i).ways for i in range(300)) > 12


def test_episodes_are_a_pure_function_of_seed_split_and_index(
    sources: dict[str, dict[str, ImageClassDataset]],
) -> None:
    a, b = MetaDatasetEpisodes(sources, seed=7), MetaDatasetEpisodes(sources, seed=7)
    forward = [a.describe("test", i) for i in range(50)]
    backward = [b.describe("test", i) for i in reversed(range(50))][::-1]
    assert forward == backward == a.episodes("test", 50)
    ta, tb = a.task("train", 4), b.task("train", 4)
    for x, y in zip((ta.support_x, ta.support_y, ta.query_x, ta.query_y),
                    (tb.support_x, tb.support_y, tb.query_x, tb.query_y), strict=True):
        assert torch.equal(x, y)
    other = MetaDatasetEpisodes(sources, seed=8)
    assert [other.describe("test", i) for i in range(50)] != forward
    assert [a.describe("val", i) for i in range(20)] != [a.describe("test", i) for i in range(20)]


def storage_rows(ds: ImageClassDataset, classes: tuple[int, ...],
                 images: tuple[tuple[int, ...], ...]) -> list[int]:
    """The storage rows of image ``images[c][j]`` of class ``classes[c]``, class by class."""
    return [int(ds.starts[c]) + j for c, js in zip(classes, images, strict=True) for j in js]


def test_task_holds_the_described_images(family: MetaDatasetEpisodes) -> None:
    for i in range(20):
        d, t = family.describe("train", i), family.task("train", i)
        ds = family.sources[d.source]["train"]
        assert t.support_x.shape == (d.support_size, 1, 2, 2) and t.query_x.shape == (d.query_size, 1, 2, 2)
        assert torch.bincount(t.support_y, minlength=d.ways).tolist() == list(d.shots)
        assert torch.bincount(t.query_y, minlength=d.ways).tolist() == [d.queries] * d.ways
        assert t.support_x[:, 0, 0, 0].long().tolist() == storage_rows(ds, d.classes, d.support_images)
        assert t.query_x[:, 0, 0, 0].long().tolist() == storage_rows(ds, d.classes, d.query_images)
        assert not set(t.support_x[:, 0, 0, 0].tolist()) & set(t.query_x[:, 0, 0, 0].tolist())


def test_splits_are_disjoint_and_overlap_is_refused(family: MetaDatasetEpisodes) -> None:
    for name, splits in family.sources.items():
        names = [set(ds.names) for ds in splits.values()]
        assert all(not (x & y) for i, x in enumerate(names) for y in names[i + 1:]), name
    leak = {"s": {"train": dataset("C", [10] * 8), "test": dataset("C", [10] * 6)}}
    with pytest.raises(ValueError, match="share 6 class name"):
        MetaDatasetEpisodes(leak)


def test_images_are_converted_to_one_shape() -> None:
    grey, rgb = dataset("G", [12] * 8, (1, 8, 8)), dataset("R", [12] * 8, (3, 12, 12))
    with pytest.raises(ValueError, match="image_size"):
        MetaDatasetEpisodes({"g": {"train": grey}, "r": {"train": rgb}})
    fam = MetaDatasetEpisodes({"g": {"train": grey}, "r": {"train": rgb}}, image_size=8)
    assert fam.channels == 3 and fam.image_size == (8, 8)
    got = {fam.describe("train", i).source: fam.task("train", i) for i in range(12)}
    assert set(got) == {"g", "r"}
    for t in got.values():
        assert t.support_x.shape[1:] == (3, 8, 8) and t.query_x.dtype == torch.float32
    g = got["g"].support_x
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 0], g[:, 2])  # grey repeated
    one = MetaDatasetEpisodes({"r": {"train": rgb}}, image_size=6, channels=1)
    assert one.task("train", 0).support_x.shape[1:] == (1, 6, 6)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"min_ways": 9}, "8 classes with >= 2 images, fewer than min_ways = 9"),
    ({"max_ways": 4}, "max_ways = 4 is below min_ways = 5"),
    ({"max_support": 40}, "max_support = 40"),
    ({"max_query_per_class": 0}, "max_query_per_class must be an integer >= 1"),
    ({"min_images": 1}, "min_images must be an integer >= 2"),
    ({"min_log_weight": 1.0, "max_log_weight": 0.0}, "min_log_weight <= max_log_weight"),
    ({"source_weights": {"nope": 1.0}}, "'nope', which is not a source"),
    ({"source_weights": {"s": 0.0}}, "give no source a weight > 0"),
    ({"within_group": ["s"]}, "no group"),
    ({"channels": 2}, "channels = 2 is invalid"),
])
def test_bad_options_are_refused_before_sampling(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MetaDatasetEpisodes({"s": {"train": dataset("C", [10] * 8)}}, **kwargs)  # type: ignore[arg-type]


def test_source_weights_choose_the_source() -> None:
    both = {"a": {"train": dataset("A", [10] * 8), "test": dataset("AT", [10] * 8)},
            "b": {"train": dataset("B", [10] * 8)}}
    fam = MetaDatasetEpisodes({**both, "b": {**both["b"], "test": dataset("BT", [10] * 8)}},
                              source_weights={"a": 0.0, "b": 1.0})
    assert {fam.describe(s, i).source for s in ("train", "test") for i in range(50)} == {"b"}
    with pytest.raises(ValueError, match=r"every source of the test split \(a\) weight 0"):
        MetaDatasetEpisodes(both, source_weights={"b": 1.0})
    tilted = MetaDatasetEpisodes(both, source_weights={"a": 3.0, "b": 1.0})
    share = sum(tilted.describe("train", i).source == "a" for i in range(2000)) / 2000
    assert 0.71 < share < 0.79


def test_meta_batch_holds_one_episode(family: MetaDatasetEpisodes) -> None:
    assert isinstance(family, TaskFamily)
    assert len(family.batch("test", [3])) == 1
    with pytest.raises(ValueError, match="one episode, got 2"):
        family.batch("test", [0, 1])
    with pytest.raises(KeyError, match="no source has a 'val' split"):
        family.for_source("small").describe("val", 0)
    with pytest.raises(ValueError, match="task index must be >= 0"):
        family.describe("test", -1)


def test_protonet_and_baseline_pp_evaluate_on_episodes() -> None:
    torch.manual_seed(0)
    images = {"s": {"test": dataset("C", [12] * 10, (1, 16, 16))},
              "t": {"test": dataset("D", [8] * 6, (1, 16, 16))}}
    fam = MetaDatasetEpisodes(images, seed=1)
    res = meta_test(ProtoNet(Conv4(in_channels=1, ways=0, hidden=8, image_size=16)), fam, "test", tasks=4,
                    steps=1)
    assert res.tasks == 4 and 0.0 <= res.per_step[1].mean <= 1.0 and math.isfinite(res.loss_per_step[0].mean)
    baseline = BaselinePP(Conv4(in_channels=1, ways=16, hidden=8, image_size=16))
    scores = baseline.evaluate(fam.batch("test", [2]), steps=2)
    assert scores["accuracy"].shape == (1, 3) and bool(torch.isfinite(scores["loss"]).all())


def test_protonet_meta_trains_on_one_episode_per_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    splits = {"train": dataset("C", [12] * 10, (1, 16, 16)), "val": dataset("V", [12] * 6, (1, 16, 16))}
    fam = MetaDatasetEpisodes({"s": splits}, seed=1)
    algorithm = ProtoNet(Conv4(in_channels=1, ways=0, hidden=8, image_size=16))
    cfg = TrainConfig(iterations=4, meta_batch_size=1, validate_every=2, val_tasks=3, log_every=2)
    result = meta_train(algorithm, fam, cfg, tmp_path / "run", progress=False)
    assert result.steps == 4 and 0.0 <= result.best_val <= 1.0
    with pytest.raises(ValueError, match="meta_batch_size = 1"):
        meta_train(algorithm, fam, TrainConfig(iterations=2, meta_batch_size=2, validate_every=2, val_tasks=2),
                   None, progress=False)


def test_load_sources_reads_image_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INNERLOOP_CACHE", str(tmp_path / "cache"))  # preprocessed arrays stay in tmp_path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for split, classes in (("train", 6), ("test", 5)):
        for c in range(classes):
            folder = tmp_path / "birds" / split / f"{split}{c}"
            folder.mkdir(parents=True)
            for j in range(3):
                Image.new("RGB", (10, 7), (40 * c, 20 * j, 5)).save(folder / f"{j}.png")
    loaded = load_sources({"birds": str(tmp_path / "birds")}, image_size=12)
    assert set(loaded["birds"]) == {"train", "test"}
    fam = MetaDatasetEpisodes(loaded, seed=0)
    task = fam.task("test", 0)
    assert task.support_x.shape[1:] == (3, 12, 12) and task.query_y.numel() == 5  # 5 ways, q = 1
    with pytest.raises(MissingDataError, match="give its folder"):
        load_sources(["my-birds"])


def test_load_sources_gives_omniglot_meta_datasets_alphabet_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import innerloop.data.metadataset as md
    from innerloop.data.omniglot import META_DATASET_VAL_ALPHABETS

    calls = []
    monkeypatch.setattr(md, "image_splits", lambda *args: calls.append(args) or {})
    md.load_sources(["omniglot"], image_size=28)
    assert calls == [("omniglot", None, "lake", 28, (("lake_val_alphabets", META_DATASET_VAL_ALPHABETS),))]
    assert len(META_DATASET_VAL_ALPHABETS) == 5 and "Tagalog" in META_DATASET_VAL_ALPHABETS
