"""The fused convolution, pooling and ReLU kernel: the same values and gradients as torch's operations, and
torch's operations wherever the kernel cannot be built."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepdigits import fused, liverows, train
from deepdigits.device import native_bf16
from deepdigits.models import FusedSequential, MaxPoolReLU, PooledReLU, build_model


@pytest.fixture(autouse=True)
def _kernels_built():
    """Built inside the test (into the isolated cache conftest sets up), not at collection into the user's."""
    if fused.library() is None:
        pytest.skip("no C compiler here to build the fused kernels")


def _cpu_has(flag: str) -> bool:
    """Whether this processor lists ``flag`` (an x86 extension) among its features."""
    return platform.machine().lower() in ("x86_64", "amd64") and flag in fused._cpu_signature().split()


@pytest.fixture(scope="module")
def _avx2_library(tmp_path_factory):
    """The kernels as an AVX2-only processor builds them (``-march=haswell``), built once for this module."""
    if not _cpu_has("avx2"):
        pytest.skip("the AVX2 build runs only on an x86 processor with AVX2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "FLAGS", tuple("-march=haswell" if f == "-march=native" else f for f in fused.FLAGS))
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("avx2-kernels")))
        library = fused.library.__wrapped__()
    if library is None:
        pytest.skip("this compiler cannot build for -march=haswell")
    return library


@pytest.fixture(params=["native", "avx2"])
def each_build(request, monkeypatch):
    """The test runs on this processor's build and on an AVX2-only processor's (8 lanes a vector, not 16): the
    CI machines have AVX-512, so without it the AVX2 code would never run before a user's."""
    if request.param == "avx2":
        library = request.getfixturevalue("_avx2_library")
        monkeypatch.setattr(fused, "library", lambda: library)


@pytest.mark.usefixtures("each_build")
def test_each_build_has_the_vector_width_its_processor_holds_in_one_register(request):
    lanes = fused.library().kernel_lanes()
    if request.node.callspec.params["each_build"] == "avx2":
        assert lanes == 8
    else:
        assert lanes == (16 if _cpu_has("avx512f") else 8)


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


@pytest.mark.usefixtures("each_build")
def test_bfloat16_autocast_forward_is_torchs_bit_for_bit(mnist):
    conv, _, _ = _layers()
    x = _images(mnist, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _torch_way(conv, x)
        got = fused.conv_pool_relu(conv, x)
    assert got.shape == (64, 32, 13, 13) and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)


@pytest.mark.usefixtures("each_build")
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


@pytest.mark.usefixtures("each_build")
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


@pytest.mark.usefixtures("each_build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_comes_through_as_in_torch_so_a_diverging_run_is_seen(mnist, dtype):
    conv, _, _ = _layers()
    x = _images(mnist, 4, dtype)
    x[0, 0, 10, 10] = float("nan")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        expected = _torch_way(conv, x)
        got = fused.conv_pool_relu(conv, x)
    assert got.isnan().sum() > 0 and not (got.isnan() & ~expected.isnan()).any()
    if dtype == torch.float32:
        assert torch.equal(got.isnan(), expected.isnan())
    # oneDNN's bfloat16 convolution spreads a NaN one column further than the 3x3 kernel reaches (its AMX kernel
    # pairs pixels along a row); everywhere else the values agree
    both = ~expected.isnan()
    assert torch.allclose(got[both].float(), expected[both].float(), atol=1e-6)
    z = torch.tensor([float("nan"), 1.0, -1.0] * 32, dtype=dtype)
    out = fused.relu_dropout(z, 0.5)
    assert out[0::3].isnan().all() and not out[1::3].isnan().any()


@pytest.mark.usefixtures("each_build")
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
    assert fused.can_fuse(net[0], net[2], x)
    net.eval()
    assert torch.allclose(net(x), plain(x), atol=1e-5)


@pytest.mark.parametrize("change", ["three channels", "padding", "stride", "pool with padding", "pool of 3",
                                    "bfloat16 without autocast", "float64"])
def test_anything_else_takes_torchs_operations(change):
    conv, _, pool = _layers()
    x = torch.rand(4, 1, 28, 28)
    assert fused.can_fuse(conv, pool, x)
    if change == "three channels":
        conv, x = nn.Conv2d(3, 32, 3), torch.rand(4, 3, 28, 28)
    elif change == "padding":
        conv = nn.Conv2d(1, 32, 3, padding=1)
    elif change == "stride":
        conv = nn.Conv2d(1, 32, 3, stride=2)
    elif change == "pool with padding":
        pool = MaxPoolReLU(2, padding=1)
    elif change == "pool of 3":
        pool = MaxPoolReLU(3)
    elif change == "bfloat16 without autocast":
        x = x.to(torch.bfloat16)
    elif change == "float64":
        x = x.double()
    assert not fused.can_fuse(conv, pool, x)


def test_a_fused_sequential_of_other_layers_runs_them_as_they_are(monkeypatch):
    def refuse(*args):
        raise AssertionError("no fused kernel for these layers")

    monkeypatch.setattr(fused, "conv_pool_relu", refuse)
    monkeypatch.setattr(fused, "relu_dropout", refuse)
    conv, _, _ = _layers()
    net = FusedSequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.ReLU(),
                          nn.Linear(32 * 13 * 13, 10)).train()
    assert net(torch.rand(4, 1, 28, 28)).shape == (4, 10)


