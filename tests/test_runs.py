"""runs.train_run: a run in its folder from Python — resume, checkpoints kept or removed, ensembles in processes."""

import json
from pathlib import Path

import pytest
import torch

from deepdigits import checkpoint, train
from deepdigits.classifier import member_processes, train_recipe
from deepdigits.data import Dataset
from deepdigits.errors import DeepDigitsError
from deepdigits.recipes import Recipe
from deepdigits.runs import default_out, run_folders, train_run


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def interrupt_in_epoch(monkeypatch, stop: int):
    """Ctrl-C in epoch ``stop`` of every run until the returned function is called."""
    original = train.TrainingRun.train_epoch

    def interrupted(self, epoch):
        if epoch == stop:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(train.TrainingRun, "train_epoch", interrupted)
    return lambda: monkeypatch.setattr(train.TrainingRun, "train_epoch", original)


# 001 and 004 train through the fused kernels where they can be built (ReLU-dropout, bfloat16 weight copies)
@pytest.mark.parametrize("recipe", ["tutorial-004", "tutorial-001"])
def test_a_run_interrupted_and_resumed_from_python_ends_as_the_uninterrupted_one(recipe, tiny, tmp_path,
                                                                                  monkeypatch):
    _, source = tiny
    out = tmp_path / "run"
    no_more_interruptions = interrupt_in_epoch(monkeypatch, 2)
    clf = train_run(recipe, out, dataset="tiny", data_dir=source, epochs=3, verbose=0, figures=False)
    assert clf.interrupted and len(clf.history) == 1
    # the bundle holds epoch 1, the checkpoint stays for resume
    assert json.loads((out / "model.json").read_text())["interrupted"] is True
    assert (out / "checkpoint" / "epoch-000001").is_dir()
    assert checkpoint.read_options(out / "checkpoint") == {"checkpoint_every": 1, "keep_checkpoints": False}

    no_more_interruptions()
    resumed = train_run(resume=out, data_dir=source, verbose=0, figures=False)
    assert not resumed.interrupted and [e["epoch"] for e in resumed.history] == [1, 2, 3]
    assert not (out / "checkpoint").exists()  # removed with the finished run's bundle
    uninterrupted = train_recipe(recipe, dataset="tiny", data_dir=source, epochs=3, verbose=0)
    assert same_tensors(uninterrupted.network.state_dict(), resumed.network.state_dict())
    from safetensors.torch import load_file

    assert same_tensors(uninterrupted.network.state_dict(), load_file(out / "model.safetensors"))
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "model.json", "model.safetensors"]


def test_keep_checkpoints_is_recorded_and_kept_on_resume(tiny, tmp_path, monkeypatch):
    _, source = tiny
    out = tmp_path / "run"
    no_more_interruptions = interrupt_in_epoch(monkeypatch, 2)
    train_run("tutorial-004", out, dataset="tiny", data_dir=source, epochs=2, keep_checkpoints=True,
              checkpoint_every=1, verbose=0, figures=False)
    no_more_interruptions()
    train_run(resume=out, data_dir=source, verbose=0, figures=False)  # keep_checkpoints as the run recorded
    assert (out / "checkpoint" / "epoch-000002").is_dir() and (out / "model.json").is_file()


def test_a_run_stopped_before_its_first_epoch_leaves_no_folder(tiny, tmp_path, monkeypatch):
    _, source = tiny
    out = tmp_path / "runs" / "empty"
    interrupt_in_epoch(monkeypatch, 1)
    clf = train_run("tutorial-004", out, dataset="tiny", data_dir=source, epochs=2, verbose=0, figures=False)
    assert clf.history == [] and clf.interrupted
    assert not out.exists() and (tmp_path / "runs").is_dir()  # only the run's own folder goes


def test_refusals_are_one_line(tiny, tmp_path):
    _, source = tiny
    with pytest.raises(DeepDigitsError, match=r"^checkpoint_every: expected 1-1000000, got 0$"):
        train_run("tutorial-004", tmp_path / "a", dataset="tiny", data_dir=source, checkpoint_every=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DeepDigitsError, match="exists and is not a folder"):
        train_run("tutorial-004", tmp_path / "file", dataset="tiny", data_dir=source, verbose=0)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found"):
        train_run(resume=tmp_path / "nothing", verbose=0)
    assert not (tmp_path / "nothing").exists()


