"""The conv-4 backbone, and MAML through it (BatchNorm with batch statistics)."""

from __future__ import annotations

import pytest
import torch

from innerloop.algorithms import MAML
from innerloop.execution import plan
from innerloop.models.conv4 import Conv4
from innerloop.tasks import TaskBatch


@pytest.mark.parametrize(("pool", "size", "hidden", "features"), [
    ("max", 28, 64, 64), ("stride", 28, 64, 256), ("max", 84, 32, 32 * 25),
])
def test_shapes(pool, size, hidden, features):
    net = Conv4(1, 5, hidden, size, pool)
    assert net.out_features == features
    assert net(torch.zeros(3, 1, size, size)).shape == (3, 5)
    assert Conv4(1, 0, hidden, size, pool)(torch.zeros(2, 1, size, size)).shape == (2, features)


def _images(tasks=3, ways=3, shots=1, queries=2, size=16):
    g = torch.Generator().manual_seed(0)
    return TaskBatch(
        torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone(),
        torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=torch.float64),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).clone(),
    )


def test_first_order_vmap_equals_loop_with_batchnorm():
    batch = _images()
    grads = {}
    for v in ("vmap", "loop"):
        torch.manual_seed(0)
        model = Conv4(1, 3, hidden=4, image_size=16).double()
        maml = MAML(model, "classification", inner_lr=0.4, inner_steps=1, first_order=True, vectorize=v)
        grads[v], _ = maml.meta_gradient(batch)
    for k in grads["loop"]:
        torch.testing.assert_close(grads["vmap"][k], grads["loop"][k], rtol=1e-9, atol=1e-12)


def test_second_order_vmap_through_batchnorm_is_refused():
    model = Conv4(1, 3, hidden=4, image_size=16).double()
    maml = MAML(model, "classification", inner_lr=0.4, inner_steps=1, vectorize="vmap")
    with pytest.raises(ValueError, match="wrong gradient in torch"):
        maml.meta_gradient(_images())
    auto = MAML(model, "classification", vectorize="auto")
    assert not plan(auto.execution, auto.model, _images(), second_order=True).vmap
