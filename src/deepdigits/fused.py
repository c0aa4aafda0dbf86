"""Fused CPU kernels in C (convolution-pooling-ReLU, ReLU-dropout, pooling-ReLU-dropout, Adam and RMSprop from
bfloat16), compiled on first use."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn

SOURCE = Path(__file__).with_name("csrc") / "fused.c"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
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
    return _cache_dir() / f"fused-{key}.so"


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
    pointer, integer, length, real = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    signatures = {
        "convpool_forward": ([integer, *[pointer] * 5, *[integer] * 5], None),
        "convpool_backward": ([integer, *[pointer] * 5, *[integer] * 5], integer),
        "relu_dropout_forward": ([integer, pointer, ctypes.c_uint64, integer, real, pointer, length, integer], None),
        "relu_dropout_backward": ([integer, pointer, pointer, real, pointer, length, integer], None),
        "pool_relu_dropout_forward": ([integer, pointer, *[integer] * 4, ctypes.c_uint64, integer, real, pointer,
                                       pointer, integer], integer),
        "pool_relu_dropout_backward": ([integer, pointer, pointer, real, *[integer] * 4, pointer, integer], integer),
        "adam_bf16": ([*[pointer] * 5, length, *[real] * 6, integer], None),
        "rmsprop_bf16": ([*[pointer] * 4, length, *[real] * 3, integer], None),
        "sgd_bf16": ([*[pointer] * 3, length, real, integer], None),
        "kernel_lanes": ([], integer),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    return lib


def describe() -> str:
    """Whether this network's layers run in the fused kernels here, as the training output says it."""
    if library() is not None:
        return "fused CPU kernels (built with the system's C compiler; DEEPDIGITS_FUSED=0 turns them off)"
    if os.environ.get(DISABLE, "1") == "0":
        return "torch's operations (DEEPDIGITS_FUSED=0)"
    return "torch's operations (no C compiler with OpenMP found to build the fused kernels: about 1.3x slower)"


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _plain_eager() -> bool:
    """Not traced, scripted, compiled or exported: a custom kernel would not survive any of them."""
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export())


def can_fuse(conv: nn.Conv2d, pool: nn.MaxPool2d, x: torch.Tensor) -> bool:
    """Whether ``relu(pool(conv(x)))`` can run as ``conv_pool_relu``: a one-channel 3x3 convolution with bias,
    2x2 pooling of stride 2, float32 weights, float32 images (or bfloat16 under autocast) on the CPU."""
    if x.device.type != "cpu" or x.dim() != 4 or x.shape[1] != 1 or min(x.shape[2:]) < 4 or x.shape[0] == 0:
        return False
    convolution_ok = (conv.in_channels == 1 and conv.out_channels % 16 == 0 and conv.kernel_size == (3, 3)
                      and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1)
                      and conv.groups == 1 and conv.bias is not None and conv.padding_mode == "zeros"
                      and conv.weight.dtype == torch.float32 and conv.bias.dtype == torch.float32)
    dtype_ok = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _bf16_autocast())
    return convolution_ok and _plain_pooling(pool) and dtype_ok and _plain_eager() and library() is not None


def _enough_memory(status: int, what: str) -> None:
    """A kernel's status: 0, or -1 where it could not allocate its scratch memory."""
    if status != 0:
        raise MemoryError(f"deepdigits.fused: no memory for {what}")


def _torch_seed() -> int:
    """One full-range draw of torch's generator (so ``torch.manual_seed`` fixes it), seeding a kernel's stream."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) % 2**64


def _plain_pooling(pool: nn.MaxPool2d) -> bool:
    """2x2 windows at stride 2, no padding, dilation or ceiling, and no indices returned."""
    return (pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
            and pool.dilation in (1, (1, 1)) and not pool.ceil_mode and not pool.return_indices)


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
        _enough_memory(status, "the convolution's gradient")
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


# --------------------------------------------------------------------------- ReLU then dropout


def can_fuse_relu_dropout(p: float, x: torch.Tensor) -> bool:
    """Whether ReLU then a training ``models.Dropout(p)`` of ``x`` can run as ``relu_dropout``."""
    return (0.0 < p < 1.0 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.numel() > 0 and _plain_eager() and library() is not None)


@functools.cache
def _scale(p: float, dtype: torch.dtype) -> float:
    """1 / (1 - p) rounded to ``dtype``, as ``models.Dropout`` scales."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=dtype))


