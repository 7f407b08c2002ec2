"""ResNet-12 (MetaOptNet / FEAT layout) and its DropBlock: shapes, names, every algorithm through
it, vmap == loop (first order), MAML's second-order meta-gradient against finite differences
(float64), checkpointed == stored inner steps, and the BatchNorm policies."""

from __future__ import annotations

import pytest
import torch
from backbone_checks import (
    assert_checkpointed_equals_stored,
    assert_first_order_vmap_equals_loop,
    image_batch,
    one_meta_gradient,
)
from torch.func import vmap

from innerloop.algorithms import ALGORITHMS, ANIL, MAML
from innerloop.execution import computed_ops, plan
from innerloop.models import DropBlock, Dropout, ResNet12

TINY = (4, 4, 4, 4)


@pytest.mark.parametrize(("size", "channels", "avg_pool", "features"), [
    (28, 1, True, 640), (28, 1, False, 640), (84, 3, True, 640), (84, 3, False, 640 * 5 * 5),
])
def test_shapes_at_28_and_84_pixels(size, channels, avg_pool, features):
    net = ResNet12(channels, 5, image_size=size, avg_pool=avg_pool)
    assert net.out_features == features
    assert net(torch.zeros(2, channels, size, size)).shape == (2, 5)
    body = ResNet12(channels, 0, image_size=size, avg_pool=avg_pool)
    assert body.head is None and body(torch.zeros(2, channels, size, size)).shape == (2, features)


def test_the_layout_is_metaoptnets():
    net = ResNet12(3, 0, drop_rate=0.1)
    names = [n for n, _ in net.named_parameters()]
    block = ["conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias", "conv3.weight",
             "bn3.weight", "bn3.bias", "downsample.0.weight", "downsample.1.weight", "downsample.1.bias"]
    assert names == [f"features.layer{i}.0.{b}" for i in range(1, 5) for b in block]
    widths = [net.get_submodule(f"features.layer{i}.0.conv3").out_channels for i in range(1, 5)]
    assert widths == [64, 160, 320, 640]
    drops = [type(net.get_submodule(f"features.layer{i}.0.drop")) for i in range(1, 5)]
    assert drops == [Dropout, Dropout, DropBlock, DropBlock]
    assert not any(m.bias is not None for m in net.modules() if isinstance(m, torch.nn.Conv2d))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"widths must be four integers >= 1.*\(8, 8\)"):
        ResNet12(widths=(8, 8))
    with pytest.raises(ValueError, match=r"image_size 8 is too small"):
        ResNet12(image_size=8)
    with pytest.raises(ValueError, match=r"drop_rate must lie in \[0, 1\), got 1.5"):
        ResNet12(drop_rate=1.5)
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        ResNet12(norm="layer")
    with pytest.raises(ValueError, match="dropblock_size must be an integer >= 1, got 0"):
        ResNet12(dropblock_size=0)


# -- DropBlock --------------------------------------------------------------------------------------------
def test_dropblock_drops_whole_blocks_at_about_the_rate_and_rescales():
    torch.manual_seed(0)
    layer = DropBlock(0.2, 3)
    x = torch.ones(64, 4, 10, 10)
    y = layer(x)
    kept = y != 0
    assert abs(1 - float(kept.double().mean()) - 0.2) < 0.03  # about drop_rate of the elements
    torch.testing.assert_close(y.mean(), torch.tensor(1.0))  # rescaled by elements / kept
    # every dropped element lies in a dropped 3x3 square
    dropped = (~kept).double()
    seeds = -torch.nn.functional.max_pool2d(-dropped, 3, 1)  # erosion: where a whole square is dropped
    opened = torch.nn.functional.max_pool2d(torch.nn.functional.pad(seeds, (2, 2, 2, 2)), 3, 1)
    assert torch.equal(opened, dropped)


def test_dropblock_is_off_in_eval_mode_and_follows_the_seed():
    layer = DropBlock(0.3, 2)
    x = torch.rand(2, 3, 6, 6)
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), a) and not torch.equal(a, x)
    layer.eval()
    assert layer(x) is x
    net = ResNet12(1, 3, TINY, 16, drop_rate=0.5).eval()
    xs = torch.rand(3, 1, 16, 16)
    assert torch.equal(net(xs), net(xs))


def test_a_map_smaller_than_the_block_drops_as_one_block():
    torch.manual_seed(0)
    y = DropBlock(0.5, 5)(torch.ones(400, 1, 2, 2))
    per_map = (y != 0).flatten(1).float().sum(1)
    assert set(per_map.tolist()) <= {0.0, 4.0} and 0 < int((per_map == 0).sum()) < 400


