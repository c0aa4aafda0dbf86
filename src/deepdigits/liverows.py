"""Linear-ReLU chains whose backward pass runs over only the batch rows that carry a gradient."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """What the chain computes in here: bfloat16 under the CPU's bfloat16 autocast, float32 without autocast;
    None elsewhere (another autocast dtype, another device), where autograd runs as usual."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if torch.is_autocast_enabled("cpu"):
        return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    return torch.float32 if x.dtype == torch.float32 else None


def is_chain(layers: list[nn.Module]) -> bool:
    """Whether ``layers`` are Linear, ReLU, Linear, ..., Linear (plain layers without hooks, float32 weights with
    biases)."""
    if len(layers) < 1 or len(layers) % 2 == 0:
        return False
    for i, layer in enumerate(layers):
        if layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks or layer._backward_pre_hooks:
            return False  # the chain never calls the layers, so their hooks would not run
        if i % 2:
            if type(layer) is not nn.ReLU:
                return False
        elif not (type(layer) is nn.Linear and layer.bias is not None and layer.weight.dtype == torch.float32):
            return False
    return True


def can_run(layers: list[nn.Module], x: torch.Tensor) -> bool:
    """Whether ``chain`` can train ``layers`` on ``x``: a chain (``is_chain``) on the CPU, in bfloat16 autocast
    or plain float32, with gradients on, ``x`` a 2-D batch that needs no gradient itself, nothing traced."""
    return (torch.is_grad_enabled() and x.dim() == 2 and not x.requires_grad and is_chain(layers)
            and _compute_dtype(x) is not None and layers[0].weight.device.type == "cpu"
            and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()))


ROW_BUCKET = 32


def _rows_to_keep(grad: torch.Tensor) -> torch.Tensor | None:
    """The rows of ``grad`` that are not all zero, padded with zero rows to a multiple of ``ROW_BUCKET``; None
    where that is every row.

    The padding bounds how many shapes the products see: oneDNN builds (compiles) a kernel for each new shape,
    and an exact count of live rows made a new one most steps where the count moved (tutorial 000, seed 2:
    54,000 more page faults and 0.44 s against 0.26 s in the epoch where its live rows rose from 44 to 203)."""
    keep = grad.any(dim=1)
    live = int(keep.sum())
    wanted = -(-max(live, 1) // ROW_BUCKET) * ROW_BUCKET
    if wanted >= len(grad):
        return None
    if wanted > live:  # zero rows add exact zeros to every sum
        keep[(~keep).nonzero()[: wanted - live, 0]] = True
    return keep.nonzero().squeeze(1)


class _Chain(torch.autograd.Function):
    """The chain forward as autocast runs it; backward with autograd's own operations on the live rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype, *params: torch.Tensor) -> torch.Tensor:
        weights = [p.to(dtype) for p in params[0::2]]  # autocast's cast of each weight (none in float32)
        inputs, h = [], x.to(dtype)
        for i, (weight, bias) in enumerate(zip(weights, params[1::2], strict=True)):
            inputs.append(h)
            h = torch.addmm(bias.to(dtype), h, weight.t())
            if i < len(weights) - 1:
                h = h.relu_()
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.save_for_backward(*inputs, *weights)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        inputs, weights = saved[: len(saved) // 2], saved[len(saved) // 2 :]
        # Rows whose loss gradient is exactly zero (Keras 2's clipped cross-entropy zeroes every row whose
        # probability saturates: on raw pixels 460-497 of tutorial 000's 500 in every epoch of seed 0, about
        # half from seed 2's sixth epoch on) add nothing to any weight's gradient, so the products run over the
        # others alone: a 000 step 2.27 -> 1.80 ms, whole runs 1.23x over 10 seeds on 2 EPYC cores
        # (benchmarks/RESULTS.md, "Seventh round"). Where every row is live, nothing is gathered, and the
        # gradients are autograd's bit for bit.
        rows = _rows_to_keep(grad)
        if rows is not None:
            grad = grad.index_select(0, rows)
            inputs = [h.index_select(0, rows) for h in inputs]
        grads = []
        for i in reversed(range(len(weights))):
            grads += [grad.sum(0), grad.t().mm(inputs[i])]
            if i:
                grad = torch.ops.aten.threshold_backward(grad.mm(weights[i]), inputs[i], 0)
        grads = [g.to(dtype) for g, dtype in zip(reversed(grads), ctx.param_dtypes, strict=True)]
        return None, None, *grads


def chain(layers: list[nn.Module], x: torch.Tensor, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``layers`` applied to ``x`` (check ``can_run`` first), in autocast's dtype, as one autograd node; through
    ``weights`` (each Linear's weight and bias, in order: bfloat16 copies that take the gradients) where given."""
    dtype = _compute_dtype(x)
    params = weights or [p for layer in layers[0::2] for p in (layer.weight, layer.bias)]
    return _Chain.apply(x, dtype, *params)