@pytest.mark.usefixtures("each_build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_dropout_keeps_a_fifth_out_scales_the_rest_and_passes_gradients_where_kept(dtype):
    torch.manual_seed(0)
    z = torch.randn(128, 512).to(dtype).requires_grad_()
    out = fused.relu_dropout(z, 0.2)
    kept = out != 0
    assert out.dtype == dtype and out.shape == z.shape
    assert torch.equal(out[kept], (torch.relu(z) * fused._scale(0.2, dtype)).to(dtype)[kept])
    assert not kept[z <= 0].any()
    grad = torch.randn(128, 512).to(dtype)
    out.backward(grad)
    assert torch.equal(z.grad, torch.where(kept, grad * fused._scale(0.2, dtype), torch.zeros((), dtype=dtype)))
    masks = torch.stack([fused.relu_dropout(torch.ones(65536), 0.2) != 0 for _ in range(50)])
    assert abs(masks.float().mean().item() - 0.8) < 0.002  # 3.3 million draws: 0.0007 is one standard error
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.usefixtures("each_build")
def test_relu_dropout_masks_follow_torchs_seed_and_not_the_length():
    # 64 values go through the vector path, the last 8 of 40 through the scalar one: the same draws either way
    ones = torch.ones(64)
    torch.manual_seed(3)
    first = fused.relu_dropout(ones, 0.5)
    torch.manual_seed(3)
    again = fused.relu_dropout(ones, 0.5)
    torch.manual_seed(3)
    shorter = fused.relu_dropout(ones[:40], 0.5)
    assert torch.equal(first, again) and torch.equal(shorter, first[:40])


def _torch_tail(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(MaxPoolReLU(2)(x), 1)


@pytest.mark.usefixtures("each_build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(11, 11), (12, 12), (10, 7)])
def test_pool_relu_dropout_is_torchs_layers_with_a_mask_bit_for_bit(dtype, size):
    # odd sizes drop the last row or column, as max_pool2d's floor does; (10, 7): not square
    torch.manual_seed(0)
    x = torch.randn(32, 64, *size).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = fused.pool_relu_dropout(x, 0.5)
    reference = _torch_tail(x.detach())
    assert out.shape == reference.shape and out.dtype == dtype
    kept = out != 0
    scale = fused._scale(0.5, dtype)
    assert torch.equal(out[kept], (reference * scale).to(dtype)[kept])
    assert not kept[reference <= 0].any()
    assert 0.45 < kept[reference > 0].float().mean().item() < 0.55
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad)
    same = x.detach().clone().requires_grad_()
    (_torch_tail(same) * (kept.to(dtype) * scale)).backward(grad)
    assert torch.equal(x.grad, same.grad) and x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.usefixtures("each_build")
def test_pool_relu_dropout_ties_go_to_the_first_of_the_window_and_nan_comes_through():
    x = torch.zeros(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    x[:, :, 0:2, 0:2] = 1.0  # a tie of four: the gradient goes to the top left, as torch's pooling sends it
    x[0, 3, 2, 3] = float("nan")
    x = x.requires_grad_()
    torch.manual_seed(5)
    out = fused.pool_relu_dropout(x, 0.5)
    assert out.view(2, 16, 2, 2)[0, 3, 1, 1].isnan() and out.isnan().sum() == 1
    out.nan_to_num(0.0).sum().backward()
    kept = out.view(2, 16, 2, 2)[:, :, 0, 0] != 0
    assert torch.equal(x.grad[:, :, 0, 0] != 0, kept) and x.grad[:, :, 0:2, 0:2].sum() == 2 * kept.sum()


@pytest.mark.usefixtures("each_build")
def test_pool_relu_dropout_masks_follow_torchs_seed_not_the_threads():
    x = torch.rand(64, 32, 6, 6).contiguous(memory_format=torch.channels_last) + 0.1
    threads = torch.get_num_threads()
    outs = []
    for count in (1, 2):
        torch.set_num_threads(count)
        torch.manual_seed(3)
        outs.append(fused.pool_relu_dropout(x, 0.25))
    torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    masks = torch.stack([fused.pool_relu_dropout(x, 0.25) != 0 for _ in range(20)])
    assert abs(masks.float().mean().item() - 0.75) < 0.005  # 368,640 draws: 0.0007 is one standard error


@pytest.mark.parametrize("change", ["channels first", "24 channels", "pool of 3", "flatten from 2", "rate 0"])
def test_pool_relu_dropout_only_where_it_is_the_same_function(change):
    pool, flatten, p = MaxPoolReLU(2), nn.Flatten(), 0.5
    x = torch.rand(4, 32, 11, 11).contiguous(memory_format=torch.channels_last)
    assert fused.can_fuse_pool_relu_dropout(pool, flatten, p, x)
    if change == "channels first":
        x = x.contiguous()
    elif change == "24 channels":
        x = torch.rand(4, 24, 11, 11).contiguous(memory_format=torch.channels_last)
    elif change == "pool of 3":
        pool = MaxPoolReLU(3)
    elif change == "flatten from 2":
        flatten = nn.Flatten(2)
    elif change == "rate 0":
        p = 0.0
    assert not fused.can_fuse_pool_relu_dropout(pool, flatten, p, x)


def test_pooling_kernels_without_memory_raise_a_memory_error_not_a_crash(monkeypatch):
    class NoMemory:  # the kernels' status where their scratch buffers cannot be allocated
        def pool_relu_dropout_forward(self, *args):
            return -1

    monkeypatch.setattr(fused, "library", lambda: NoMemory())
    x = torch.rand(4, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(MemoryError, match=r"deepdigits\.fused: no memory for pooling's buffers"):
        fused.pool_relu_dropout(x, 0.5)


def test_tutorial_003_pools_and_drops_out_as_one_only_in_training(monkeypatch):
    calls = []
    real = fused.pool_relu_dropout
    monkeypatch.setattr(fused, "pool_relu_dropout", lambda x, p: calls.append(p) or real(x, p))
    net = build_model("tutorial-003", seed=0).to(memory_format=torch.channels_last)
    x = torch.rand(8, 1, 28, 28)
    assert net.train()(x).shape == (8, 10) and calls == [0.5]
    net.eval()  # (the first convolution's fused kernel sums in its own order: float32 rounding apart)
    assert torch.allclose(net(x), nn.Sequential(*net)(x), atol=1e-6) and calls == [0.5]


def test_fused_sequential_runs_relu_then_dropout_as_one_only_in_training(monkeypatch):
    calls = []
    real = fused.relu_dropout
    monkeypatch.setattr(fused, "relu_dropout", lambda x, p: calls.append(p) or real(x, p))
    net = build_model("tutorial-001", seed=0)
    assert isinstance(net, FusedSequential)
    x = torch.rand(8, 1, 28, 28)
    net.train()(x)
    assert calls == [0.2, 0.2]
    net.eval()
    assert torch.equal(net(x), nn.Sequential(*net)(x))
    assert calls == [0.2, 0.2]


def _optimizer_pair(name: str = "adam", seed: int = 0):
    """A tutorial network with a Bf16Adam or Bf16RMSprop, and a plain twin with torch's optimizer."""
    net = build_model("tutorial-001" if name == "adam" else "tutorial-004", seed=seed)
    twin = nn.Sequential(*build_model(net.architecture, seed=seed))
    make = {"adam": lambda params: torch.optim.Adam(params, lr=0.01, eps=1e-7),
            "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01, alpha=0.9, eps=1e-7)}[name]
    return net, twin, make(twin.parameters()), fused.bf16_optimizer(net, make(net.parameters()))


@pytest.mark.parametrize(("name", "kind", "state_keys"), [
    ("adam", fused.Bf16Adam, {"step", "exp_avg", "exp_avg_sq"}),
    ("rmsprop", fused.Bf16RMSprop, {"step", "square_avg"})])
def test_bf16_optimizers_are_torchs_on_the_same_bfloat16_gradients(name, kind, state_keys):
    net, twin, stock, ours = _optimizer_pair(name)
    assert isinstance(ours, kind)
    pairs = [(layer, other) for layer, other in zip(net, twin, strict=True) if isinstance(layer, nn.Linear)]
    torch.manual_seed(1)
    for _ in range(5):
        ours.zero_grad()
        stock.zero_grad()
        for layer, other in pairs:
            for copy, param in zip(ours.copies[layer].current(), (other.weight, other.bias), strict=True):
                grad = torch.randn(copy.shape).to(torch.bfloat16)
                copy.grad, param.grad = grad, grad.float()
        ours.step()
        stock.step()
    for layer, other in pairs:
        for param, twin_param, copy in zip((layer.weight, layer.bias), (other.weight, other.bias),
                                           ours.copies[layer].copies, strict=True):
            assert torch.allclose(param, twin_param, rtol=1e-5, atol=1e-6)
            assert torch.equal(copy, param.detach().to(torch.bfloat16))  # the copy kept current by the step
    state = ours.state_dict()
    assert state["state"][0]["step"] == 5 and set(state["state"][0]) == state_keys
    stock.load_state_dict(state)  # checkpoints load into torch's optimizer and back


def test_a_non_contiguous_moment_from_a_checkpoint_is_made_contiguous_before_the_kernel_writes_it():
    net, _, _, ours = _optimizer_pair()
    twin_net, _, _, twin = _optimizer_pair()
    for optimizer in (ours, twin):
        for weights in optimizer.copies.values():
            for copy in weights.current():
                copy.grad = torch.full(copy.shape, 0.5, dtype=torch.bfloat16)
        optimizer.step()
    state = ours.state[net[1].weight]
    state["exp_avg"] = state["exp_avg"].t().contiguous().t()  # the same values, column-major
    assert not state["exp_avg"].is_contiguous()
    for optimizer in (ours, twin):
        optimizer.step()
    assert ours.state[net[1].weight]["exp_avg"].is_contiguous()
    assert torch.equal(net[1].weight, twin_net[1].weight)


def test_weight_copies_follow_weights_changed_from_outside():
    net, _, _, ours = _optimizer_pair()
    layer = net[1]
    assert torch.equal(ours.copies[layer].current()[0], layer.weight.detach().to(torch.bfloat16))
    with torch.no_grad():
        layer.weight.mul_(2)  # as loading a checkpoint does
    assert torch.equal(ours.copies[layer].current()[0], layer.weight.detach().to(torch.bfloat16))


@pytest.mark.parametrize("case", ["sgd", "weight decay", "convolutional", "plain sequential", "momentum"])
def test_bf16_optimizers_only_for_plain_adam_or_rmsprop_over_a_dense_fused_sequential(case):
    net = build_model("tutorial-003" if case == "convolutional" else "tutorial-001", seed=0)
    if case == "plain sequential":
        net = nn.Sequential(*net)
    if case == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
    elif case == "momentum":
        opt = torch.optim.RMSprop(net.parameters(), lr=0.001, momentum=0.9)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=0.001, weight_decay=0.01 if case == "weight decay" else 0.0)
    assert fused.bf16_optimizer(net, opt) is opt


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="bfloat16 training only where the CPU computes it")
def test_tutorial_001_trains_through_the_copies_and_learns(mnist):
    net = build_model("tutorial-001", seed=0)
    x = torch.from_numpy(mnist.x_train[:3000]).float().div(255).view(-1, 1, 28, 28)
    y = torch.from_numpy(mnist.y_train[:3000]).long()
    run = train.prepare(net, x, y, optimizer="adam", learning_rate=0.001, batch_size=128, epochs=4, seed=0,
                        loss="cross-entropy", weight_decay=0.0, schedule="constant", augment=False,
                        label_smoothing=0.0, ema_decay=0.0, bf16=True, channels_last=False, verbose=0, device=None)
    assert isinstance(run.optimizer, fused.Bf16Adam)
    before = net[1].weight.detach().clone()
    try:
        for epoch in range(4):
            run.train_epoch(epoch)
    finally:
        run.restore_settings()
    assert all(p.grad is None for p in net.parameters())  # every gradient came through the bfloat16 copies
    assert not torch.equal(before, net[1].weight)
    net.eval()
    test = torch.from_numpy(mnist.x_test[:1000]).float().div(255).view(-1, 1, 28, 28)
    accuracy = (net(test).argmax(1).numpy() == mnist.y_test[:1000]).mean()
    assert accuracy > 0.89  # 0.907 here, and 0.907 through torch's Adam and autocast (DEEPDIGITS_FUSED=0)


def _prepared_000(x: torch.Tensor, y: torch.Tensor) -> train.TrainingRun:
    return train.prepare(build_model("tutorial-000", seed=0), x, y, optimizer="sgd", learning_rate=0.01,
                         batch_size=500, epochs=2, seed=0, loss="keras2-clipped-cross-entropy", weight_decay=0.0,
                         schedule="constant", augment=False, label_smoothing=0.0, ema_decay=0.0, bf16=True,
                         channels_last=False, verbose=0, device=None)


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="bfloat16 training only where the CPU computes it")
def test_tutorial_000_steps_sgd_through_the_copies_bit_for_bit_as_torchs_sgd(mnist):
    x = torch.from_numpy(mnist.x_train[:3000]).float().view(-1, 1, 28, 28)  # raw 0-255 pixels, as 000
    y = torch.from_numpy(mnist.y_train[:3000]).long()
    ours, stock = _prepared_000(x, y), _prepared_000(x, y)
    assert isinstance(ours.optimizer, fused.Bf16SGD)
    stock.optimizer = torch.optim.SGD(stock.network.parameters(), lr=0.01)  # torch's SGD; autocast casts weights
    stock.autocast = stock.autocast.autocast
    chains = []
    chain = liverows.chain
    liverows.chain = lambda layers, x, weights=None: chains.append(weights is not None) or chain(layers, x, weights)
    try:
        for run in (ours, stock):
            for epoch in range(2):
                run.train_epoch(epoch)
    finally:
        liverows.chain = chain
        stock.restore_settings()  # the later run first: each puts back what it found (threads, denormals)
        ours.restore_settings()
    assert chains == [True] * 12 + [False] * 12  # 6 steps an epoch: the copies, then the weights themselves
    assert all(p.grad is None for p in ours.network.parameters())  # gradients came through the copies
    for mine, theirs in zip(ours.network.parameters(), stock.network.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert not torch.equal(ours.network[1].weight, build_model("tutorial-000", seed=0)[1].weight)


def test_bf16_sgd_only_for_plain_sgd_over_a_network_trained_through_live_rows():
    net = build_model("tutorial-000", seed=0)
    assert isinstance(fused.bf16_optimizer(net, torch.optim.SGD(net.parameters(), lr=0.01)), fused.Bf16SGD)
    for opt in (torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9),
                torch.optim.SGD(net.parameters(), lr=0.01, weight_decay=0.1)):
        assert fused.bf16_optimizer(net, opt) is opt
    dense = build_model("tutorial-004", seed=0)  # no live_rows
    opt = torch.optim.SGD(dense.parameters(), lr=0.01)
    assert fused.bf16_optimizer(dense, opt) is opt


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


def test_training_says_whether_the_kernels_run(monkeypatch):
    assert fused.describe().startswith("fused CPU kernels")
    monkeypatch.setattr(fused, "library", lambda: None)
    assert fused.describe().startswith("torch's operations (no C compiler")
    monkeypatch.setenv(fused.DISABLE, "0")
    assert fused.describe() == "torch's operations (DEEPDIGITS_FUSED=0)"
