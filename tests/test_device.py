"""Device and precision: bfloat16 only where native, the settings line says which."""

import torch

import deepdigits.device as device
from deepdigits import Classifier


def test_bf16_is_used_only_where_the_device_computes_it_natively(mnist, monkeypatch):
    def run(native: bool) -> tuple[Classifier, object]:
        monkeypatch.setattr(device, "native_bf16", lambda _: native)
        clf = Classifier("strided-cnn", seed=0)
        history = clf.fit(mnist.x_train[:768], mnist.y_train[:768], epochs=1, batch_size=192, optimizer="adamw",
                          learning_rate=0.01, bf16=True, verbose=0)
        return clf, history

    emulated, history = run(native=False)
    assert history.precision == "float32" and emulated.precision == "float32"
    plain = Classifier("strided-cnn", seed=0)
    plain.fit(mnist.x_train[:768], mnist.y_train[:768], epochs=1, batch_size=192, optimizer="adamw",
              learning_rate=0.01, verbose=0)
    # exactly the float32 run on a CPU; on a GPU two float32 runs differ in the last bits already (cuDNN's
    # backward kernels sum in varying order: up to 2e-5 after these 4 steps on an H100; bfloat16 differs more)
    same = {"rtol": 0, "atol": 0} if not torch.cuda.is_available() else {"rtol": 1e-3, "atol": 1e-4}
    for a, b in zip(emulated.network.parameters(), plain.network.parameters(), strict=True):
        torch.testing.assert_close(a, b, **same)

    native, history = run(native=True)
    assert history.precision == "bfloat16" and native.precision == "bfloat16"
    assert any(not torch.equal(a, b) for a, b in zip(native.network.parameters(), plain.network.parameters(),
                                                         strict=True))


def test_settings_line_says_which_precision_training_uses(monkeypatch):
    cpu = torch.device("cpu")
    assert device.precision_text(False, cpu) == "float32"
    monkeypatch.setattr(device, "native_bf16", lambda _: True)
    assert device.precision_text(True, cpu) == "bfloat16 autocast"
    monkeypatch.setattr(device, "native_bf16", lambda _: False)
    assert device.precision_text(True, cpu).startswith("float32 (this processor has no native bfloat16")


def test_dense_networks_score_in_larger_chunks_than_convolutional_ones():
    from deepdigits.device import DENSE_INFERENCE_BATCH, INFERENCE_BATCH, inference_batch
    from deepdigits.models import build_model

    assert inference_batch(build_model("tutorial-000")) == DENSE_INFERENCE_BATCH == 1000
    assert inference_batch(build_model("tutorial-003")) == INFERENCE_BATCH == 128




# A training step's heap traffic: thirty 1 MiB blocks alive at once, then all freed; the number of fresh pages
# the kernel had to fault in over 5 such steps after 3 warm-up ones.
HEAP_STEPS = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def step():
    blocks = [libc.malloc(1 << 20) for _ in range(30)]
    for block in blocks:
        libc.memset(block, 1, 1 << 20)
    for block in blocks:
        libc.free(block)
def faults():
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""


def test_training_keeps_freed_memory_for_its_next_step_instead_of_faulting_in_new_pages():
    import platform
    import subprocess
    import sys

    import pytest

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's malloc only")
    # glibc's defaults, in a fresh process: the freed 30 MiB at the top of the heap goes back to the kernel
    # and every step faults it in again
    done = subprocess.run([sys.executable, "-c", HEAP_STEPS + "print(faults())"], capture_output=True, text=True,
                          check=True)
    default = int(done.stdout)
    assert device.keep_freed_memory() and device.keep_freed_memory()  # once per process; the second a no-op
    namespace: dict = {}
    exec(HEAP_STEPS, namespace)
    kept = namespace["faults"]()
    assert default >= 5 * 1000 and kept <= default // 20, (kept, default)
