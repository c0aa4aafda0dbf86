"""The fused convolution, pooling and ReLU kernel: the same values and gradients as torch's operations, and
torch's operations wherever the kernel cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepdigits import fused
from deepdigits.models import FusedSequential, MaxPoolReLU, PooledReLU, build_model

pytestmark = pytest.mark.skipif(fused.library() is None, reason="no C compiler here to build the fused kernel")


def _layers(channels: int = 32, seed: int = 0) -> tuple[nn.Conv2d, PooledReLU, MaxPoolReLU]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(1, channels, 3).to(memory_format=torch.channels_last)
    return conv, PooledReLU(), MaxPoolReLU(2)


def _torch_way(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(F.max_pool2d(conv(x), 2))


def _images(mnist, n: int = 64, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(mnist.x_train[:n]).float().div(255).view(n, 1, 28, 28).to(dtype)


def _gradients(conv: nn.Conv2d, y: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conv.zero_grad(set_to_none=True)
    y.backward(grad)
    return conv.weight.grad.clone(), conv.bias.grad.clone()


def test_bfloat16_autocast_forward_is_torchs_bit_for_bit(mnist):
    conv, _, _ = _layers()
    x = _images(mnist, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _torch_way(conv, x)
        got = fused.conv_pool_relu(conv, x)
    assert got.shape == (64, 32, 13, 13) and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)


def test_float32_forward_and_gradients_match_torch(mnist):
    conv, _, _ = _layers()
    x = _images(mnist)
    expected = _torch_way(conv, x)
    grad = torch.randn_like(expected)
    weight_grad, bias_grad = _gradients(conv, expected, grad)
    got = fused.conv_pool_relu(conv, x)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-6)
    got_weight, got_bias = _gradients(conv, got, grad)
    assert got_weight.shape == (32, 1, 3, 3) and got_bias.shape == (32,)
    assert torch.allclose(got_weight, weight_grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(got_bias, bias_grad, rtol=1e-4, atol=1e-4)


def test_ties_go_to_the_first_of_the_window_as_in_torchs_max_pooling():
    # Integer images and kernels: every sum is exact, so windows tie often, with different patches under them.
    # Had the kernel picked another of the tied outputs, the kernel's gradient would differ by whole units.
    torch.manual_seed(1)
    conv, _, _ = _layers(16)
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape).float())
        conv.bias.copy_(torch.randint(-1, 2, conv.bias.shape).float())
    x = torch.randint(0, 2, (32, 1, 10, 10)).float()
    expected = _torch_way(conv, x)
    conv_out = conv(x).detach()
    windows = conv_out.unfold(2, 2, 2).unfold(3, 2, 2).reshape(32, 16, 4, 4, 4)
    ties = (windows == windows.amax(-1, keepdim=True)).sum(-1) > 1
    assert ties.float().mean() > 0.2  # the test is about ties: many windows have them
    grad = torch.randint(1, 5, expected.shape).float()
    weight_grad, bias_grad = _gradients(conv, expected, grad)
    got = fused.conv_pool_relu(conv, x)
    assert torch.equal(got, expected)
    got_weight, got_bias = _gradients(conv, got, grad)
    assert torch.equal(got_weight, weight_grad) and torch.equal(got_bias, bias_grad)


def test_bfloat16_gradients_agree_with_torchs_to_bfloat16_precision(mnist):
    conv, _, _ = _layers()
    x = _images(mnist, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _torch_way(conv, x)
    grad = torch.randn_like(expected)
    weight_grad, bias_grad = _gradients(conv, expected, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused.conv_pool_relu(conv, x)
    got_weight, got_bias = _gradients(conv, got, grad)
    assert got_weight.dtype == torch.float32
    assert (got_weight - weight_grad).norm() / weight_grad.norm() < 1e-2
    assert (got_bias - bias_grad).norm() / bias_grad.norm() < 1e-2


def test_tutorial_003_runs_fused_with_torchs_outputs_and_names(mnist):
    net = build_model("tutorial-003", seed=0).to(memory_format=torch.channels_last)
    assert isinstance(net, FusedSequential)
    plain = nn.Sequential(*net)
    assert list(net.state_dict()) == list(plain.state_dict())
    x = _images(mnist, 16)
    assert fused.can_fuse(*list(net)[:3], x)
    net.eval()
    assert torch.allclose(net(x), plain(x), atol=1e-5)


@pytest.mark.parametrize("change", ["three channels", "padding", "stride", "plain pooling", "pool of 3",
                                    "bfloat16 without autocast", "float64"])
def test_anything_else_takes_torchs_operations(change):
    conv, relu, pool = _layers()
    x = torch.rand(4, 1, 28, 28)
    assert fused.can_fuse(conv, relu, pool, x)
    if change == "three channels":
        conv, x = nn.Conv2d(3, 32, 3), torch.rand(4, 3, 28, 28)
    elif change == "padding":
        conv = nn.Conv2d(1, 32, 3, padding=1)
    elif change == "stride":
        conv = nn.Conv2d(1, 32, 3, stride=2)
    elif change == "plain pooling":
        pool = nn.MaxPool2d(2)
    elif change == "pool of 3":
        pool = MaxPoolReLU(3)
    elif change == "bfloat16 without autocast":
        x = x.to(torch.bfloat16)
    elif change == "float64":
        x = x.double()
    assert not fused.can_fuse(conv, relu, pool, x)


def test_disabled_or_unbuildable_means_torchs_operations_and_no_file_left(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(fused.DISABLE, "0")
    assert fused.library.__wrapped__() is None
    monkeypatch.delenv(fused.DISABLE)
    monkeypatch.setenv("CC", "false")  # a compiler that fails every build
    assert fused.library.__wrapped__() is None
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_built_once_then_loaded_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fused.library.__wrapped__() is not None
    (built,) = (tmp_path / "deepdigits" / "kernels").iterdir()  # no scratch left behind
    assert built == fused.library_path(fused._compiler())
    stamp = built.stat().st_mtime_ns
    assert fused.library.__wrapped__() is not None and built.stat().st_mtime_ns == stamp


def test_a_broken_cached_library_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = fused.library_path(fused._compiler())
    target.parent.mkdir(parents=True)
    target.write_bytes(b"half a library")
    assert fused.library.__wrapped__() is not None
    assert target.stat().st_size > 1000


def test_tutorial_003_learns_with_the_fused_kernel(mnist, monkeypatch):
    from deepdigits import Classifier

    calls = []
    monkeypatch.setattr(fused, "conv_pool_relu", lambda conv, x: calls.append(len(x)) or fused._ConvPoolReLU.apply(
        x, conv.weight, conv.bias, x.dtype == torch.bfloat16 or fused._bf16_autocast()))
    clf = Classifier("tutorial-003", seed=0)
    clf.fit(mnist.x_train[:3000], mnist.y_train[:3000], epochs=3, batch_size=64, verbose=0)
    assert sum(calls) == 3 * 3000  # every training image of every epoch went through the kernel
    assert clf.score(mnist.x_test[:1000], mnist.y_test[:1000]) > 0.9  # 0.917 here, 0.918 in torch's kernels
