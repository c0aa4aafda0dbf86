"""Data-parallel training: two gloo processes on localhost train one run; shards, weights and files checked."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from deepdigits import distributed
from deepdigits.train import steps_per_epoch

REPO = Path(__file__).resolve().parents[1]

# Each process runs ``deepdigits train`` as torchrun would start it, on the first 1,200 training images
# (the data loader is swapped for a slice), and reports on stdout what the test checks: the indices of
# its shards in epoch 1, digests of its raw and averaged weights when training ends, a comparison of
# synchronised batch norm with plain batch norm over the whole batch, and of a data-parallel ``fit``
# with one process's.
CHILD = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from deepdigits import classifier, distributed, train
    from deepdigits.cli import main
    from deepdigits.data import Dataset, load_dataset

    rank, data, out = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
    full = load_dataset("mnist", data_dir=data)
    sliced = Dataset(name="mnist", x_train=full.x_train[:1200], y_train=full.y_train[:1200],
                     x_test=full.x_test[:200], y_test=full.y_test[:200], class_names=full.class_names,
                     source="test slice", checksums=full.checksums)
    classifier.load_dataset = lambda name, data_dir=None: sliced
    report = {"rank": rank, "shards": []}

    def digest(state):
        h = hashlib.sha256()
        for key, value in state.items():
            h.update(key.encode()); h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    distributed.setup()  # as train_recipe does; main leaves the group at its end
    # synchronised batch norm against plain batch norm over the whole batch (every process holds all of it),
    # on images (channels-first and channels-last) and on features (BatchNorm1d)
    report["bn"] = {}
    for name, shape, layer, layout in (("2d", (6, 3, 4, 4), torch.nn.BatchNorm2d, torch.contiguous_format),
                                       ("2d-channels-last", (6, 3, 4, 4), torch.nn.BatchNorm2d, torch.channels_last),
                                       ("1d", (6, 3), torch.nn.BatchNorm1d, torch.contiguous_format)):
        torch.manual_seed(0)
        x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=layout)
        plain = layer(3)
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5); plain.bias.uniform_(-1, 1)
        synced = layer(3)
        synced.load_state_dict(plain.state_dict())
        distributed.sync_batch_norm(synced)
        weights = torch.arange(x.numel(), dtype=torch.float32).reshape(shape).sin()
        full_x = x.clone().requires_grad_()
        (plain(full_x) * weights).sum().backward()
        part = x[rank::2].clone().requires_grad_()
        (synced(part) * weights[rank::2]).sum().backward()
        grads = distributed.all_reduce_sum(torch.cat([synced.weight.grad, synced.bias.grad]))
        report["bn"][name] = {
            "forward": (synced(part) - plain(full_x)[rank::2]).abs().max().item(),
            "input_grad": (part.grad - full_x.grad[rank::2]).abs().max().item(),
            "param_grad": (grads - torch.cat([plain.weight.grad, plain.bias.grad])).abs().max().item(),
            "running_mean": (synced.running_mean - plain.running_mean).abs().max().item(),
            "running_var": (synced.running_var - plain.running_var).abs().max().item(),
        }
    # data-parallel against one process: the same global batches, so the same weights up to rounding
    from deepdigits.models import build_model
    from deepdigits.preprocess import to_tensor
    xs, ys = to_tensor(full.x_train[:800]), torch.from_numpy(full.y_train[:800]).long()
    options = dict(optimizer="rmsprop", learning_rate=0.001, batch_size=100, epochs=2, verbose=0)
    alone, together = build_model("tutorial-004", seed=0), build_model("tutorial-004", seed=0)
    train.fit(alone, xs, ys, distributed_training=False, **options)
    train.fit(together, xs, ys, **options)
    report["ddp_vs_alone"] = max((a - b).abs().max().item() for a, b in
                                 zip(alone.state_dict().values(), together.state_dict().values()))

    shard = train.TrainingRun.shard
    def recording_shard(self, batch):
        idx = shard(self, batch)
        if len(report["shards"]) < self.steps:  # epoch 1
            report["shards"].append(idx.tolist())
        report["n"] = len(self.x)
        return idx
    train.TrainingRun.shard = recording_shard

    finish = train.TrainingRun.finish
    def reporting_finish(self):
        report["network"] = digest(self.network.state_dict())
        report["average"] = digest(self.averaged.module.state_dict())
        report["synchronised"] = sum(isinstance(m, distributed._Synchronised) for m in self.network.modules())
        first = next(m for m in self.network.modules() if isinstance(m, torch.nn.Conv2d))
        with torch.no_grad(), self.autocast:
            out = first(self.x[:2])
        report["first_conv"] = {"weight_strides": list(first.weight.stride()),
                                "output_channels_last": out.is_contiguous(memory_format=torch.channels_last)
                                and not out.is_contiguous()}
        return finish(self)
    train.TrainingRun.finish = reporting_finish

    code = main(["train", "--recipe", "best", "--epochs", "1", "--batch-size", "100", "--data-dir", data,
                 "--out", f"{out}/rank{rank}", "--keep-checkpoints", "--quiet"])

    print("REPORT " + json.dumps(report), flush=True)
    sys.exit(code)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_one_run(data_root, tmp_path):
    port = free_port()
    children = []
    for rank in range(2):
        path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU, as in CI
        children.append(subprocess.Popen([sys.executable, "-c", CHILD, str(data_root), str(tmp_path)], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        reports.append(json.loads(next(line for line in out.splitlines() if line.startswith("REPORT "))[7:]))
    first, second = sorted(reports, key=lambda r: r["rank"])

    # the same weights, raw and averaged, on both processes at the end of training
    assert first["network"] == second["network"] and first["average"] == second["average"]
    assert first["synchronised"] == second["synchronised"] == 5  # best-cnn's five batch-norm layers
    # the first convolution (one input channel) stays channels-last under DDP on the CPU, so every layer after
    # it runs channels-last as in one process (made contiguous, tutorial 003's steps took 2.2x as long)
    for report in reports:
        assert report["first_conv"]["output_channels_last"], report["first_conv"]
        assert report["first_conv"]["weight_strides"][1] == 1

    # an epoch's two shards are disjoint and together are the epoch: every training image once
    n = first["n"]
    assert len(first["shards"]) == len(second["shards"]) == steps_per_epoch(n, 100, 2)
    for a, b in zip(first["shards"], second["shards"], strict=True):
        assert not set(a) & set(b) and abs(len(a) - len(b)) <= 1
    seen = [i for shards in (first["shards"], second["shards"]) for batch in shards for i in batch]
    assert sorted(seen) == list(range(n))

    # only rank 0 wrote files: the bundle (recording the world) and the kept checkpoint
    assert not (tmp_path / "rank1").exists()
    meta = json.loads((tmp_path / "rank0" / "model.json").read_text())
    assert meta["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert (tmp_path / "rank0" / "checkpoint" / "epoch-000001" / "checkpoint.json").is_file()
    saved = json.loads((tmp_path / "rank0" / "checkpoint" / "epoch-000001" / "checkpoint.json").read_text())
    assert saved["world_size"] == 2 and len(saved["state"]["rng"]) == 2  # every process's random streams

    # synchronised batch norm computes what one process computes over the whole batch
    for report in reports:
        for errors in report["bn"].values():
            assert max(errors.values()) < 1e-5, report["bn"]
        assert report["ddp_vs_alone"] < 1e-4  # measured: 2.2e-6 on weights of up to 0.16 (tutorial-004, 2 epochs)


def test_steps_leave_no_process_without_examples():
    assert steps_per_epoch(1001, 100) == 11  # one process: the last batch of 1 too
    assert steps_per_epoch(1001, 100, 2) == 10  # two: a last batch of 1 cannot be shared, it is left out
    assert steps_per_epoch(1002, 100, 2) == 11
    assert distributed.current() is None  # outside a process group nothing is distributed
    assert distributed.backend_for_this_machine() == ("nccl" if torch.cuda.is_available() else "gloo")


def test_processes_pass_the_same_command_line_on():
    from deepdigits.cli import _run_options, build_parser
    from deepdigits.runs import train_argv

    argv = ["train", "--recipe", "fast", "--epochs", "3", "--lr", "0.0125", "--seed", "4", "--data-dir", "d",
            "--checkpoint-every", "2", "--keep-checkpoints", "--quiet", "--processes", "2"]
    args = build_parser().parse_args(argv)
    again = build_parser().parse_args(train_argv(args.recipe, Path("runs/x"), quiet=args.quiet, **_run_options(args)))
    assert again.processes is None and again.out == "runs/x"
    assert {k: v for k, v in vars(again).items() if k not in ("processes", "out", "handler")} == {
        k: v for k, v in vars(args).items() if k not in ("processes", "out", "handler")}
