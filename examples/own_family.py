"""Your own task family: write the four members of ``innerloop.tasks.TaskFamily``, then any algorithm
meta-trains on it with ``meta_train`` and is scored with ``meta_test``.

The family here, :class:`NoisyBlobs`, is N-way K-shot classification of points: each class of a
task is a Gaussian blob around a centre drawn for that task in the plane, and every point carries
``noise_dims`` extra coordinates of pure noise (larger than the blobs' spread). Which classes sit
where changes from task to task (the learner finds it from the support set); that only the first
two coordinates ever matter is what the tasks share, and what meta-training learns: MAML an
initialisation that adapts in a few steps, Prototypical Networks an embedding that drops the noise.

    python examples/own_family.py                 # under a minute on 2 CPU cores
    python examples/own_family.py --iterations 2 --test-tasks 5    # a smoke run

The protocol (``innerloop.tasks.TaskFamily``) asks for ``objective`` (``"regression"`` or
``"classification"``), ``seed``, ``task(split, index) -> Task`` and ``batch(split, indices) ->
TaskBatch``; ``task`` must be a pure function of (seed, split, index), so that test tasks are the
same for every run and algorithm: ``innerloop.tasks.task_seed`` gives each one its own seed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from innerloop import MAML, MLP, ProtoNet, Task, TaskBatch, TrainConfig, meta_test, meta_train
from innerloop.tasks import Objective, Split, check_split, task_seed


class NoisyBlobs:
    """``ways``-way classification of points ``[2 + noise_dims]``: a Gaussian blob per class.

    Args:
        ways: classes per task.
        shots: support points per class.
        queries: query points per class.
        noise_dims: coordinates of pure noise after the two that carry the class.
        spread: standard deviation of a blob around its centre (centres are uniform in
            ``[-3, 3]^2``).
        noise_std: standard deviation of the noise coordinates.
        seed: the family seed.

    Shapes of :meth:`task`: ``support_x [ways * shots, 2 + noise_dims]`` float32, ``support_y
    [ways * shots]`` int64 in ``0..ways-1``; the query the same with ``queries``.
    """

    objective: Objective = "classification"

    def __init__(self, ways: int = 5, shots: int = 1, queries: int = 10, noise_dims: int = 8,
                 spread: float = 0.3, noise_std: float = 2.0, seed: int = 0) -> None:
        for name, value, low in (("ways", ways, 2), ("shots", shots, 1), ("queries", queries, 1),
                                 ("noise_dims", noise_dims, 0)):
            if value < low:
                raise ValueError(f"NoisyBlobs needs {name} >= {low}, got {value}.")
        if not (spread > 0 and noise_std >= 0):
            raise ValueError(f"NoisyBlobs needs spread > 0 and noise_std >= 0, got {spread} and {noise_std}.")
        self.ways, self.shots, self.queries, self.noise_dims = ways, shots, queries, noise_dims
        self.spread, self.noise_std = spread, noise_std
        self._seed = seed

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def dim(self) -> int:
        """Input size: 2 informative coordinates and the noise."""
        return 2 + self.noise_dims

    def _points(self, g: torch.Generator, centres: Tensor, per_class: int) -> tuple[Tensor, Tensor]:
        """``per_class`` points of each class: ``x [ways * per_class, dim]``, ``y [ways * per_class]``."""
        labels = torch.arange(self.ways).repeat_interleave(per_class)
        signal = centres[labels] + self.spread * torch.randn(len(labels), 2, generator=g)
        noise = self.noise_std * torch.randn(len(labels), self.noise_dims, generator=g)
        return torch.cat([signal, noise], dim=1), labels

    def task(self, split: Split, index: int) -> Task:
        """Task ``index`` of ``split``, the same on every call."""
        check_split(split)
        g = torch.Generator().manual_seed(task_seed(self.seed, split, int(index), "NoisyBlobs"))
        centres = 6 * torch.rand(self.ways, 2, generator=g) - 3  # [ways, 2], new for every task
        sx, sy = self._points(g, centres, self.shots)
        qx, qy = self._points(g, centres, self.queries)
        return Task(sx, sy, qx, qy)

    def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch:
        """Tasks ``indices`` of ``split`` stacked: ``x [len(indices), examples, dim]``."""
        return TaskBatch.stack([self.task(split, int(i)) for i in indices])


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=300, help="outer steps of each algorithm")
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--noise-dims", type=int, default=8)
    p.add_argument("--inner-lr", type=float, default=0.5, help="MAML's inner learning rate")
    p.add_argument("--inner-steps", type=int, default=3, help="MAML's inner steps (training and test)")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    family = NoisyBlobs(args.ways, args.shots, queries=10, noise_dims=args.noise_dims, seed=args.seed)
    one = family.task("train", 0)
    again = family.task("train", 0)
    assert torch.equal(one.support_x, again.support_x), "task(split, i) must be deterministic"
    print(f"family: {args.ways}-way {args.shots}-shot NoisyBlobs; a task's support {tuple(one.support_x.shape)}, "
          f"query {tuple(one.query_x.shape)}; task(split, i) is the same on every call")

    cfg = TrainConfig(iterations=args.iterations, meta_batch_size=args.meta_batch, outer_lr=3e-3,
                      validate_every=args.iterations, val_tasks=50, log_every=max(1, args.iterations // 10),
                      seed=args.seed)
    k = args.inner_steps
    algorithms = {
        "MAML (MLP 64-64)": MAML(MLP(family.dim, args.ways, (64, 64)), "classification", inner_lr=args.inner_lr,
                                 inner_steps=k),
        "ProtoNet (MLP embedding, 16-d)": ProtoNet(MLP(family.dim, 16, (64,))),
    }
    for name, algorithm in algorithms.items():
        steps = k if isinstance(algorithm, MAML) else 0  # a ProtoNet does not adapt by steps
        before = meta_test(algorithm, family, "test", tasks=args.test_tasks, steps=steps).per_step[steps]
        t0 = time.perf_counter()
        meta_train(algorithm, family, cfg, progress=False, val_steps=steps)
        wall = time.perf_counter() - t0
        after = meta_test(algorithm, family, "test", tasks=args.test_tasks, steps=steps).per_step[steps]
        print(f"{name}: accuracy on {args.test_tasks} test tasks" + (f" after {steps} steps" if steps else "")
              + f": {before} before meta-training, {after} after {args.iterations} iterations ({wall:.0f} s)")


if __name__ == "__main__":
    main()
