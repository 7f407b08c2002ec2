"""WRN-28-10: shapes and names, every algorithm through a small WRN (depth 10, widen 1), vmap == loop
(first order, BatchNorm), checkpointed == stored second-order steps (float64)."""

from __future__ import annotations

import pytest
import torch
from backbone_checks import (
    assert_checkpointed_equals_stored,
    assert_first_order_vmap_equals_loop,
    one_meta_gradient,
)

from innerloop.algorithms import ALGORITHMS
from innerloop.models import WRN28_10


def test_wrn_28_10_shapes_and_layout():
    net = WRN28_10(3, 5)
    assert net.out_features == 640 and net(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    assert len(net.features.block1.layer) == 4  # (28 - 4) / 6 blocks per group
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 25  # the stem and two per block (3 groups of 4)
    names = [n for n, _ in net.named_parameters()]
    assert names[:3] == ["features.conv1.weight", "features.block1.layer.0.bn1.weight",
                         "features.block1.layer.0.bn1.bias"]
    assert "features.block2.layer.0.convShortcut.weight" in names and names[-2:] == ["head.weight", "head.bias"]


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (84, 3)])
def test_small_wrn_shapes_at_28_and_84_pixels(size, channels):
    body = WRN28_10(channels, 0, depth=10, widen=2)
    assert body(torch.zeros(2, channels, size, size)).shape == (2, 128)
    assert WRN28_10(channels, 4, depth=16, widen=1)(torch.zeros(2, channels, size, size)).shape == (2, 4)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"depth must be 6 n \+ 4.*got 12"):
        WRN28_10(depth=12)
    with pytest.raises(ValueError, match="widen must be an integer >= 1, got 0"):
        WRN28_10(widen=0)
    with pytest.raises(ValueError, match=r"drop_rate must lie in \[0, 1\)"):
        WRN28_10(drop_rate=-0.1)


def test_dropout_is_off_in_eval_mode():
    net = WRN28_10(1, 3, depth=10, widen=1, drop_rate=0.3)
    x = torch.rand(3, 1, 16, 16)
    torch.manual_seed(0)
    a = net(x)
    assert not torch.equal(a, net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_takes_a_meta_gradient_through_a_small_wrn(name):
    one_meta_gradient(name, lambda ways: WRN28_10(1, ways, depth=10, widen=1, drop_rate=0.1))


@pytest.mark.usefixtures("float64")
def test_first_order_vmap_equals_loop_with_batchnorm():
    assert_first_order_vmap_equals_loop(lambda: WRN28_10(1, 3, depth=10, widen=1))


@pytest.mark.usefixtures("float64")
def test_checkpointed_inner_loop_gives_the_same_meta_gradient():
    assert_checkpointed_equals_stored(lambda: WRN28_10(1, 3, depth=10, widen=1, drop_rate=0.2), inner_steps=2)
