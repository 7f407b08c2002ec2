"""How long the new dataset loaders take, on synthetic archives of the real size.

    python benchmarks/loader_timing.py [--tiered-per-class 20] [--tmp /tmp]

For each dataset a synthetic copy in the official layout is built in a temporary folder (deleted
at the end, caches included), then timed: the first load (reading the archive or folder,
decoding, resizing, writing the preprocessed cache), a second load (from the cache), and one
meta-batch of four 5-way 5-shot tasks with 15 queries per class.

* CIFAR-100 (CIFAR-FS, FC100): ``cifar-100-binary.tar.gz`` with the real 60,000 records
  (``train.bin`` 153,700,000 bytes, ``test.bin`` 30,740,000 bytes) of random pixels; gzip level 1,
  so the archive is about as large as its contents (the real one: 168,513,733 bytes).
* CUB-200-2011: ``CUB_200_2011.tgz`` with the real 200 classes and 11,788 JPEGs of 500 x 375
  pixels (the typical CUB size); the JPEG bytes come from a pool of 64 distinct synthetic photos
  (smooth gradients plus noise, quality 90), each image still decoded and resized on its own.
* tieredImageNet: an ImageNet-layout folder ``train/<wnid>/*.JPEG`` with the real 608 classes but
  ``--tiered-per-class`` images each (the real train set has about 1,281 per class, 779,165 in
  the 608 classes), from the same pool. The table gives the measured time and, per image, the
  rate from which a full-size first load can be projected (stated as a projection).

Writes benchmarks/results/loader_timing.md and loader_timing.json (command, machine, load average).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from innerloop.data.cifar import ARCHIVE as CIFAR_ARCHIVE
from innerloop.data.cifar import cifar_fs, fc100
from innerloop.data.cub import ARCHIVE as CUB_ARCHIVE
from innerloop.data.cub import cub
from innerloop.data.images import ImageClassDataset
from innerloop.data.sampling import FewShotClassification
from innerloop.data.tiered import TieredImageNet, tiered_split
from innerloop.io import atomic_write_text

RESULTS = Path(__file__).parent / "results"
CUB_IMAGES = 11_788
TIERED_REAL_IMAGES = 779_165
POOL = 64


def photo_pool(rng: np.random.Generator, n: int = POOL, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    """``n`` distinct JPEGs of ``size`` (w, h): smooth colour gradients plus noise, quality 90."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([a * 255 * xx / w, b * 255 * yy / h, c * 255 * (xx + yy) / (w + h)], axis=-1)
        noisy = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_cifar(folder: Path, rng: np.random.Generator) -> int:
    folder.mkdir(parents=True)
    rows = (Path(__file__).parents[1] / "innerloop" / "data" / "splits" / "cifar100" / "classes.csv")
    pairs = [line.split(",") for line in rows.read_text().splitlines()[1:] if line]
    parent = {f: c for c, f in pairs}
    fine, coarse = sorted(parent), sorted(set(parent.values()))
    fine_to_coarse = np.array([coarse.index(parent[f]) for f in fine], dtype=np.uint8)
    with tarfile.open(folder / CIFAR_ARCHIVE, "w:gz", compresslevel=1) as tf:
        add(tf, "cifar-100-binary/fine_label_names.txt", ("\n".join(fine) + "\n").encode())
        add(tf, "cifar-100-binary/coarse_label_names.txt", ("\n".join(coarse) + "\n").encode())
        for part, per in (("train", 500), ("test", 100)):
            labels = np.repeat(np.arange(100, dtype=np.uint8), per)
            rng.shuffle(labels)
            rec = np.empty((len(labels), 3074), dtype=np.uint8)
            rec[:, 0], rec[:, 1] = fine_to_coarse[labels], labels
            rec[:, 2:] = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
            add(tf, f"cifar-100-binary/{part}.bin", rec.tobytes())
    return (folder / CIFAR_ARCHIVE).stat().st_size


