"""Where and in what arithmetic networks run: device choice, native bfloat16, channels-last, inference chunks."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Inference runs in chunks of this many images with channels-last weights and inputs: on 2 CPU cores the
# `best` network scored the 10,000 test images 3.7x as fast that way as in chunks of 2,000 in the plain
# layout (2,279 against 607 images/s on an AVX2 machine; 3,936 against 1,126 on an AVX-512 one): large
# chunks fall out of cache, and oneDNN's convolutions prefer channels-last.
INFERENCE_BATCH = 128

# Networks without convolutions score in chunks of this many: their products gain from long rows and their
# activations stay small. Tutorial 000's validation pass over 6,000 images under bfloat16 autocast took 0.024 s
# in chunks of 1,000 against 0.047 s in chunks of 128 (1.96x; float32: 1.54x), 6 alternated rounds, 2 busy
# cores; tutorial 003's convolutions were quickest at 128 (0.18 s against 0.25 s at 500).
DENSE_INFERENCE_BATCH = 1000


def inference_batch(network: nn.Module) -> int:
    """The chunk ``network`` scores many images in: ``INFERENCE_BATCH`` with convolutions, else larger."""
    convolutional = any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in network.modules())
    return INFERENCE_BATCH if convolutional else DENSE_INFERENCE_BATCH


# Inference on this many images or fewer runs on one CPU thread: waking a second thread for each of the
# network's small operations costs more than it saves. predict_proba of one image with the built-in model
# (`best`): median 0.90 ms (90th percentile 1.07 ms) on one thread against 1.65-1.95 ms on two waiting
# passively (OMP_WAIT_POLICY, see deepdigits/__init__) and 0.80 ms (90th percentile 13 ms) on two spinning,
# 200 calls each on 2 cores shared with other work. 4 images: 2.06 ms against 2.27 ms; 16: 8.6 against 6.6.
FEW_IMAGES = 4


@contextmanager
def threads_for(n_images: int) -> Iterator[None]:
    """Run the block on one CPU thread when it infers on ``FEW_IMAGES`` images or fewer; else as it was."""
    before = torch.get_num_threads()
    if n_images > FEW_IMAGES or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# glibc's malloc serves blocks of 128 KiB and more (its threshold rises only as such blocks are freed) with
# fresh pages from the kernel and gives freed memory at the top of its heap back, so a training step that
# allocates the same activations every step faulted in ~5,000 new pages (20 MB) a step for tutorial 003.
# Keeping freed memory for the next step (mallopt: blocks up to 32 MiB from the heap, no trimming below
# 1 GiB free) left none: CPU time a step 30.7 ms against 36.5 ms for tutorial 003 (1.19x; system time 1.1 ms
# against 4.9) and 5.4 ms against 6.6 ms for tutorial 000 (1.22x), 4 alternated fresh processes of 40 steps
# each (the same settings through GLIBC_TUNABLES), 2 cores shared with other work (load 6.8-7.5).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_KEEP_BELOW = 32 << 20  # the largest threshold glibc accepts on 64-bit machines
_TRIM_ABOVE = 1 << 30
_kept: bool | None = None  # None: not tried yet in this process


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep memory that training frees for its next step (once per process; Linux with glibc
    only): a process that trained keeps up to its peak heap until it ends. Returns whether the setting holds."""
    global _kept
    if _kept is None:
        _kept = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            import ctypes

            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _kept = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
    return _kept


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: CUDA GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX.

    Elsewhere bfloat16 is emulated and slow: on an AVX2-only CPU (2 cores) a training step of ``best-cnn``
    at batch 128 took 2,354 ms under bfloat16 autocast against 226 ms in float32, and one of
    ``strided-cnn`` at batch 192 116 ms against 13 ms, so ``fit`` trains in float32 there.
    """
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4 had no including_emulation
            return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return any(getattr(torch.cpu, name, lambda: False)()
                   for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # Arm: BF16 dot-product instructions


def training_precision(bf16: bool, device: torch.device) -> str:
    """What ``fit`` trains in on ``device``: "bfloat16" where asked for and native, else "float32"."""
    return "bfloat16" if bf16 and native_bf16(device) else "float32"


def precision_text(bf16: bool, device: torch.device) -> str:
    """The arithmetic ``fit`` will train in, as the settings line reports it."""
    if training_precision(bf16, device) == "bfloat16":
        return "bfloat16 autocast"
    if bf16:
        return "float32 (this processor has no native bfloat16, where autocast runs about 10x slower)"
    return "float32"


def channels_last(network: nn.Module) -> nn.Module:
    """Switch ``network``'s convolution weights to channels-last in place, unless they already are."""
    # any kernel, not the first: a (C, 1, k, k) kernel of a one-channel input is contiguous in both layouts
    kernels = [p for p in network.parameters() if p.dim() == 4]
    if any(not k.is_contiguous(memory_format=torch.channels_last) for k in kernels):
        network.to(memory_format=torch.channels_last)
    return network


def prefers_channels_last(network: nn.Module, device: torch.device) -> bool:
    """Whether ``fit`` trains ``network`` channels-last on ``device`` though its recipe does not ask for it:
    on the CPU wherever it has 2-D convolutions, oneDNN's quickest layout there (one epoch of tutorial 003
    took 1.33x less time, 1.21-1.45x, 2 runs each alternated on 2 busy cores: max pooling alone ran 5x as
    fast). The layout changes no weight or function, only the order of float additions."""
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in network.modules())


# Forward multiply-adds per training batch below which ``fit`` trains on one CPU thread. A second thread
# has to be woken for each operation, which costs more than such operations do: one epoch of tutorial 002
# (7,960 parameters, batch 32: 255,000) took 3.37x less time on one thread than on two (3.26-3.50x, 3 runs
# each, alternated, 2 cores shared with other work); one (32, 784) x (784, 10) product 30 us against 187 us.
SINGLE_THREAD_WORK = 4_000_000


def training_threads(network: nn.Module, batch_size: int, device: torch.device) -> int | None:
    """The CPU threads ``fit`` trains ``network`` with: 1 for a dense network whose batch costs less than
    ``SINGLE_THREAD_WORK`` multiply-adds, else None (torch's own count). A function of the network and batch
    alone, so a seed gives the same weights on every run, and a resumed run those of the uninterrupted one."""
    if device.type != "cpu" or any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in network.modules()):
        return None
    work = sum(m.in_features * m.out_features for m in network.modules() if isinstance(m, nn.Linear)) * batch_size
    return 1 if work < SINGLE_THREAD_WORK else None

