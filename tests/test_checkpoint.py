"""Checkpoints: a resumed run ends bit-identical to an uninterrupted one; damaged or foreign checkpoints are refused."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from deepdigits import checkpoint, train
from deepdigits.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from deepdigits.classifier import train_recipe
from deepdigits.cli import main
from deepdigits.data import Dataset
from deepdigits.preprocess import to_tensor
from deepdigits.train import fit

REPO = Path(__file__).resolve().parents[1]


def small_bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(8 * 12 * 12, 10))


# Every random stream and every piece of optimizer state a checkpoint must carry: dropout (torch's
# global generator), augmentation, the shuffle, AdamW's moments and step, the one-cycle schedule,
# batch norm's running statistics and the weight average with its update count.
OPTIONS = dict(optimizer="adamw", learning_rate=0.01, batch_size=100, epochs=3, weight_decay=0.01,
               schedule="onecycle", augment=True, label_smoothing=0.1, ema_decay=0.9, channels_last=True,
               verbose=0)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def without_seconds(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in epochs]


@pytest.fixture(scope="module")
def small(mnist):
    return to_tensor(mnist.x_train[:1000]), torch.from_numpy(mnist.y_train[:1000]).long()


CPU = torch.device("cpu")


def test_fit_resumed_from_disk_is_bit_identical(small, tmp_path):
    # Bit-identical is the promise on a CPU; on a GPU two uninterrupted runs already differ in the last bits
    # (cuDNN's backward kernels), so there the resumed run is compared within float tolerance (below).
    x, y = small
    uninterrupted = small_bn_cnn()
    expected = fit(uninterrupted, x, y, device=CPU, **OPTIONS)

    class Killed(Exception):
        pass

    def write_then_die(epoch: int, state: dict) -> None:
        save_checkpoint(tmp_path, epoch, state, {"note": "test"})
        raise Killed

    with pytest.raises(Killed):
        fit(small_bn_cnn(), x, y, checkpoint_every=1, on_checkpoint=write_then_die, device=CPU, **OPTIONS)
    state, document = load_checkpoint(tmp_path)
    assert document["epoch"] == 1 and document["note"] == "test"
    assert "optimizer.state.0.exp_avg" in json.dumps(document["state"])  # tensors by flattened key
    assert document["state"]["optimizer"]["state"]["$int_keys"]["0"]["step"] == {"$scalar": 10.0, "dtype": "float32"}

    resumed = small_bn_cnn()
    history = fit(resumed, x, y, resume_from=state, device=CPU, **OPTIONS)
    assert_same_tensors(uninterrupted.state_dict(), resumed.state_dict())
    assert without_seconds(history.epochs) == without_seconds(expected.epochs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_resumed_on_a_gpu_ends_within_float_tolerance(small, tmp_path):
    x, y = small
    cuda = torch.device("cuda")
    uninterrupted = small_bn_cnn()
    fit(uninterrupted, x, y, device=cuda, **OPTIONS)

    class Killed(Exception):
        pass

    def write_then_die(epoch: int, state: dict) -> None:
        save_checkpoint(tmp_path, epoch, state, {})
        raise Killed

    with pytest.raises(Killed):
        fit(small_bn_cnn(), x, y, checkpoint_every=1, on_checkpoint=write_then_die, device=cuda, **OPTIONS)
    state, _ = load_checkpoint(tmp_path)
    assert state["rng"][0]["cuda"] is not None  # the GPU's generator travels too
    resumed = small_bn_cnn()
    fit(resumed, x, y, resume_from=state, device=cuda, **OPTIONS)
    for name, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_checkpoint_round_trip_keeps_types(tmp_path):
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": torch.tensor(7.0),
             "betas": (0.9, 0.999), "by_param": {3: {"m": torch.ones(2)}}, "none": None,
             "rng": torch.zeros(5, dtype=torch.uint8)}
    save_checkpoint(tmp_path, 4, state, {})
    loaded, document = load_checkpoint(tmp_path)
    assert document["epoch"] == 4 and loaded["betas"] == (0.9, 0.999) and loaded["none"] is None
    assert torch.equal(loaded["a"], state["a"]) and loaded["step"].dtype == torch.float32 and loaded["step"].item() == 7
    assert torch.equal(loaded["by_param"][3]["m"], torch.ones(2)) and loaded["rng"].dtype == torch.uint8
    save_checkpoint(tmp_path, 5, state, {})  # the newer replaces the older
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["epoch-000005"]
    with pytest.raises(CheckpointError, match="not a tensor or JSON value"):
        save_checkpoint(tmp_path, 6, {"bad": object()}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-000005"]  # nothing half-written left


@pytest.mark.parametrize("damage, message", [
    ("json", "damaged JSON"),
    ("checksum", "checksum mismatch"),
    ("missing-tensor", "is missing from checkpoint.safetensors"),
    ("no-tensors", "missing; the checkpoint is incomplete"),
    ("format", "not a deepdigits checkpoint"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, damage, message):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3), "v": torch.zeros(2)}, {})
    folder = tmp_path / "epoch-000001"
    state_file, tensors_file = folder / checkpoint.STATE_FILE, folder / checkpoint.TENSORS_FILE
    document = json.loads(state_file.read_text())
    if damage == "json":
        state_file.write_text(state_file.read_text()[:-20])
    elif damage == "checksum":
        content = bytearray(tensors_file.read_bytes())
        content[-1] ^= 0xFF
        tensors_file.write_bytes(bytes(content))
    elif damage == "missing-tensor":
        document["state"]["w"] = {"$tensor": "optimizer.state.3.exp_avg"}
        state_file.write_text(json.dumps(document))
    elif damage == "no-tensors":
        tensors_file.unlink()
    elif damage == "format":
        document["format"] = "something-else"
        state_file.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(tmp_path)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_no_checkpoint_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------- train_recipe and the CLI


def sliced(mnist, n: int = 3000) -> Dataset:
    return Dataset(name="mnist", x_train=mnist.x_train[:n], y_train=mnist.y_train[:n], x_test=mnist.x_test[:500],
                   y_test=mnist.y_test[:500], class_names=mnist.class_names, source="test slice",
                   checksums=mnist.checksums)


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from deepdigits import checkpoint
    from deepdigits.classifier import train_recipe
    from deepdigits.data import Dataset, load_dataset
    from deepdigits.progress import ProgressBar

    root, data = Path(sys.argv[1]), sys.argv[2]
    full = load_dataset("mnist", data_dir=data)
    ds = Dataset(name="mnist", x_train=full.x_train[:3000], y_train=full.y_train[:3000], x_test=full.x_test[:500],
                 y_test=full.y_test[:500], class_names=full.class_names, source="test slice",
                 checksums=full.checksums)

    def end_epoch(self, epoch, metrics):  # the summary line comes once the epoch's checkpoint is on disk
        assert (root / f"epoch-{epoch:06d}" / checkpoint.STATE_FILE).is_file()
        print(f"epoch {epoch} done", flush=True)
        time.sleep(600)  # killed here

    ProgressBar.end_epoch = end_epoch
    train_recipe("tutorial-004", dataset=ds, epochs=3, verbose=0, checkpoint_dir=root)
""")


