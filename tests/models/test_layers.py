"""innerloop's BatchNorm2d is torch's: same values, gradients, second-order gradients, running
statistics and state dict, in either memory format (its channels-last path runs on the 2-D view)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import vmap

from innerloop.execution import to_channels_last
from innerloop.models.conv4 import Conv4
from innerloop.models.layers import BatchNorm2d, is_channels_last

pytestmark = pytest.mark.usefixtures("float64")


def _pair(**kwargs) -> tuple[nn.BatchNorm2d, BatchNorm2d]:
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6, **kwargs)
    ours = BatchNorm2d(6, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _derivatives(bn: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, first derivatives w.r.t. input and affine parameters, and a second derivative
    (what second-order MAML differentiates through)."""
    x = x.detach().requires_grad_()
    y = bn(x)
    target = torch.linspace(-1, 1, y.numel()).view_as(y)
    wrt = [x, *bn.parameters()]
    grads = torch.autograd.grad((y * target).sum() + (y**3).sum(), wrt, create_graph=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in grads), wrt)
    return [y.detach(), *[g.detach() for g in grads], *second]


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("track", [False, True])
def test_same_values_and_derivatives_as_torch(memory_format, track):
    ref, ours = _pair(track_running_stats=track)
    x = torch.randn(4, 6, 5, 7).contiguous(memory_format=memory_format)
    assert is_channels_last(x) == (memory_format == torch.channels_last)
    # float64; the 2-D kernel sums in another order (values up to ~30 here: rounding ~1e-12)
    for a, b in zip(_derivatives(ref, x), _derivatives(ours, x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    out, _ = ours(x), ref(x)  # one more training-mode call each
    assert out.is_contiguous(memory_format=memory_format)
    if track:  # running statistics updated alike (including the unbiased variance over N*H*W)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
        ref.eval()
        ours.eval()
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_state_dict_and_type_are_torchs():
    ref, ours = _pair()
    assert isinstance(ours, nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_under_vmap_it_equals_the_loop():
    _, ours = _pair(track_running_stats=False)
    xs = torch.randn(3, 4, 6, 5, 5)
    looped = torch.stack([ours(x.contiguous(memory_format=torch.channels_last)) for x in xs])
    torch.testing.assert_close(vmap(ours)(xs), looped, rtol=1e-12, atol=1e-12)


def test_wrong_rank_is_refused():
    _, ours = _pair()
    with pytest.raises(ValueError, match=r"4-D input \[N, C, H, W\], got shape \(4, 6, 5\)"):
        ours(torch.randn(4, 6, 5))


def test_one_channel_images_make_the_whole_network_channels_last():
    """Omniglot's 1-channel images: torch reads a ``contiguous(channels_last)`` copy of them as
    NCHW, and the first block would run the slow NCHW kernels; the layout step gives them
    explicit channels-last strides, so every block's output is channels-last."""
    images = torch.rand(5, 1, 16, 16)
    assert images.contiguous(memory_format=torch.channels_last).stride(1) != 1  # torch's no-op
    laid = to_channels_last({"x": images})["x"]
    assert laid.stride(1) == 1 and torch.equal(laid, images)
    model = Conv4(1, 3, 8, 16)
    weights = to_channels_last(dict(model.named_parameters()))
    x = laid
    for i, block in enumerate(list(model.features)[:4]):
        conv, *rest = block
        x = torch.nn.functional.conv2d(x, weights[f"features.{i}.0.weight"], conv.bias, padding=1)
        assert is_channels_last(x)
        for layer in rest:
            x = layer(x)
        assert is_channels_last(x), x.stride()


def test_float32_channels_last_is_as_accurate_as_nchw():
    """torch's channels-last BatchNorm sums in float32 sequentially; on an uncentred input (mean
    30x the std, as after a convolution) its output loses digits. innerloop's centres the input
    first (the same function): its float32 error stays near the NCHW kernel's."""
    torch.manual_seed(0)
    x64 = torch.randn(5, 64, 28, 28, dtype=torch.float64) * 0.1 + 3.0
    exact = torch.nn.functional.batch_norm(x64, None, None, training=True)
    x = x64.float().contiguous(memory_format=torch.channels_last)

    def error(y: torch.Tensor) -> float:
        return float((y.double() - exact).norm() / exact.norm())

    ours = error(BatchNorm2d(64, affine=False, track_running_stats=False, dtype=torch.float32)(x))
    nchw = error(torch.nn.functional.batch_norm(x64.float(), None, None, training=True))
    torch_cl = error(torch.nn.functional.batch_norm(x, None, None, training=True))
    assert ours < 3 * max(nchw, 1e-6), (ours, nchw)
    assert torch_cl > 5 * ours  # what the centring buys (torch 2.13's kernel)
