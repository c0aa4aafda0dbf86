"""Fused CPU kernels in C (one-channel 3x3 convolution, 2x2 max pooling, ReLU), compiled on first use and cached."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch
from torch import nn

SOURCE = Path(__file__).with_name("csrc") / "convpool.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
DISABLE = "DEEPDIGITS_FUSED"  # set to 0 to train with torch's own operations only
COMPILE_SECONDS = 120


def _compiler() -> str | None:
    configured = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(configured) or shutil.which("cc")


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: a library built on one processor is not loaded on another."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _cache_dir() -> Path:
    from .data import cache_dir

    return cache_dir() / "kernels"


def library_path(compiler: str) -> Path:
    """Where the kernels built by ``compiler`` for this processor, source and torch are cached."""
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(),
                                     _cpu_signature().encode(), torch.__version__.encode()])).hexdigest()[:16]
    return _cache_dir() / f"convpool-{key}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile the kernels' source into ``target`` through a scratch file beside it: whole or not at all, also
    where two processes build at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True,
                       timeout=COMPILE_SECONDS)
        os.replace(built, target)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be had (no C compiler, a failed build, ``DEEPDIGITS_FUSED=0``):
    callers then use torch's own operations, the same function a little slower."""
    if os.environ.get(DISABLE, "1") == "0" or os.name != "posix":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    target = library_path(compiler)
    lib = None
    for attempt in range(2):  # a cached library that will not load (a truncated file) is built again, once
        try:
            if attempt or not target.exists():
                _build(compiler, target)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, subprocess.SubprocessError):
            continue
    if lib is None:
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.convpool_forward.argtypes = [integer, pointer, pointer, pointer, pointer, pointer] + [integer] * 5
    lib.convpool_forward.restype = None
    lib.convpool_backward.argtypes = [integer, pointer, pointer, pointer, pointer, pointer] + [integer] * 5
    lib.convpool_backward.restype = integer
    return lib


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def can_fuse(conv: nn.Module, relu: nn.Module, pool: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``pool(relu(conv(x)))`` (a ``PooledReLU`` and a ``MaxPoolReLU``) can run as ``conv_pool_relu``."""
    from .models import MaxPoolReLU, PooledReLU

    if not (isinstance(conv, nn.Conv2d) and isinstance(relu, PooledReLU) and type(pool) is MaxPoolReLU):
        return False
    if x.device.type != "cpu" or x.dim() != 4 or x.shape[1] != 1 or min(x.shape[2:]) < 4 or x.shape[0] == 0:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    convolution_ok = (conv.in_channels == 1 and conv.out_channels % 16 == 0 and conv.kernel_size == (3, 3)
                      and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1)
                      and conv.groups == 1 and conv.bias is not None and conv.padding_mode == "zeros"
                      and conv.weight.dtype == torch.float32 and conv.bias.dtype == torch.float32)
    pooling_ok = (pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
                  and pool.dilation in (1, (1, 1)) and not pool.ceil_mode and not pool.return_indices)
    dtype_ok = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _bf16_autocast())
    return convolution_ok and pooling_ok and dtype_ok and library() is not None


class _ConvPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bf16: bool) -> torch.Tensor:
        dtype = torch.bfloat16 if bf16 else torch.float32
        n, _, h, w = x.shape
        c = weight.shape[0]
        images = x.reshape(n, h, w).to(dtype).contiguous()
        # the kernel and bias as autocast hands them to the convolution: rounded to bfloat16
        kernel = weight.detach().to(dtype).float().reshape(c, 9).t().contiguous()
        shift = bias.detach().to(dtype).float().contiguous()
        y = torch.empty((n, c, (h - 2) // 2, (w - 2) // 2), dtype=dtype, memory_format=torch.channels_last)
        winners = torch.empty((n, (h - 2) // 2, (w - 2) // 2, c), dtype=torch.uint8)
        threads = torch.get_num_threads()
        library().convpool_forward(int(bf16), images.data_ptr(), kernel.data_ptr(), shift.data_ptr(),
                                   y.data_ptr(), winners.data_ptr(), n, h, w, c, threads)
        ctx.save_for_backward(images, winners)
        ctx.bf16, ctx.kernel_shape = bf16, weight.shape
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        images, winners = ctx.saved_tensors
        n, h, w = images.shape
        c = ctx.kernel_shape[0]
        grad = grad.to(images.dtype).contiguous(memory_format=torch.channels_last)
        kernel_grad, bias_grad = torch.empty(9, c), torch.empty(c)
        status = library().convpool_backward(int(ctx.bf16), images.data_ptr(), grad.data_ptr(),
                                             winners.data_ptr(), kernel_grad.data_ptr(), bias_grad.data_ptr(),
                                             n, h, w, c, torch.get_num_threads())
        if status != 0:
            raise MemoryError("deepdigits.fused: no memory for the convolution's gradient")
        return None, kernel_grad.t().reshape(ctx.kernel_shape), bias_grad, None


def conv_pool_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``relu(max_pool2d(conv(x), 2))`` in one pass of the fused kernel (check ``can_fuse`` first).

    The same values as torch's operations, bit for bit under bfloat16 autocast (the convolution's outputs are
    rounded to bfloat16 before pooling, as autocast rounds them); the gradient differs only in the order of
    float32 additions. Torch's kernels write the 26 x 26 convolution output, read it to pool, zero and fill its
    gradient, and read that back for the weight gradient; here it is never stored. Tutorial 003 (bfloat16, 2
    threads, AVX-512): a training step 6.78 -> 4.84 ms (1.41x, 8 alternated blocks of 20 steps), the whole
    recipe 29.1-30.8 -> 22.4-22.5 s (seeds 0-2, fresh processes, alternated; 99.03% mean test accuracy against
    98.98% here: the seed spread).
    """
    return _ConvPoolReLU.apply(x, conv.weight, conv.bias, x.dtype == torch.bfloat16 or _bf16_autocast())