def test_killed_training_resumes_to_the_weights_of_an_uninterrupted_run(mnist, data_root, tmp_path, monkeypatch):
    # on the CPU, where the promise is bit-identical weights (the child hides any GPU, the parent pins the CPU)
    monkeypatch.setattr(train, "default_device", lambda: CPU)
    ds = sliced(mnist)
    root = tmp_path / "run" / "checkpoint"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(data_root)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line.strip() == "epoch 1 done", child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    resumed = train_recipe(dataset=ds, verbose=0, resume=tmp_path / "run")
    uninterrupted = train_recipe("tutorial-004", dataset=ds, epochs=3, verbose=0)
    assert_same_tensors(uninterrupted.network.state_dict(), resumed.network.state_dict())
    assert len(resumed.history) == 3 and resumed.recipe == uninterrupted.recipe
    assert without_seconds(resumed.history) == without_seconds(uninterrupted.history)
    assert has_epoch(root, 3)  # the Python API leaves the checkpoint to its caller


def has_epoch(root: Path, epoch: int) -> bool:
    return (root / f"epoch-{epoch:06d}").is_dir()


def test_a_checkpoint_of_another_recipe_or_data_set_is_refused(tiny, tmp_path):
    _, source = tiny
    root = tmp_path / "run" / "checkpoint"
    train_recipe("tutorial-004", dataset="tiny", data_dir=source, epochs=1, verbose=0, checkpoint_dir=root)
    with pytest.raises(CheckpointError, match=r"a checkpoint of recipe 'tutorial-004'.*not of 'tutorial-002'"):
        train_recipe("tutorial-002", dataset="tiny", data_dir=source, epochs=1, verbose=0, resume=root)
    with pytest.raises(CheckpointError, match=r"epochs 1.*not of 'tutorial-004' \(epochs 2"):
        train_recipe(dataset="tiny", data_dir=source, epochs=2, verbose=0, resume=root)
    from deepdigits.data import load_dataset

    full = load_dataset("tiny", data_dir=source)
    other = Dataset(name="tiny", x_train=full.x_train[:20], y_train=full.y_train[:20], x_test=full.x_test,
                    y_test=full.y_test, class_names=full.class_names, source="x", checksums=full.checksums)
    with pytest.raises(CheckpointError, match="another data set"):
        train_recipe(dataset=other, verbose=0, resume=root)
    with pytest.raises(CheckpointError, match="unfinished run; resume it"):  # a new run never overwrites it
        train_recipe("tutorial-004", dataset="tiny", data_dir=source, epochs=1, verbose=0, checkpoint_dir=root)


