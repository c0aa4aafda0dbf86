"""Data-parallel training on torch.distributed: torchrun's process group, DDP, synchronised batch norm, a launcher.

``torchrun --standalone --nproc_per_node=N -m deepdigits train --recipe R`` runs N processes; each one
calls ``train_recipe``, which joins the process group torchrun describes in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on the CPU, NCCL on CUDA. Users who
start processes themselves set those variables (or call ``torch.distributed.init_process_group``) and
call ``train_recipe`` (or ``Classifier.fit``) in each with the same arguments; every process ends with
the same weights, and only rank 0 prints, validates and writes checkpoints. Every process reads the
checkpoint it resumes from, so across machines its folder must be on a filesystem all of them see, and the
run resumes with as many processes as wrote it (each process's random streams are in it).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import DeepDigitsError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def device(self) -> torch.device:
        """Where this process trains: its own GPU under NCCL (``LOCAL_RANK``), else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def describe(self) -> dict:
        """What a bundle records of the run: ``{"world_size": 2, "backend": "gloo"}``."""
        return {"world_size": self.world_size, "backend": self.backend}


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend_for_this_machine() -> str:
    """NCCL where CUDA is available, gloo on the CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def current() -> World | None:
    """The data-parallel run this process belongs to, or None when ``torch.distributed`` is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank = dist.get_rank()
    return World(rank=rank, world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", rank)),
                 backend=str(dist.get_backend()))


def setup() -> World | None:
    """Join the process group the environment describes (torchrun's); None when not launched that way."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched():
        return None
    if not dist.is_available():
        raise DeepDigitsError("this PyTorch was built without torch.distributed; train in one process")
    backend = backend_for_this_machine()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        dist.init_process_group(backend=backend)
    except (ValueError, RuntimeError) as exc:
        raise DeepDigitsError(f"cannot join the process group ({str(exc).splitlines()[0][:200]})") from None
    return current()


def teardown() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def first_on_each_machine(load: Callable[[], T]) -> T:
    """``load()`` in every process, by local rank 0 first (it may download into the machine's cache) while
    the others wait at a barrier; simply ``load()`` outside a process group."""
    world = current()
    if world is None or world.world_size == 1:
        return load()
    if world.local_rank != 0:
        barrier()
    try:
        return load()
    finally:
        if world.local_rank == 0:
            barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes (a new tensor on ``tensor``'s device)."""
    device = _collective_device()
    total = tensor.to(device).clone()
    dist.all_reduce(total)
    return total.to(tensor.device)


def all_gather_json(value: object) -> list:
    """Every process's ``value`` (JSON-able), by rank; sent as UTF-8 JSON bytes, never pickled."""
    device = _collective_device()
    data = torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(part[: int(n)].cpu().tolist()).decode("utf-8"))
            for part, n in zip(parts, sizes, strict=True)]


