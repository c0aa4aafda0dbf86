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