class _ReLUDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, p: float) -> torch.Tensor:
        from .models import dropout_threshold

        z = z.contiguous()
        out = torch.empty_like(z)
        scale = _scale(p, z.dtype)
        library().relu_dropout_forward(int(z.dtype == torch.bfloat16), z.data_ptr(), _torch_seed(),
                                       dropout_threshold(p), scale, out.data_ptr(), z.numel(), torch.get_num_threads())
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        grad = grad.to(out.dtype).contiguous()
        grad_in = torch.empty_like(out)
        library().relu_dropout_backward(int(out.dtype == torch.bfloat16), out.data_ptr(), grad.data_ptr(),
                                        ctx.scale, grad_in.data_ptr(), out.numel(), torch.get_num_threads())
        return grad_in, None


def relu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``Dropout(p)(relu(x))`` in training, one pass forward and one back: the mask keeps each value with the
    probability ``models.Dropout`` keeps it, from 16-bit draws of a counter-based stream seeded by one draw of
    torch's generator (so ``torch.manual_seed`` fixes it); ``models.Dropout`` draws its own from torch's."""
    return _ReLUDropout.apply(x, p)


# --------------------------------------------------------------------------- max pooling, ReLU, flatten, dropout


def can_fuse_pool_relu_dropout(pool: nn.MaxPool2d, flatten: nn.Flatten, p: float, x: torch.Tensor) -> bool:
    """Whether ``pool`` (a ``models.MaxPoolReLU``), ``flatten`` and a training ``models.Dropout(p)`` of ``x`` can
    run as ``pool_relu_dropout``: 2x2 windows at stride 2, all of each image flattened, ``x`` channels-last with
    a multiple of 16 channels."""
    return (_plain_pooling(pool) and flatten.start_dim == 1 and flatten.end_dim == -1 and 0.0 < p < 1.0
            and x.device.type == "cpu" and x.dim() == 4 and x.shape[1] % 16 == 0 and min(x.shape[2:]) >= 2
            and x.numel() > 0 and x.dtype in (torch.float32, torch.bfloat16)
            and x.is_contiguous(memory_format=torch.channels_last) and _plain_eager() and library() is not None)


class _PoolReLUDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        from .models import dropout_threshold

        n, c, h, w = x.shape
        out = torch.empty((n, c * (h // 2) * (w // 2)), dtype=x.dtype)
        winners = torch.empty(out.shape, dtype=torch.uint8)
        scale = _scale(p, x.dtype)
        status = library().pool_relu_dropout_forward(int(x.dtype == torch.bfloat16), x.data_ptr(), n, h, w, c,
                                                     _torch_seed(), dropout_threshold(p), scale, out.data_ptr(),
                                                     winners.data_ptr(), torch.get_num_threads())
        _enough_memory(status, "pooling's buffers")
        ctx.save_for_backward(winners)
        ctx.scale, ctx.shape, ctx.dtype = scale, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (winners,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        grad = grad.to(ctx.dtype).contiguous()
        grad_in = torch.empty(ctx.shape, dtype=ctx.dtype, memory_format=torch.channels_last)
        status = library().pool_relu_dropout_backward(int(ctx.dtype == torch.bfloat16), grad.data_ptr(),
                                                      winners.data_ptr(), ctx.scale, n, h, w, c, grad_in.data_ptr(),
                                                      torch.get_num_threads())
        _enough_memory(status, "pooling's gradient buffers")
        return grad_in, None


def pool_relu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``Dropout(p)(flatten(relu(max_pool2d(x, 2)), 1))`` in training, one pass forward and one back: the
    outputs torch's layers give (the first largest of each window; NaN comes through), kept as ``relu_dropout``
    keeps them. Tutorial 003's (128 x 64 x 11 x 11, bfloat16, channels-last, 2 threads): forward and back 0.33
    ms against 0.67 ms in torch's layers; the whole recipe 1.09x (1.09-1.30, 3 alternated runs, AMD EPYC)."""
    return _PoolReLUDropout.apply(x, p)


# --------------------------------------------------------------------------- Adam with the weights' bfloat16 copy