def wrap(network: nn.Module, device: torch.device) -> nn.Module:
    """``network`` under DistributedDataParallel (its gradients all-reduced, averaged, during backward)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        # A convolution weight with one input channel is the same bytes channels-last or contiguous (torch
        # calls both contiguous), but DDP compares strides: left channels-last (36, 1, 6, 1), its gradient
        # came as (36, 36, 6, 1), missed its bucket view, and DDP warned "Grad strides do not match bucket
        # view strides" (fast's first layer, H100) and copied it every step. Not on the CPU: there the
        # gradient keeps the weight's strides, and the weight's layout is what makes oneDNN give the first
        # convolution's output channels-last; contiguous, every later layer ran channels-first, and
        # tutorial 003 trained in 2 processes at 15.3 ms a step against 7.1 (gloo, 1 thread each).
        for parameter in network.parameters():
            if parameter.dim() == 4 and parameter.shape[1] == 1:
                parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(network, device_ids=[index], output_device=index)
    # broadcast_buffers=False: rank 0's buffers (batch norm's running statistics) were sent to every process
    # before each forward (3% of a CPU worker's time in py-spy); synchronised batch norm keeps them equal
    return DistributedDataParallel(network, broadcast_buffers=False)


# ----------------------------------------------------------------------------- synchronised batch norm

# torch.nn.SyncBatchNorm runs on GPUs only (its forward raises "SyncBatchNorm expected input tensor to be
# on GPU" for CPU tensors under gloo), so batch norm is synchronised here with plain all-reduces, on any
# device: the statistics are those of the whole batch, as one process would compute them. The layers keep
# their class's parameters, buffers and state_dict keys; only their class is switched while training.


def _update_running(running_mean: torch.Tensor | None, running_var: torch.Tensor | None, mean: torch.Tensor,
                    var: torch.Tensor, total: torch.Tensor, momentum: float) -> None:
    """Batch norm's running statistics moved towards the whole batch's mean and unbiased variance."""
    if running_mean is not None and running_var is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        unbiased = var * (total / (total - 1).clamp(min=1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of every process's batch: two all-reduces forward, one backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float):  # type: ignore[override]
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        x32 = x.float()
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float32, device=x.device)
        sums = torch.cat([x32.sum(dims), count])
        dist.all_reduce(sums)
        total = sums[-1]
        mean = sums[:-1] / total
        centered = x32 - mean.view(shape)
        squares = centered.square().sum(dims)
        dist.all_reduce(squares)
        var = squares / total
        invstd = torch.rsqrt(var + eps)
        xhat = centered * invstd.view(shape)
        out = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)
        _update_running(running_mean, running_var, mean, var, total, momentum)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.total = total
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xhat, invstd, weight = ctx.saved_tensors
        dims = [0, *range(2, xhat.dim())]
        shape = [1, -1] + [1] * (xhat.dim() - 2)
        dy = grad_out.float()
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        # The affine parameters' gradients stay local: DDP averages them over processes like any other.
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None else None
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both)
        channels = sum_dy.numel()
        mean_dy, mean_dy_xhat = both[:channels] / ctx.total, both[channels:] / ctx.total
        scale = invstd if weight is None else invstd * weight.float()
        grad_x = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * scale.view(shape)
        return grad_x.to(grad_out.dtype), grad_weight, grad_bias, None, None, None, None


class _SyncBatchNormCPU(torch.autograd.Function):
    """Batch norm over the union of every process's batch, on the CPU: one all-gather forward, one all-reduce
    backward.

    Each process takes its batch's mean and variance in torch's fused kernel (float32 statistics), the
    processes' are combined exactly (Chan's pooled variance), and torch's batch norm normalises with them;
    backward, torch's batch-norm backward gives each process its sums of dy and dy * xhat, whose all-reduced
    means make the input's gradient in two fused float32 passes. Before, a dozen float32 passes over the
    activations each way took most of a worker's time: ``best`` trained 2.4x slower in two processes than in
    one (2 free cores); its first layer (64 x 32 x 28 x 28 bfloat16, 1 thread) 5.8 -> 1.2 ms forward and
    5.2 -> 2.3 ms backward, all-reduces aside (statistics 0.86 ms, normalisation 0.39, backward sums 0.35).
    Other devices keep ``_SyncBatchNormFunction``, measured on the H100 (these fused kernels were not run there).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float):  # type: ignore[override]
        channels = x.shape[1]
        # this process's mean and biased variance in one fused pass, in float32 whatever x is (the float32
        # scratch "running" statistics, left as they are by momentum 0, are what makes them float32)
        scratch = torch.zeros(2, channels, dtype=torch.float32, device=x.device)
        local_mean, local_var = torch.batch_norm_update_stats(x, scratch[0], scratch[1], 0.0)
        count = float(x.numel() // channels)
        mine = torch.cat([torch.tensor([count], device=x.device), local_mean.float(), local_var.float()])
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        stats = torch.stack(parts)
        counts, means, variances = stats[:, :1], stats[:, 1 : 1 + channels], stats[:, 1 + channels :]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean).square())).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        _update_running(running_mean, running_var, mean, var, total, momentum)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total, ctx.eps = total, eps
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale_by = weight.float() if weight is not None else torch.ones_like(invstd)
        dy = grad_out.contiguous(memory_format=_memory_format(x))
        # this process's sums of dy * xhat and of dy, with the statistics of the whole batch
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, scale_by, None, None, mean, invstd, True, ctx.eps, [False, True, True])
        # The affine parameters' gradients stay local: DDP averages them over processes like any other.
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None else None
        both = torch.cat([sum_dy, sum_dy_xhat]).float()
        dist.all_reduce(both)
        channels = sum_dy.numel()
        mean_dy, mean_dy_xhat = both[:channels] / ctx.total, both[channels:] / ctx.total
        # dx = k (dy - mean_dy - xhat mean_dy_xhat) with xhat = (x - mean) invstd, k = invstd * weight:
        # dx = k dy + c1 x + c0, computed in float32 and rounded once to dy's dtype
        k = invstd * scale_by
        c1 = -k * mean_dy_xhat * invstd
        c0 = -k * mean_dy - c1 * mean
        grad_x = torch.addcmul(c0.view(shape), x, c1.view(shape)).addcmul_(dy, k.view(shape))
        return grad_x.to(grad_out.dtype), grad_weight, grad_bias, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


