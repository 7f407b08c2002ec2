"""Your own model, meta-trained with MAML through the public API: a plain ``nn.Module`` with stock
``nn.BatchNorm1d`` layers and a frozen layer, nothing innerloop-specific in it.

:class:`FourierNet` maps ``x [batch, 1]`` through a frozen layer of random Fourier features
(``requires_grad_(False)``: neither adapted nor meta-learned, it gets no gradient) into an MLP whose
hidden layers are ``Linear -> nn.BatchNorm1d -> ReLU``, and a linear head. MAML meta-learns its
initialisation on the MAML paper's sinusoid tasks (``innerloop.Sinusoid``) with ``meta_train`` and
scores it with ``meta_test`` on fixed test tasks. The BatchNorm layers are called under the
declared policy ``batch_norm`` (``"batch"``: batch statistics in every forward, the running
buffers untouched; ``"running"``: running statistics accumulated from the adapted networks and
used at test time).

    python examples/own_model.py                           # a few minutes on 2 CPU cores
    python examples/own_model.py --batch-norm running
    python examples/own_model.py --iterations 2 --test-tasks 5   # a smoke run
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn

from innerloop import MAML, Sinusoid, TrainConfig, meta_test, meta_train


class FourierNet(nn.Module):
    """``[batch, 1] -> [batch, 1]``: frozen random Fourier features, a BatchNorm MLP, a linear head.

    Args:
        features: random frequencies; the frozen layer outputs ``sin`` and ``cos`` of each
            (``2 * features`` values).
        hidden: width of the two hidden layers.
        scale: standard deviation of the frequencies (the inputs span ``[-5, 5]``).
        seed: seeds the frozen frequencies and phases.

    Parameters: ``fourier.weight [features, 1]``, ``fourier.bias [features]`` (frozen);
    ``body.0`` / ``body.3`` Linear, ``body.1`` / ``body.4`` BatchNorm1d; ``head.weight [1, hidden]``.
    """

    def __init__(self, features: int = 32, hidden: int = 40, scale: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fourier = nn.Linear(1, features)
        with torch.no_grad():
            self.fourier.weight.copy_(scale * torch.randn(features, 1, generator=g))
            self.fourier.bias.copy_(2 * math.pi * torch.rand(features, generator=g))
        self.fourier.requires_grad_(False)  # frozen: a fixed feature map
        self.body = nn.Sequential(
            nn.Linear(2 * features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x [batch, 1] -> [batch, 1]``."""
        z = self.fourier(x)
        out: Tensor = self.head(self.body(torch.cat([torch.sin(z), torch.cos(z)], dim=-1)))
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=1000, help="outer steps (meta-batches of 25 tasks)")
    p.add_argument("--batch-norm", choices=["batch", "running"], default="batch")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    model = FourierNet(seed=args.seed)
    frozen = {n: t.detach().clone() for n, t in model.named_parameters() if not t.requires_grad}
    buffers = {n: t.clone() for n, t in model.named_buffers()}
    maml = MAML(model, "regression", inner_lr=args.inner_lr, inner_steps=1, batch_norm=args.batch_norm)
    total = sum(t.numel() for t in model.parameters())
    print(f"FourierNet: {total:,} parameters, {total - sum(t.numel() for t in frozen.values()):,} meta-learned; "
          f"frozen: {sorted(frozen)}; adapted in the inner loop: {len(maml.adapt_names)} tensors; "
          f"batch_norm = {args.batch_norm!r}")

    family = Sinusoid(shots=args.shots, queries=args.shots, seed=args.seed)
    test_family = Sinusoid(shots=args.shots, queries=100, seed=args.seed)  # the same test tasks, more queries
    grads, _ = maml.meta_gradient(family.batch("train", range(4)))
    print(f"a meta-gradient has {len(grads)} entries, none for the frozen layer: "
          f"{not any(k.removeprefix('model.') in frozen for k in grads)}")

    def score(label: str) -> None:
        res = meta_test(maml, test_family, "test", tasks=args.test_tasks, steps=10)
        print(f"{label}: {args.shots}-shot MSE on {args.test_tasks} test tasks after 0 / 1 / 10 steps: "
              f"{res.per_step[0]} / {res.per_step[1]} / {res.per_step[10]}")

    score("before meta-training")
    cfg = TrainConfig(iterations=args.iterations, meta_batch_size=25, outer_lr=1e-3,
                      validate_every=args.iterations, val_tasks=100, log_every=max(1, args.iterations // 10),
                      seed=args.seed)
    result = meta_train(maml, family, cfg, progress=False)
    print(f"meta-trained {args.iterations} iterations in {result.wall_time_s:.0f} s "
          f"({1000 * result.wall_time_s / args.iterations:.1f} ms each, validation included)")
    score("after meta-training")
    unchanged = all(torch.equal(t, frozen[n]) for n, t in model.named_parameters() if n in frozen)
    written = sorted(n for n, t in model.named_buffers() if not torch.equal(t, buffers[n]))
    print(f"frozen layer unchanged: {unchanged}; BatchNorm buffers written: {written or 'none'}")


if __name__ == "__main__":
    main()
