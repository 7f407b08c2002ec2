"""The real Omniglot archives (``$INNERLOOP_DATA/omniglot`` or ``../shared/data/omniglot``); skipped if absent.

The archives are preprocessed once per session into a pytest temporary folder (the shared data
folder is read-only); every test below reuses that cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from innerloop.data import FewShotClassification, Omniglot, task_loader

pytestmark = pytest.mark.slow  # several processes, real data or whole runs: skipped by `make test-quick`


@pytest.fixture(scope="session")
def vinyals(real_omniglot_root: Path, real_omniglot_cache: Path) -> Omniglot:
    return Omniglot(real_omniglot_root, "vinyals", cache_dir=real_omniglot_cache, download=False)


def _characters(names: list[str]) -> set[str]:
    return {n.rsplit("/", 1)[0] if "/rot" in n else n for n in names}


def test_all_characters(vinyals: Omniglot):
    chars = vinyals.characters
    assert chars.num_classes == 1623 and int(chars.counts.sum()) == 32460
    assert set(chars.counts.tolist()) == {20} and chars.image_shape == (1, 28, 28)
    assert len(set(chars.groups)) == 50 and len(vinyals.background_alphabets) == 30
    x = chars.images(0)
    assert float(x.min()) >= 0.0 and float(x.max()) == 1.0 and float(x.mean()) < 0.3  # ink = 1, sparse


def test_vinyals_class_counts(vinyals: Omniglot):
    assert {s: len(vinyals[s]) for s in vinyals} == {"train": 4112, "val": 688, "test": 1692}
    chars = {s: _characters(vinyals[s].names) for s in vinyals}
    assert [len(chars[s]) for s in ("train", "val", "test")] == [1028, 172, 423]
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"] or chars["val"] & chars["test"])


def test_lake_and_maml_splits(real_omniglot_root: Path, real_omniglot_cache: Path, vinyals: Omniglot):
    lake = Omniglot(real_omniglot_root, "lake", cache_dir=real_omniglot_cache, download=False)
    assert len(set(lake["val"].groups)) == 5 and len(set(lake["train"].groups)) == 25
    assert len(lake["train"]) + len(lake["val"]) == 964 and len(lake["test"]) == 659
    assert set(lake["test"].groups) == set(vinyals.characters.groups) - set(vinyals.background_alphabets)
    maml = Omniglot(real_omniglot_root, "maml", cache_dir=real_omniglot_cache, download=False)
    assert {s: len(maml[s]) for s in maml} == {"train": 4 * 1100, "val": 4 * 100, "test": 4 * 423}


def test_episodes_on_real_data(vinyals: Omniglot):
    family = FewShotClassification(vinyals, ways=20, shots=1, queries=5, seed=0, within_alphabet=True)
    task = family.task("test", 0)
    assert task.support_x.shape == (20, 1, 28, 28) and task.query_x.shape == (100, 1, 28, 28)
    classes = family.classes_of("test", 0)
    assert len({vinyals["test"].groups[c] for c in classes}) == 1
    batches = list(task_loader(family, "test", meta_batch_size=2, num_batches=2))
    assert torch.equal(batches[0].task(0).support_x, task.support_x)
    with pytest.raises(ValueError, match="the train split has only 4112"):
        FewShotClassification(vinyals, ways=5000, shots=1, queries=1)
    with pytest.raises(ValueError, match="has only 20; use shots \\+ queries <= 20"):
        FewShotClassification(vinyals, ways=5, shots=10, queries=11)