class _Synchronised:
    """Mixed in before a batch-norm class: in training mode, statistics over all processes' batches."""

    _plain_class: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        self._check_input_dim(x)  # type: ignore[attr-defined]
        momentum = self.momentum  # type: ignore[attr-defined]
        if self.track_running_stats and self.num_batches_tracked is not None:  # type: ignore[attr-defined]
            self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
            if momentum is None:  # a cumulative average
                momentum = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
        tracked = self.track_running_stats  # type: ignore[attr-defined]
        function = _SyncBatchNormCPU if x.device.type == "cpu" else _SyncBatchNormFunction
        return function.apply(
            x, self.weight, self.bias,  # type: ignore[attr-defined]
            self.running_mean if tracked else None, self.running_var if tracked else None,  # type: ignore[attr-defined]
            self.eps, momentum if momentum is not None else 0.0)  # type: ignore[attr-defined]


_SYNCHRONISED: dict[type, type] = {}


def sync_batch_norm(network: nn.Module) -> int:
    """Switch ``network``'s batch-norm layers to synchronised ones in place; returns how many."""
    switched = 0
    for module in network.modules():
        cls = type(module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _Synchronised):
            if cls not in _SYNCHRONISED:
                _SYNCHRONISED[cls] = type(f"Synchronised{cls.__name__}", (_Synchronised, cls), {"_plain_class": cls})
            module.__class__ = _SYNCHRONISED[cls]
            switched += 1
    return switched


def plain_batch_norm(network: nn.Module) -> None:
    """Undo ``sync_batch_norm``: the layers are their own classes again (saved and served as before)."""
    for module in network.modules():
        if isinstance(module, _Synchronised):
            module.__class__ = module._plain_class


# ----------------------------------------------------------------------------- launching


def launch(nprocs: int, argv: list[str]) -> int:
    """Run ``deepdigits ARGV`` in ``nprocs`` processes on this machine under torch's elastic agent (torchrun).

    Each process gets one thread (torchrun's default when it starts several). Returns the exit status.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nprocs}", "--module", "deepdigits", *argv])
    try:
        run(args)
    except SignalException:  # Ctrl-C: the processes were stopped; rank 0 saved what it could
        return 130
    except ChildFailedError as exc:
        failures = exc.failures
        first = failures[min(failures)] if failures else None
        code = first.exitcode if first is not None else 1
        if code not in (1, 130):  # 1 and 130: the process printed its own one-line error or interruption
            print(f"deepdigits: error: a training process failed (exit status {code})", file=sys.stderr)
        return code if code > 0 else 1
    return 0