def test_cli_ctrl_c_keeps_the_checkpoint_and_resume_finishes_the_run(tiny, tmp_path, monkeypatch, capsys):
    _, source = tiny
    out = tmp_path / "run"
    original = train.TrainingRun.train_epoch

    def interrupted_in_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    # A first run trains epoch 1 and is interrupted in epoch 2 (the CLI cannot name the tiny data set:
    # the Python API writes the checkpoint as the CLI would, then the CLI resumes it).
    monkeypatch.setattr(train.TrainingRun, "train_epoch", interrupted_in_epoch_2)
    clf = train_recipe("tutorial-004", dataset="tiny", data_dir=source, epochs=3, verbose=0,
                       checkpoint_dir=out / "checkpoint")
    assert clf.interrupted and len(clf.history) == 1
    with checkpoint.kept_through_save(out):
        clf.save(out)
    assert (out / "model.json").is_file() and has_epoch(out / "checkpoint", 1)

    # resumed, interrupted again in epoch 2: the bundle holds epoch 1 and the checkpoint stays
    assert main(["train", "--resume", str(out), "--data-dir", str(source), "--quiet"]) == 130
    assert "--resume" in capsys.readouterr().err
    assert has_epoch(out / "checkpoint", 1) and (out / "model.json").is_file()

    monkeypatch.setattr(train.TrainingRun, "train_epoch", original)
    assert main(["train", "--resume", str(out), "--data-dir", str(source), "--quiet"]) == 0
    assert not (out / "checkpoint").exists()  # removed with the finished run's bundle
    meta = json.loads((out / "model.json").read_text())
    assert [e["epoch"] for e in meta["history"]] == [1, 2, 3] and meta["recipe"]["epochs"] == 3
    assert meta["distributed"] == {"world_size": 1, "backend": None}
    uninterrupted = train_recipe("tutorial-004", dataset="tiny", data_dir=source, epochs=3, verbose=0)
    from safetensors.torch import load_file

    assert_same_tensors(uninterrupted.network.state_dict(), load_file(out / "model.safetensors"))


def test_cli_keep_checkpoints_and_refusals(tiny, tmp_path, capsys):
    _, source = tiny
    out = tmp_path / "run"
    train_recipe("tutorial-004", dataset="tiny", data_dir=source, epochs=1, verbose=0,
                 checkpoint_dir=out / "checkpoint")
    checkpoint.write_options(out / "checkpoint", {"keep_checkpoints": True, "checkpoint_every": 1})
    assert main(["train", "--resume", str(out), "--data-dir", str(source), "--quiet"]) == 0
    assert has_epoch(out / "checkpoint", 1) and (out / "model.json").is_file()  # kept, as recorded
    code = main(["train", "--resume", str(out), "--recipe", "tutorial-002", "--data-dir", str(source)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "not of 'tutorial-002'" in err
    (out / "checkpoint" / "epoch-000001" / checkpoint.STATE_FILE).write_text("{")
    code = main(["train", "--resume", str(out), "--data-dir", str(source)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "damaged JSON" in err
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--quiet"]) == 1
    assert "no checkpoint found" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
