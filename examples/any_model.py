"""Your own network on innerloop, as a new user writes it: stock BatchNorm, frozen parameters, a head
that adapts alone, a custom loss, a float64 model and a device, through the public API only.

    python examples/any_model.py

Each part prints what happened; nothing here is innerloop-specific model code.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import innerloop
from innerloop import MAML, TaskBatch, custom_objective, meta_test


def stock_cnn(ways: int = 5, width: int = 32) -> nn.Module:
    """A CNN as users write it: stock layers, BatchNorm with running statistics (torch's default)."""
    blocks: list[nn.Module] = []
    cin = 1
    for _ in range(3):
        blocks += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        cin = width
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(width * 3 * 3, ways))


def image_tasks(tasks: int = 4, ways: int = 5, shots: int = 1, queries: int = 5, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(tasks, ways * shots, 1, 28, 28, generator=g) + 1.0,
                     torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone(),
                     torch.randn(tasks, ways * queries, 1, 28, 28, generator=g) + 1.0,
                     torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone())


def main() -> None:
    torch.manual_seed(0)
    batch = image_tasks()

    print("1. stock nn.BatchNorm2d")
    for threads in (1, 2):
        model = stock_cnn()
        before = {k: v.clone() for k, v in model.named_buffers()}
        MAML(model, "classification", inner_lr=0.4, task_threads=threads).meta_gradient(batch)
        written = [k for k, v in model.named_buffers() if not torch.equal(v, before[k])]
        print(f"   batch_norm='batch', task_threads={threads}: ran; buffers written: {written or 'none'}")
    model = stock_cnn()
    running = MAML(model, "classification", inner_lr=0.4, batch_norm="running")
    running.meta_gradient(batch)
    print(f"   batch_norm='running': num_batches_tracked = {int(model[1].num_batches_tracked)} after one "
          "meta-batch; meta_test (eval mode) normalises with these running statistics")

    print("2. frozen parameters: a frozen body, a meta-learned head")
    model = stock_cnn()
    for p in model[:-1].parameters():
        p.requires_grad_(False)
    probe = MAML(model, "classification", inner_lr=0.4, inner_steps=3)
    grads, metrics = probe.meta_gradient(batch)
    print(f"   adapted: {probe.adapt_names}; meta-gradient keys: {sorted(grads)}; loss {metrics['loss']:.3f}")

    print("3. head-only adaptation: the body runs once per task")
    model = stock_cnn(width=64)
    times = {}
    for reuse in (True, False):
        alg = MAML(model, "classification", inner_lr=0.4, inner_steps=5, adapt=["13.*"], reuse_features=reuse,
                   task_threads=1)
        alg.meta_gradient(batch)  # warm-up
        t0 = time.perf_counter()
        for _ in range(3):
            alg.meta_gradient(batch)
        times[reuse] = (time.perf_counter() - t0) / 3
    print(f"   adapt=['13.*'] (the Linear head), 5 steps: {times[True] * 1e3:.0f} ms per meta-batch; with full "
          f"forwards (reuse_features=False) {times[False] * 1e3:.0f} ms ({times[False] / times[True]:.1f}x)")

    print("4. a custom loss, shape checks, float64")
    fam = innerloop.Sinusoid(shots=5, queries=5)
    reg = fam.batch("train", range(4))
    mae = custom_objective(lambda p, y: (p - y).abs().mean(), kind="regression", metric_name="mae")
    l1 = MAML(innerloop.MLP(1, 1, (40, 40)), mae, inner_lr=0.01)
    print(f"   L1 loss: metrics {l1.meta_gradient(reg)[1]}")
    flat = TaskBatch(reg.support_x, reg.support_y[..., 0], reg.query_x, reg.query_y[..., 0])
    try:
        MAML(innerloop.MLP(1, 1), "regression").meta_gradient(flat)
    except ValueError as err:
        print(f"   1-D targets: ValueError: {err}")
    double = MAML(innerloop.MLP(1, 1).double(), "regression", inner_lr=0.01)
    g64, _ = double.meta_gradient(reg)
    print(f"   float64 model on the float32 family: meta-gradient dtype {next(iter(g64.values())).dtype}")
    ce = custom_objective(lambda lg, y: F.cross_entropy(lg, y, label_smoothing=0.1),
                          lambda lg, y: (lg.argmax(-1) == y).float().mean(), kind="classification",
                          metric_name="acc", higher_is_better=True)
    print(f"   label smoothing on images: {MAML(stock_cnn(), ce, inner_lr=0.4).meta_gradient(batch)[1]}")

    print("5. devices")
    alg = MAML(innerloop.MLP(1, 1), "regression", device="auto")
    print(f"   device='auto' here: {innerloop.execution.resolve_device(alg.execution.device)}")
    try:
        innerloop.execution.resolve_device("cuda:3")
    except ValueError as err:
        print(f"   device='cuda:3': ValueError: {err}")
    result = meta_test(alg, fam, "test", tasks=50, steps=1)
    print(f"   meta_test on {result.tasks} tasks: mse after 1 step {result.per_step[1]}")


if __name__ == "__main__":
    main()
