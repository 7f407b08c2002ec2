"""ANIL on a frozen backbone: the body is fixed (``requires_grad_(False)``), only the head adapts in
the inner loop and is meta-learned in the outer loop.

A conv-4 (``innerloop.Conv4``: ``features`` then a linear ``head``) gets its backbone one of two ways:
``--backbone FILE`` loads a saved ``features`` state dict (read with ``torch.load(weights_only=True)``,
so the file cannot run code), or the script first meta-trains the whole network with ANIL for
``--pretrain-iterations`` on the train split (``--save-backbone FILE`` keeps that body). Then the
body is frozen, the head starts again from scratch, and ANIL meta-learns the head's initialisation
alone: the body gets no gradient, and since only the head adapts, the body runs once per task and
split (head-only adaptation, ``innerloop.split``) instead of once per inner step.

Data: Omniglot 5-way 1-shot when ``$INNERLOOP_DATA/omniglot`` holds its archives
(``images_background.zip``, ``images_evaluation.zip``; nothing is downloaded), else a synthetic
image family built here (:func:`synthetic_splits`: each class a random pattern of blobs, each image
a shifted, noisy copy), so that the example runs everywhere; ``--data`` chooses explicitly.

    python examples/anil_frozen_backbone.py                  # a few minutes on 2 CPU cores
    python examples/anil_frozen_backbone.py --data synthetic --pretrain-iterations 2 --iterations 2 \\
        --test-tasks 5 --width 8                             # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from innerloop import ANIL, Conv4, FewShotClassification, Omniglot, TrainConfig, meta_test, meta_train
from innerloop.data import ImageClassDataset
from innerloop.io import atomic_write_bytes

SIZE = 28


def synthetic_splits(classes: tuple[int, int, int] = (300, 60, 100), per_class: int = 20,
                     seed: int = 0) -> dict[str, ImageClassDataset]:
    """``{train, val, test}`` of synthetic 1x28x28 classes, disjoint between splits.

    A class is the sum of 4 Gaussian blobs at random places; each of its ``per_class`` images is that
    pattern shifted by up to 2 pixels, plus Gaussian noise, clipped to ``[0, 1]``. Images are stored
    as uint8 ``[classes * per_class, 1, 28, 28]``.
    """
    g = torch.Generator().manual_seed(seed)
    grid = torch.arange(SIZE, dtype=torch.float32)
    out = {}
    for split, n in zip(("train", "val", "test"), classes, strict=True):
        centres = 4 + (SIZE - 8) * torch.rand(n, 4, 2, generator=g)  # [classes, blobs, (row, col)]
        width = 1.5 + 2.0 * torch.rand(n, 4, 1, 1, generator=g)
        rows = (grid.view(1, 1, SIZE, 1) - centres[..., 0, None, None]) ** 2
        cols = (grid.view(1, 1, 1, SIZE) - centres[..., 1, None, None]) ** 2
        patterns = torch.exp(-(rows + cols) / (2 * width**2)).sum(1).clamp(max=1.0)  # [classes, 28, 28]
        images = patterns.repeat_interleave(per_class, 0)
        shifts = torch.randint(-2, 3, (len(images), 2, 1), generator=g)  # rolled by (rows, cols)
        r, c = ((torch.arange(SIZE) - shifts) % SIZE).unbind(1)  # source rows, columns: [images, 28] each
        images = images[torch.arange(len(images))[:, None, None], r[:, :, None], c[:, None, :]]
        images = (images + 0.15 * torch.randn(images.shape, generator=g)).clamp(0, 1)
        data = (255 * images).round().to(torch.uint8).unsqueeze(1)
        out[split] = ImageClassDataset(data, [per_class] * n, [f"{split}-{i}" for i in range(n)])
    return out


def omniglot_root() -> Path | None:
    """``$INNERLOOP_DATA/omniglot`` when it holds both archives, else ``None``."""
    base = os.environ.get("INNERLOOP_DATA")
    if not base:
        return None
    root = Path(base) / "omniglot"
    ok = all((root / f).is_file() for f in ("images_background.zip", "images_evaluation.zip"))
    return root if ok else None


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--data", choices=["auto", "omniglot", "synthetic"], default="auto",
                   help="auto: Omniglot when $INNERLOOP_DATA/omniglot has it, else synthetic images")
    p.add_argument("--backbone", type=Path, help="a saved features state dict (torch.save of a dict)")
    p.add_argument("--save-backbone", type=Path, help="where to keep the pre-trained body")
    p.add_argument("--pretrain-iterations", type=int, default=200, help="whole-network ANIL before freezing")
    p.add_argument("--iterations", type=int, default=100, help="head-only ANIL on the frozen body")
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=5, help="query images per class")
    p.add_argument("--width", type=int, default=32, help="conv-4 filters per block")
    p.add_argument("--inner-lr", type=float, default=0.5)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--test-tasks", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    root = omniglot_root()
    if args.data == "omniglot" and root is None:
        sys.exit("--data omniglot: no Omniglot archives in $INNERLOOP_DATA/omniglot "
                 f"(INNERLOOP_DATA={os.environ.get('INNERLOOP_DATA')!r}); set INNERLOOP_DATA to the folder "
                 "holding omniglot/images_background.zip and images_evaluation.zip, or use --data synthetic.")
    if args.backbone is not None and not args.backbone.is_file():
        sys.exit(f"--backbone {args.backbone}: no such file; give a state dict saved with --save-backbone.")
    if args.data != "synthetic" and root is not None:
        splits = Omniglot(root, download=False)
        print(f"data: Omniglot from {root} (vinyals split)")
    else:
        if args.data == "auto":
            print("data: no Omniglot under $INNERLOOP_DATA/omniglot, so synthetic images (set INNERLOOP_DATA "
                  "to use Omniglot)")
        splits = synthetic_splits(seed=args.seed)
        print(f"data: synthetic 1x28x28 classes ({', '.join(f'{s} {len(d)}' for s, d in splits.items())})")
    family = FewShotClassification(splits, ways=args.ways, shots=args.shots, queries=args.queries, seed=args.seed)

    def config(iterations: int) -> TrainConfig:
        return TrainConfig(iterations=iterations, meta_batch_size=args.meta_batch, outer_lr=1e-3,
                           validate_every=iterations, val_tasks=50, log_every=max(1, iterations // 10),
                           seed=args.seed)

    def score(algorithm: ANIL, label: str) -> None:
        k = args.inner_steps
        res = meta_test(algorithm, family, "test", tasks=args.test_tasks, steps=k)
        print(f"{label}: {args.ways}-way {args.shots}-shot accuracy on {args.test_tasks} test tasks after 0 / {k} "
              f"steps: {res.per_step[0]} / {res.per_step[k]}", flush=True)

    def anil(model: Conv4) -> ANIL:
        return ANIL(model, "classification", inner_lr=args.inner_lr, inner_steps=args.inner_steps)

    # 1. the backbone: loaded, or pre-trained here (the whole network, ANIL)
    model = Conv4(in_channels=1, ways=args.ways, hidden=args.width, image_size=SIZE)
    if args.backbone is not None:
        state = torch.load(args.backbone, map_location="cpu", weights_only=True)
        model.features.load_state_dict(state)
        print(f"backbone: loaded from {args.backbone}")
    else:
        whole = anil(model)
        result = meta_train(whole, family, config(args.pretrain_iterations), progress=False,
                            val_steps=args.inner_steps)
        print(f"backbone: the whole conv-4 meta-trained with ANIL, {args.pretrain_iterations} iterations in "
              f"{result.wall_time_s:.0f} s", flush=True)
        score(whole, "the whole network")
        if args.save_backbone is not None:
            state = {k: v.detach().clone() for k, v in model.features.state_dict().items()}
            atomic_write_bytes(args.save_backbone, lambda f: torch.save(state, f))
            print(f"backbone saved to {args.save_backbone}")

    # 2. freeze the body, start the head again, meta-learn the head alone
    model.features.requires_grad_(False)
    model.head.reset_parameters()
    body = {n: t.detach().clone() for n, t in model.features.named_parameters()}
    head_only = anil(model)
    grads, _ = head_only.meta_gradient(family.batch("train", range(2)))
    print(f"frozen body: {sum(t.numel() for t in body.values()):,} parameters; adapted and meta-learned: "
          f"{head_only.adapt_names} (meta-gradient keys {sorted(grads)}); body runs once per task and split: "
          f"{head_only.split is not None}")
    score(head_only, "frozen body, new head, before meta-training")
    t0 = time.perf_counter()
    result = meta_train(head_only, family, config(args.iterations), progress=False, val_steps=args.inner_steps)
    ms = 1000 * result.wall_time_s / max(1, args.iterations)
    print(f"head meta-trained {args.iterations} iterations in {time.perf_counter() - t0:.0f} s "
          f"({ms:.0f} ms per meta-iteration, validation included)")
    score(head_only, "frozen body, head meta-trained")
    unchanged = all(torch.equal(t, body[n]) for n, t in model.features.named_parameters())
    print(f"frozen body unchanged: {unchanged}")


if __name__ == "__main__":
    main()