def make_cub(folder: Path, pool: list[bytes]) -> int:
    folder.mkdir(parents=True)
    names = [line.strip() for s in ("train", "val", "test")
             for line in (Path(__file__).parents[1] / "innerloop" / "data" / "splits" / "cub" / f"{s}.txt")
             .read_text().splitlines() if line.strip()]
    names.sort()
    per = [CUB_IMAGES // 200 + (1 if i < CUB_IMAGES % 200 else 0) for i in range(200)]
    with tarfile.open(folder / CUB_ARCHIVE, "w:gz", compresslevel=6) as tf:
        add(tf, "CUB_200_2011/classes.txt", "".join(f"{i + 1} {n}\n" for i, n in enumerate(names)).encode())
        k = 0
        for name, n in zip(names, per, strict=True):
            for i in range(n):
                add(tf, f"CUB_200_2011/images/{name}/{name[4:]}_{i:04d}.jpg", pool[k % len(pool)])
                k += 1
    return (folder / CUB_ARCHIVE).stat().st_size


def make_tiered(folder: Path, pool: list[bytes], per_class: int) -> int:
    k, total = 0, 0
    for split in ("train", "val", "test"):
        for wnid, _ in tiered_split(split):
            d = folder / "train" / wnid
            d.mkdir(parents=True)
            for i in range(per_class):
                blob = pool[k % len(pool)]
                (d / f"{wnid}_{i}.JPEG").write_bytes(blob)
                k, total = k + 1, total + len(blob)
    return total


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def task_batch_seconds(splits: Mapping[str, ImageClassDataset]) -> float:
    fam = FewShotClassification({"train": splits["train"]}, ways=5, shots=5, queries=15, seed=0)
    fam.batch("train", range(4))  # warm-up
    _, s = timed(lambda: fam.batch("train", range(4, 8)))
    return s


def bench(name: str, load: Callable[[], Mapping[str, ImageClassDataset]], images: int, source_bytes: int,
          build_seconds: float, note: str) -> dict[str, Any]:
    splits, first = timed(lambda: {s: d for s, d in load().items()})
    _, second = timed(lambda: {s: d for s, d in load().items()})
    row = {
        "dataset": name, "images": images, "source_bytes": source_bytes, "synthesis_s": round(build_seconds, 2),
        "first_load_s": round(first, 2), "cached_load_s": round(second, 3),
        "task_batch_s": round(task_batch_seconds(splits), 4),
        "classes": {s: d.num_classes for s, d in splits.items()}, "note": note,
        "stored_shape": list(splits["train"].image_shape),
    }
    print(json.dumps(row), file=sys.stderr)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiered-per-class", type=int, default=20)
    p.add_argument("--tmp", default=None, help="where the temporary data goes (default: the system's)")
    args = p.parse_args()
    if args.tiered_per_class < 20:
        raise SystemExit("--tiered-per-class must be >= 20 (a 5-shot task with 15 queries needs 20 per class)")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="innerloop-loader-timing-") as tmp:
        base = Path(tmp)
        cache = base / "cache"
        size, s = timed(lambda: make_cifar(base / "cifar100", rng))
        rows.append(bench("CIFAR-FS", lambda: cifar_fs(base, cache_dir=cache, download=False), 60_000, size, s,
                          "first load reads the archive and writes the CIFAR-100 cache"))
        rows.append(bench("FC100", lambda: fc100(base, cache_dir=cache, download=False), 60_000, size, 0.0,
                          "same CIFAR-100 cache as CIFAR-FS: its first load is a cache hit"))
        pool = photo_pool(rng)
        size, s = timed(lambda: make_cub(base / "cub", pool))
        rows.append(bench("CUB-200-2011", lambda: cub(base, cache_dir=cache, download=False), CUB_IMAGES, size,
                          s, "11,788 JPEGs 500 x 375 -> 84 x 84"))
        shutil.rmtree(base / "cub")
        n = 608 * args.tiered_per_class
        size, s = timed(lambda: make_tiered(base / "tiered-imagenet", pool, args.tiered_per_class))
        tiered = base / "tiered-imagenet"
        row = bench("tieredImageNet", lambda: TieredImageNet(tiered, cache_dir=cache), n, size, s,
                    f"608 classes x {args.tiered_per_class} JPEGs 500 x 375 -> 84 x 84 (scaled down)")
        row["projected_full_first_load_s"] = round(row["first_load_s"] / n * TIERED_REAL_IMAGES)
        rows.append(row)
    out = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch_threads": 1},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "loader_timing.json", json.dumps(out, indent=1) + "\n")
    lines = [
        "# Dataset loader timing (synthetic archives of the real size)", "",
        f"Command: `{out['command']}`  ", f"Machine: {out['machine']}  ",
        f"Load average (1, 5, 15 min) before: {out['load_average_before']}, after: {out['load_average_after']} "
        "(other jobs shared the machine; times are wall clock).", "",
        "| dataset | images | source MB | first load (s) | cached load (s) | 4 tasks 5-way 5-shot 15q (s) "
        "| classes | note |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        cls = "/".join(str(v) for v in r["classes"].values())
        lines.append(f"| {r['dataset']} | {r['images']} | {r['source_bytes'] / 1e6:.0f} | {r['first_load_s']} | "
                     f"{r['cached_load_s']} | {r['task_batch_s']} | {cls} | {r['note']} |")
    t = rows[-1]
    lines += ["", f"tieredImageNet at full size (779,165 images) would take about "
              f"{t['projected_full_first_load_s']} s for its first load: a projection from the measured "
              "per-image rate, not a measurement.", ""]
    atomic_write_text(RESULTS / "loader_timing.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