def test_run_folders_and_default_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_out("fast").as_posix() == "runs/fast"
    (tmp_path / "runs" / "fast").mkdir(parents=True)
    (tmp_path / "runs" / "fast-2").mkdir()
    assert default_out("fast").as_posix() == "runs/fast-3"
    assert run_folders("fast", "x") == (Path("x"), Path("x/checkpoint"))
    assert run_folders(None, None, "runs/fast")[0].as_posix() == "runs/fast"  # resumed: the run's own folder


def test_member_processes():
    assert member_processes(3, cores=1) == 1  # one core: in this process
    assert member_processes(3, cores=2) == 2 and member_processes(3, cores=64) == 3
    assert member_processes(3, 2) == 2 and member_processes(3, 8) == 3 and member_processes(3, 1) == 1
    with pytest.raises(DeepDigitsError, match="processes: expected 1 or more, got 0"):
        member_processes(3, 0)


def test_ensemble_members_trained_in_processes_equal_those_trained_one_after_another(mnist, tmp_path):
    ds = Dataset(name="mnist", x_train=mnist.x_train[:1200], y_train=mnist.y_train[:1200], x_test=mnist.x_test[:300],
                 y_test=mnist.y_test[:300], class_names=mnist.class_names, source="test slice",
                 checksums=mnist.checksums)
    recipe = Recipe("ensemble-test", "ensemble", "adamw", 0.001, 128, 1, seed=3, members=2,
                    member_recipe="tutorial-004")
    out = tmp_path / "ens"
    parallel = train_run(recipe, out, processes=2, dataset=ds, epochs=1, verbose=0, figures=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 workers on this machine: the same float additions
    try:
        sequential = train_recipe(recipe, dataset=ds, epochs=1, processes=1, verbose=0)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(parallel.network.members, sequential.network.members, strict=True):
        assert same_tensors(a.state_dict(), b.state_dict())
    assert [m["seed"] for m in parallel.recipe["members"]] == [3, 4]
    # the same on a CPU; on a GPU the temperature's fit differs in the 8th digit (0.47588748 against 0.47588749)
    assert parallel.temperature == pytest.approx(sequential.temperature, rel=1e-6)
    # scored here on 2 threads, there on 1: the same predictions, sums in another order
    assert parallel.metrics["confusion_matrix"] == sequential.metrics["confusion_matrix"]
    assert parallel.metrics["loss"] == pytest.approx(sequential.metrics["loss"], rel=1e-6)
    assert parallel.calibration["fit_on"] == sequential.calibration["fit_on"]
    # the workers' folder is gone: the bundle alone is left
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "model.json", "model.safetensors"]


def test_a_failing_member_process_is_one_line_and_leaves_no_folder(mnist, tmp_path):
    ds = Dataset(name="mnist", x_train=mnist.x_train[:600], y_train=mnist.y_train[:600], x_test=mnist.x_test[:100],
                 y_test=mnist.y_test[:100], class_names=mnist.class_names, source="test slice",
                 checksums=mnist.checksums)
    recipe = Recipe("ensemble-test", "ensemble", "adamw", 0.001, 128, 1, members=2, member_recipe="no-such-recipe")
    out = tmp_path / "ens"
    with pytest.raises(DeepDigitsError, match=r"^ensemble member \d failed: unknown recipe 'no-such-recipe'; "
                                              r"expected one of: [^\n]*$"):
        train_run(recipe, out, processes=2, dataset=ds, verbose=0, figures=False)
    assert not out.exists()


PARENT = """
import sys
from deepdigits.data import load_dataset, Dataset
from deepdigits.recipes import Recipe
from deepdigits.runs import train_run

full = load_dataset("mnist", data_dir=sys.argv[2])
ds = Dataset(name="mnist", x_train=full.x_train[:1200], y_train=full.y_train[:1200], x_test=full.x_test[:100],
             y_test=full.y_test[:100], class_names=full.class_names, source="test slice", checksums=full.checksums)
recipe = Recipe("ensemble-test", "ensemble", "adamw", 0.001, 128, 1, members=2, member_recipe="tutorial-004")
train_run(recipe, sys.argv[1], processes=2, dataset=ds, epochs=500, verbose=0, figures=False)
"""


def worker_pids(work: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(work).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_member_processes_stop_when_their_parent_is_killed(data_root, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ens"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(out), str(data_root)], env=env)
    try:
        deadline = time.monotonic() + 60
        # both workers are started one after the other: wait for the second, not just the first
        while time.monotonic() < deadline and not (list(out.glob(".members-*/member-2.json")) and
                                                    len(worker_pids(next(out.glob(".members-*")))) >= 2):
            time.sleep(0.2)
        work = next(out.glob(".members-*"))
        assert len(worker_pids(work)) == 2
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 15
    while worker_pids(work) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker_pids(work) == []
