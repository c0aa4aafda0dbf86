"""Linear-ReLU chains trained with the backward pass over the rows that carry a gradient (deepdigits.liverows)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from deepdigits import liverows
from deepdigits.losses import keras2_clipped_cross_entropy
from deepdigits.models import FusedSequential, build_model


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Tutorial 000's network (a FusedSequential) and the same layers, same weights, as a plain nn.Sequential."""
    net = build_model("tutorial-000", seed=seed)
    return net, nn.Sequential(*copy.deepcopy(list(net)))


def _gradients(net: nn.Module, x: torch.Tensor, loss_fn, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = net(x).float()
    loss_fn(logits).backward()
    return logits, [p.grad for p in net.parameters()]


def _pixels(rows: int = 200, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.rand(rows, 784, generator=torch.Generator().manual_seed(1)) * 255).round().to(dtype)


@pytest.mark.parametrize("bf16", [True, False])
def test_every_row_live_gives_autograds_gradients_bit_for_bit(bf16: bool) -> None:
    net, plain = _pair()
    x = _pixels(dtype=torch.bfloat16 if bf16 else torch.float32)
    y = torch.arange(200) % 10
    logits, grads = _gradients(net, x, lambda z: F.cross_entropy(z / 1000, y), bf16)
    ref_logits, ref_grads = _gradients(plain, x, lambda z: F.cross_entropy(z / 1000, y), bf16)
    assert "_Chain" in (logits.grad_fn.name() + "".join(f[0].name() for f in logits.grad_fn.next_functions if f[0]))
    assert torch.equal(logits, ref_logits)
    assert len(grads) == 6 and all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))
    assert all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("bf16", [True, False])
def test_rows_without_gradient_are_skipped_and_the_gradients_agree(bf16: bool) -> None:
    net, plain = _pair()
    x = _pixels(dtype=torch.bfloat16 if bf16 else torch.float32)
    live = torch.zeros(200, dtype=torch.bool)
    live[[3, 50, 51, 199]] = True

    def loss(z: torch.Tensor) -> torch.Tensor:  # only four rows reach the loss: the other 196 get exact zeros
        return (z[live] ** 2).mean() / 1e6

    gathered = []
    keep = liverows._rows_to_keep
    liverows._rows_to_keep = lambda grad: gathered.append(keep(grad)) or gathered[-1]
    try:
        logits, grads = _gradients(net, x, loss, bf16)
    finally:
        liverows._rows_to_keep = keep
    _, ref_grads = _gradients(plain, x, loss, bf16)
    assert "_Chain" in (logits.grad_fn.name() + "".join(f[0].name() for f in logits.grad_fn.next_functions if f[0]))
    assert len(gathered) == 1 and len(gathered[0]) == 32 and {3, 50, 51, 199} <= set(gathered[0].tolist())
    tolerance = 1e-2 if bf16 else 1e-5  # one bfloat16 rounding of the float32 sums in a different grouping
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.shape == r.shape
        assert (g - r).abs().max() <= tolerance * r.abs().max()


def test_rows_to_keep_pads_to_buckets_of_32() -> None:
    grad = torch.zeros(500, 10)
    grad[[7, 100, 499], 0] = 1.0
    rows = liverows._rows_to_keep(grad)
    assert len(rows) == 32 and {7, 100, 499} <= set(rows.tolist()) and len(set(rows.tolist())) == 32
    assert rows.tolist() == sorted(rows.tolist())
    grad[:470, 1] = 1.0  # 471 live rows round up to 480
    assert len(liverows._rows_to_keep(grad)) == 480
    grad[:, 2] = 1.0  # every row live: nothing to gather
    assert liverows._rows_to_keep(grad) is None
    assert len(liverows._rows_to_keep(torch.zeros(500, 10))) == 32
    assert liverows._rows_to_keep(torch.zeros(20, 10)) is None  # fewer rows than a bucket


def test_what_runs_as_a_chain() -> None:
    net = build_model("tutorial-000")
    layers = list(net)[1:]
    x = _pixels(8)
    assert liverows.is_chain(layers) and liverows.can_run(layers, x)
    assert not liverows.is_chain(layers[:-1])  # ends in ReLU
    assert not liverows.is_chain([nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)])
    assert not liverows.is_chain([nn.Linear(4, 4, bias=False)])
    assert not liverows.can_run(layers, x.requires_grad_())  # an input gradient (saliency maps): autograd's own
    with torch.no_grad():
        assert not liverows.can_run(layers, _pixels(8))
    with torch.autocast("cpu", dtype=torch.float16):
        assert not liverows.can_run(layers, _pixels(8))
    assert not liverows.can_run(layers, _pixels(8).to(torch.bfloat16))  # bfloat16 images without autocast


def test_only_tutorial_000_in_training_uses_the_chain() -> None:
    net = build_model("tutorial-000")
    assert net.live_rows and net.train()(_pixels(4)).grad_fn.name() == "_ChainBackward"
    assert net.eval()(_pixels(4)).grad_fn.name() == "AddmmBackward0"  # evaluation with gradients on
    for name in ("tutorial-001", "tutorial-004"):  # dense FusedSequentials whose losses give every row a gradient
        other = build_model(name).train()
        assert isinstance(other, FusedSequential) and not other.live_rows
        assert "_Chain" not in other(_pixels(4) / 255).grad_fn.name()


def test_a_hooked_layer_keeps_autograds_path() -> None:
    net = build_model("tutorial-000").train()
    seen = []
    net[3].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    assert net(_pixels(4)).grad_fn.name() == "AddmmBackward0"
    assert seen == [torch.Size([4, 32])]


def test_tutorial_000_learns_through_the_chain_with_its_clipped_loss(mnist, monkeypatch) -> None:
    backward_calls, rows_gathered = [], []
    keep = liverows._rows_to_keep

    def counted(grad: torch.Tensor):
        rows = keep(grad)
        rows_gathered.append(len(grad) if rows is None else len(rows))
        return rows

    monkeypatch.setattr(liverows, "_rows_to_keep", counted)
    net = build_model("tutorial-000", seed=0)
    x = torch.from_numpy(mnist.x_train[:3000].reshape(-1, 784)).to(torch.bfloat16)  # raw 0-255 pixels, as 000
    y = torch.from_numpy(mnist.y_train[:3000]).long()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    for _ in range(10):
        for i in range(0, 3000, 500):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = net(x[i : i + 500]).float()
            loss = keras2_clipped_cross_entropy(logits, y[i : i + 500])
            opt.zero_grad()
            loss.backward()
            opt.step()
            backward_calls.append(loss.item())
    assert len(backward_calls) == len(rows_gathered) == 60
    assert all(torch.isfinite(torch.tensor(backward_calls)))
    assert min(rows_gathered[6:]) < 500  # saturated rows were left out once it had learned a little
    net.eval()
    with torch.no_grad():
        test = torch.from_numpy(mnist.x_test[:1000].reshape(-1, 784)).float()
        accuracy = (net(test).argmax(1).numpy() == mnist.y_test[:1000]).mean()
    assert accuracy > 0.6  # 0.698; autograd's own steps reach 0.649 (seed 0) and 0.695 (seed 1)