def test_drop_rate_zero_draws_no_random_numbers():
    ops = computed_ops(ResNet12(1, 3, TINY, 16), torch.Size([4, 1, 16, 16]))
    assert ops is not None and not any("rand" in o or "bernoulli" in o for o in ops)
    ops = computed_ops(ResNet12(1, 3, TINY, 16, drop_rate=0.1), torch.Size([4, 1, 16, 16]))
    assert ops is not None and any("rand" in o or "bernoulli" in o for o in ops)


def test_under_vmap_dropblock_refuses_with_the_way_out():
    net = ResNet12(1, 3, TINY, 16, drop_rate=0.1)
    with pytest.raises(ValueError, match=r"vmap over tasks refuses.*vectorize='auto'\) or 'loop'"):
        vmap(net)(torch.rand(2, 3, 1, 16, 16))
    maml = MAML(net, "classification", first_order=True, inner_steps=1, vectorize="vmap")
    with pytest.raises(ValueError, match="draws a random mask in training"):
        maml.meta_gradient(image_batch())
    net.eval()  # no random op in eval mode: vmap runs
    assert vmap(net)(torch.rand(2, 3, 1, 16, 16)).shape == (2, 3, 3)


# -- every algorithm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_takes_a_meta_gradient_through_resnet12(name):
    one_meta_gradient(name, lambda ways: ResNet12(1, ways, (8, 8, 8, 8), 16, drop_rate=0.1, dropblock_size=2))


def test_anil_runs_the_body_once_per_split():
    anil = ANIL(ResNet12(1, 3, TINY, 16), "classification", inner_steps=2)
    assert anil.split is not None and anil.split.prefix == "head"
    anil.meta_gradient(image_batch())
    assert anil.split._ok is True  # the capture held: head(features) is the model's output


# -- the execution layer, float64 -----------------------------------------------------------------------------
@pytest.mark.usefixtures("float64")
def test_first_order_vmap_equals_loop_with_batchnorm():
    assert_first_order_vmap_equals_loop(lambda: ResNet12(1, 3, TINY, 16))


def test_second_order_vmap_through_batchnorm_is_refused():
    maml = MAML(ResNet12(1, 3, TINY, 16), "classification", inner_steps=1, vectorize="vmap")
    with pytest.raises(ValueError, match="wrong gradient in torch"):
        maml.meta_gradient(image_batch())
    auto = MAML(ResNet12(1, 3, TINY, 16), "classification")
    assert not plan(auto.execution, auto.model, image_batch(), second_order=True).vmap


def _directional_check(maml: MAML, batch) -> None:
    """The meta-gradient's derivative along a random direction equals the central difference of the
    meta-loss (the query loss after the inner steps), in float64."""
    def run():
        return maml.meta_gradient(batch)

    grads, _ = run()
    params = dict(maml.named_parameters())
    assert set(params) == set(grads)
    g = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    analytic = sum(float((grads[n] * direction[n]).sum()) for n in params)
    eps = 1e-6

    def meta_loss(sign: float) -> float:
        with torch.no_grad():
            for n, p in params.items():
                p.add_(sign * eps * direction[n])
        _, metrics = run()
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(sign * eps * direction[n])
        return metrics["loss"]

    numeric = (meta_loss(1.0) - meta_loss(-1.0)) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert abs(numeric - analytic) <= 1e-6 * abs(analytic), (numeric, analytic)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_maml_matches_finite_differences(steps):
    torch.manual_seed(0)
    maml = MAML(ResNet12(1, 3, TINY, 16), "classification", inner_lr=0.1, inner_steps=steps)
    _directional_check(maml, image_batch(1, dtype=torch.float64))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_checkpointed_inner_loop_gives_the_same_meta_gradient(drop_rate):
    """Checkpointed second-order steps recompute each step in the outer backward; with dropout and
    DropBlock on, torch.utils.checkpoint restores the generator, so the recomputed masks are the ones
    drawn, and the meta-gradient is the stored loop's."""
    assert_checkpointed_equals_stored(
        lambda: ResNet12(1, 3, TINY, 16, drop_rate=drop_rate, dropblock_size=2), inner_steps=3
    )


@pytest.mark.parametrize("policy", ["running", "per_step"])
def test_running_statistics_policies(policy):
    torch.manual_seed(0)
    net = ResNet12(1, 3, TINY, 16, track_running_stats=True)
    cls = ALGORITHMS["mamlpp" if policy == "per_step" else "maml"]
    algorithm = cls.build(net, "classification", cls.options({"batch_norm": policy, "inner_steps": 2}))
    before = net.features.layer1[0].bn1.running_mean.clone()
    algorithm.meta_gradient(image_batch())
    algorithm.eval()
    scores = algorithm.evaluate(image_batch(seed=1), 2)
    assert bool(torch.isfinite(scores["loss"]).all())
    if policy == "running":
        assert not torch.equal(net.features.layer1[0].bn1.running_mean, before)