class WeightCopy:
    """The bfloat16 copy of a Linear layer's weight and bias that ``Bf16Adam`` keeps current: leaf tensors the
    training forward pass uses in place of autocast's cast of the weights (the same values: the weights rounded
    to bfloat16), so their gradients arrive in bfloat16 without the cast back either."""

    def __init__(self, layer: nn.Linear):
        self.params = (layer.weight, layer.bias)
        self.copies = tuple(torch.empty_like(p, dtype=torch.bfloat16).requires_grad_() for p in self.params)
        self.versions: tuple[int, ...] | None = None

    def current(self) -> tuple[torch.Tensor, ...]:
        """The copies, refreshed from the weights where something else changed them (loading a checkpoint)."""
        versions = tuple(p._version for p in self.params)
        if versions != self.versions:
            with torch.no_grad():
                for copy, param in zip(self.copies, self.params, strict=True):
                    copy.copy_(param)
            self.versions = versions
        return self.copies


_ACTIVE = threading.local()  # the layers' copies while a training step of a Bf16Adam run is under way


def active_copies() -> dict[nn.Module, WeightCopy] | None:
    """The weight copies the forward pass should use now (inside ``Bf16Adam.autocast``), else None."""
    return getattr(_ACTIVE, "copies", None)


class WeightCopies:
    """What ``Bf16Adam``, ``Bf16RMSprop`` and ``Bf16SGD`` share: a ``WeightCopy`` per Linear layer of the network,
    the context in which the forward pass uses them, and their gradients to clear and to read."""

    copies: dict[nn.Module, WeightCopy]

    def _copy_weights(self, network: nn.Module) -> None:
        self.copies = {layer: WeightCopy(layer) for layer in network.children() if isinstance(layer, nn.Linear)}

    def autocast(self, autocast: torch.autocast) -> _CopiesInUse:
        """``autocast``, inside which the training forward pass uses the bfloat16 copies."""
        return _CopiesInUse(autocast, self.copies)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for weights in self.copies.values():
            for copy in weights.copies:
                if set_to_none:
                    copy.grad = None
                elif copy.grad is not None:
                    copy.grad.zero_()

    def _through_copies(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(weight, its copy, the copy's contiguous gradient) for each copy with a gradient."""
        return [(param, copy, copy.grad if copy.grad.is_contiguous() else copy.grad.contiguous())
                for weights in self.copies.values()
                for param, copy in zip(weights.params, weights.copies, strict=True) if copy.grad is not None]

    def _kernel_ready(self, param: torch.Tensor, *names: str) -> dict:
        """``param``'s state with the kernel's tensors ``names`` in place: zeros at first, and contiguous, as the
        kernel writes them by pointer (a loaded checkpoint's might not be)."""
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            for name in names:
                state[name] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        for name in names:
            if not state[name].is_contiguous():
                state[name] = state[name].contiguous()
        return state

    def _own_gradients(self) -> bool:
        """Whether any weight has a float32 gradient of its own (none when every step goes through the copies)."""
        return any(p.grad is not None for group in self.param_groups for p in group["params"])


class Bf16Adam(WeightCopies, torch.optim.Adam):
    """``torch.optim.Adam`` for a dense network trained under bfloat16 autocast on the CPU: each step reads the
    bfloat16 gradients of the layers' ``WeightCopy`` and writes the float32 weights, Adam's moments and the
    bfloat16 copy in one pass of the fused kernel. Autocast's casts of the weights to bfloat16 and of their
    gradients back, and torch's Adam step, cost about a fifth of tutorial 001's training step. The state is
    Adam's own (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints load either way."""

    def __init__(self, network: nn.Module, lr: float, betas: tuple[float, float], eps: float):
        super().__init__(network.parameters(), lr=lr, betas=betas, eps=eps, foreach=False)
        self._copy_weights(network)

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        lr, threads = float(group["lr"]), torch.get_num_threads()
        updates = self._through_copies()
        states = [self._kernel_ready(param, "exp_avg", "exp_avg_sq") for param, _, _ in updates]
        if states:
            torch._foreach_add_([state["step"] for state in states], 1.0)
        for (param, copy, grad), state in zip(updates, states, strict=True):
            t = float(state["step"])
            library().adam_bf16(param.data_ptr(), grad.data_ptr(), state["exp_avg"].data_ptr(),
                                state["exp_avg_sq"].data_ptr(), copy.data_ptr(), param.numel(), lr, beta1,
                                beta2, group["eps"], 1.0 - beta1**t, math.sqrt(1.0 - beta2**t), threads)
        return super().step(closure) if self._own_gradients() else None


class Bf16RMSprop(WeightCopies, torch.optim.RMSprop):
    """``torch.optim.RMSprop`` (no momentum, not centred) as ``Bf16Adam`` is Adam: one pass of the fused kernel
    from the copies' bfloat16 gradients to the float32 weights, the mean square and the copies. RMSprop's own
    state (``step``, ``square_avg``)."""

    def __init__(self, network: nn.Module, lr: float, alpha: float, eps: float):
        super().__init__(network.parameters(), lr=lr, alpha=alpha, eps=eps, foreach=False)
        self._copy_weights(network)

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        updates = self._through_copies()
        states = [self._kernel_ready(param, "square_avg") for param, _, _ in updates]
        if states:
            torch._foreach_add_([state["step"] for state in states], 1.0)
        lr, threads = float(group["lr"]), torch.get_num_threads()
        for (param, copy, grad), state in zip(updates, states, strict=True):
            library().rmsprop_bf16(param.data_ptr(), grad.data_ptr(), state["square_avg"].data_ptr(),
                                   copy.data_ptr(), param.numel(), lr, group["alpha"], group["eps"], threads)
        return super().step(closure) if self._own_gradients() else None


class Bf16SGD(WeightCopies, torch.optim.SGD):
    """``torch.optim.SGD`` (no momentum, no weight decay) as ``Bf16Adam`` is Adam: one pass of the fused kernel
    from the copies' bfloat16 gradients to the float32 weights and the copies. For tutorial 000, whose chain
    (``liverows``) then takes the copies: no cast of the weights to bfloat16 or of their gradients back."""

    def __init__(self, network: nn.Module, lr: float):
        super().__init__(network.parameters(), lr=lr, foreach=False)
        self._copy_weights(network)

    @torch.no_grad()
    def step(self, closure=None):
        lr, threads = float(self.param_groups[0]["lr"]), torch.get_num_threads()
        for param, copy, grad in self._through_copies():
            library().sgd_bf16(param.data_ptr(), grad.data_ptr(), copy.data_ptr(), param.numel(), lr, threads)
        return super().step(closure) if self._own_gradients() else None


class _CopiesInUse:
    """Autocast, and the layers' weight copies in use by the forward pass, for the length of a ``with``."""

    def __init__(self, autocast: torch.autocast, copies: dict[nn.Module, WeightCopy]):
        self.autocast, self.copies, self.before = autocast, copies, []

    def __enter__(self) -> None:
        self.autocast.__enter__()
        self.before.append(active_copies())
        _ACTIVE.copies = self.copies

    def __exit__(self, *exc) -> bool | None:
        _ACTIVE.copies = self.before.pop()
        return self.autocast.__exit__(*exc)


def bf16_optimizer(network: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A ``Bf16Adam`` or ``Bf16RMSprop`` in place of ``optimizer`` where it is plain Adam or RMSprop (one group, no
    weight decay, no momentum) over a ``FusedSequential`` of Linear layers on the CPU and the kernels could be
    built, a ``Bf16SGD`` for plain SGD where the network trains through ``liverows`` (tutorial 000); else
    ``optimizer`` itself."""
    from .models import FusedSequential

    if len(optimizer.param_groups) != 1 or optimizer.state:
        return optimizer
    group = optimizer.param_groups[0]
    plain = (group["weight_decay"] == 0 and not group.get("maximize") and not group.get("capturable")
             and not group.get("differentiable") and isinstance(group["lr"], float))
    layers = [m for m in network.children() if isinstance(m, nn.Linear)] if isinstance(network, FusedSequential) else []
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    dense = (bool(layers) and all(layer.bias is not None for layer in layers)
             and {id(p) for p in params} == {id(p) for p in network.parameters()}
             and all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in params))
    if not (plain and dense and library() is not None):
        return optimizer
    if type(optimizer) is torch.optim.Adam and not group["amsgrad"]:
        return Bf16Adam(network, lr=group["lr"], betas=group["betas"], eps=group["eps"])
    if isinstance(optimizer, torch.optim.RMSprop) and not group["momentum"] and not group["centered"]:
        return Bf16RMSprop(network, lr=group["lr"], alpha=group["alpha"], eps=group["eps"])
    if (type(optimizer) is torch.optim.SGD and network.live_rows and not group["momentum"]
            and not group["nesterov"]):
        return Bf16SGD(network, lr=group["lr"])
    return optimizer
