"""Time-to-accuracy frontier: deepdigits' recipes beside the peers a user would pick instead, in one run.

Every run is a fresh subprocess with the same number of threads (``--threads``), alternating systems within a
round; round ``i`` uses seed ``--seed + i`` everywhere. A point is one system over its seeds (``--seeds``, the peers
``--peer-seeds``): mean test accuracy on the 10,000 MNIST test images (and its min-max) against mean training
seconds. It prints one table, the machine line above it; ``--out`` adds every run with the load average.

Systems:
- ``ours:RECIPE[:FIELD=VALUE,...]``: ``deepdigits.train_recipe`` with the recipe (and any field overridden,
  e.g. ``ours:fast:epochs=3``); training seconds are the bundle's own ``train_seconds`` (the training loop,
  with any per-epoch validation; data conversion to tensors included). Recipes without a validation split
  hold out the last ``calibrate.HOLDOUT`` training images for the temperature and train on the rest.
- ``keras-003``: tutorial 003 exactly as it ran, in Keras on TensorFlow (``benchmarks/tutorials_vs_keras.py``
  runs it; needs the optional group ``pip install -e ".[peer]"``).
- ``pytorch-example``: our port of PyTorch's own ``examples/mnist`` from its published settings: conv 32 3x3,
  conv 64 3x3, max-pool, dropout 0.25, dense 128, dropout 0.5, dense 10 (log-softmax, NLL); Adadelta at 1.0,
  StepLR gamma 0.7 each epoch, batch 64, 14 epochs, inputs normalised by (0.1307, 0.3081), all 60,000 images.
- ``mnist-fast-record``: our port of the published one-epoch speed record (train_mnist_fast): conv 24 5x5,
  max-pool, ReLU, conv 32 3x3, max-pool, ReLU (pooling before the activation), dense 256, dense 10; Adam at
  0.01 with betas 0.7/0.9 under a one-cycle schedule, batch 256, one epoch, normalised inputs, all 60,000.

The peers' clocks cover their training loops only (no per-epoch test pass), like ours.

    python benchmarks/frontier.py --seeds 5 --peer-seeds 3 --png benchmarks/frontier.png --out runs/frontier.md
    python benchmarks/frontier.py --systems mnist-fast-record ours:fast --seeds 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import tutorials_vs_keras  # beside this file: the Keras peer
from _machine import cpu_name, loadavg

# quick:epochs=6 is the candidate for 99.6% in at most 2 minutes (issue 17): not yet measured on a quiet machine
DEFAULT_SYSTEMS = ("ours:fast", "ours:quick", "ours:quick:epochs=6", "mnist-fast-record", "keras-003",
                   "pytorch-example", "ours:best")
PEERS = ("keras-003", "pytorch-example", "mnist-fast-record")
TARGETS = (0.990, 0.994, 0.995, 0.996, 0.9965)
MEAN, STD = 0.1307, 0.3081  # the peers' published input normalisation


def parse_ours(spec: str):
    """``ours:RECIPE[:FIELD=VALUE,...]`` as a Recipe (values typed like the recipe's own field)."""
    from deepdigits.recipes import get_recipe

    _, name, *rest = spec.split(":", 2)
    recipe = get_recipe(name)
    overrides = {}
    for item in filter(None, (rest[0] if rest else "").split(",")):
        field, _, text = item.partition("=")
        current = getattr(recipe, field)  # an unknown field fails here, naming it
        if isinstance(current, bool):
            overrides[field] = text.lower() in ("1", "true", "yes")
        else:
            overrides[field] = type(current)(text)
    return recipe.with_overrides(**overrides) if overrides else recipe


# --------------------------------------------------------------------------- the peers (our ports)


def _tensors(ds):
    import torch

    def normalise(images):
        return ((torch.from_numpy(images).float() / 255.0 - MEAN) / STD).unsqueeze(1)

    return (normalise(ds.x_train), torch.from_numpy(ds.y_train).long(), normalise(ds.x_test),
            torch.from_numpy(ds.y_test).long())


def _test_accuracy(model, x_test, y_test) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model(x_test[i:i + 1000]).argmax(1) for i in range(0, len(x_test), 1000)])
    return float((predicted == y_test).float().mean())


def _train_loop(model, optimizer, x, y, batch: int, epochs: int, per_step=None, per_epoch=None) -> float:
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            index = order[i:i + batch]
            optimizer.zero_grad()
            F.nll_loss(model(x[index]), y[index]).backward()
            optimizer.step()
            if per_step:
                per_step.step()
        if per_epoch:
            per_epoch.step()
    return time.perf_counter() - started


def run_pytorch_example(ds, seed: int) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class ExampleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
            self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
            self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

        def forward(self, x):
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            x = torch.flatten(self.dropout1(torch.max_pool2d(x, 2)), 1)
            return torch.log_softmax(self.fc2(self.dropout2(torch.relu(self.fc1(x)))), dim=1)

    x, y, x_test, y_test = _tensors(ds)
    model = ExampleNet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    seconds = _train_loop(model, optimizer, x, y, batch=64, epochs=14, per_epoch=schedule)
    return {"seconds": seconds, "accuracy": _test_accuracy(model, x_test, y_test), "train_images": len(x)}


def run_mnist_fast_record(ds, seed: int) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class RecordNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 24, 5, 1), nn.Conv2d(24, 32, 3, 1)
            self.fc1, self.fc2 = nn.Linear(800, 256), nn.Linear(256, 10)

        def forward(self, x):
            x = torch.relu(torch.max_pool2d(self.conv1(x), 2))  # pooling first: a quarter of the ReLU work
            x = torch.relu(torch.max_pool2d(self.conv2(x), 2))
            return torch.log_softmax(self.fc2(torch.relu(self.fc1(torch.flatten(x, 1)))), dim=1)

    x, y, x_test, y_test = _tensors(ds)
    model = RecordNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.7, 0.9))
    batch = 256
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=math.ceil(len(x) / batch))
    seconds = _train_loop(model, optimizer, x, y, batch=batch, epochs=1, per_step=schedule)
    return {"seconds": seconds, "accuracy": _test_accuracy(model, x_test, y_test), "train_images": len(x)}


def run_ours(spec: str, ds, seed: int) -> dict:
    import deepdigits

    clf = deepdigits.train_recipe(parse_ours(spec), dataset=ds, seed=seed, verbose=0)
    return {"seconds": clf.train_seconds, "accuracy": float(clf.score(ds.x_test, ds.y_test)),
            "precision": clf.precision}


def worker(args) -> None:
    import torch

    system = args.worker
    if system == "keras-003":
        import tensorflow  # noqa: F401  (before deepdigits, whose import sets OMP_WAIT_POLICY for torch)
    torch.set_num_threads(args.threads)
    # The first optimizer a process makes imports torch._dynamo (about 1 s): a one-time import, outside
    # every clock here (Keras's own imports are outside its clock too).
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    from deepdigits import load_dataset

    ds = load_dataset("mnist", data_dir=args.data_dir)
    before = loadavg()
    if system == "keras-003":
        result = tutorials_vs_keras.run_keras("003", args.seed, args.threads, "keras3", ds, None)
    elif system == "pytorch-example":
        result = run_pytorch_example(ds, args.seed)
    elif system == "mnist-fast-record":
        result = run_mnist_fast_record(ds, args.seed)
    else:
        result = run_ours(system, ds, args.seed)
    result.update(system=system, seed=args.seed, loadavg_before=before, loadavg_after=loadavg())
    result.pop("version", None)
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the driver


def run_one(system: str, seed: int, args) -> dict:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    command = [sys.executable, __file__, "--worker", system, "--seed", str(seed), "--threads", str(args.threads)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{system} seed {seed} failed (exit {done.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def label(system: str) -> str:
    return {"keras-003": "tutorial 003 (Keras on TensorFlow)", "pytorch-example": "PyTorch examples/mnist (port)",
            "mnist-fast-record": "one-epoch speed record (port)"}.get(system, "deepdigits " + system[len("ours:"):])


def points(runs: list[dict], systems: list[str]) -> list[dict]:
    out = []
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        if mine:
            accuracies, seconds = [r["accuracy"] for r in mine], [r["seconds"] for r in mine]
            out.append({"system": system, "seeds": len(mine), "accuracy": statistics.mean(accuracies),
                        "low": min(accuracies), "high": max(accuracies), "seconds": statistics.mean(seconds),
                        "fastest": min(seconds), "slowest": max(seconds)})
    return out


def quickest(table: list[dict]) -> dict[str, list[str]]:
    """For each point, the targets it is the quickest of its side (ours or the peers) to reach, in mean
    accuracy over its seeds: ``{system: ["99.50% (ours)", ...]}``."""
    firsts: dict[str, list[str]] = {p["system"]: [] for p in table}
    for target in TARGETS:
        reached = [p for p in table if p["accuracy"] >= target]
        for ours in (True, False):
            best = min((p for p in reached if p["system"].startswith("ours:") == ours), key=lambda p: p["seconds"],
                       default=None)
            if best is not None:
                firsts[best["system"]].append(f"{target * 100:.2f}%" + ("" if ours else " (peer)"))
    return firsts


def report(runs: list[dict], systems: list[str], machine: str, started_load: str, every_run: bool = True) -> str:
    """The frontier as one Markdown table (each point: seeds, mean and range of test accuracy and of training
    seconds, the targets it is the quickest to), the machine line above it; ``every_run`` adds each run."""
    table = points(runs, systems)
    firsts = quickest(table)
    lines = [machine, f"load average (1, 5, 15 min) at start: {started_load}; at end: {loadavg()}", "",
             "| system | seeds | mean test acc. | min-max | mean training s | min-max s | quickest to |",
             "|---|---:|---:|---|---:|---|---|"]
    for p in sorted(table, key=lambda p: p["seconds"]):
        lines.append(f"| {label(p['system'])} | {p['seeds']} | {p['accuracy'] * 100:.2f}% | "
                     f"{p['low'] * 100:.2f}-{p['high'] * 100:.2f}% | {p['seconds']:.1f} | "
                     f"{p['fastest']:.1f}-{p['slowest']:.1f} | {', '.join(firsts[p['system']]) or '-'} |")
    if every_run:
        lines += ["", "Every run (in the order they ran):", "",
                  "| round | system | seed | training s | test acc. | load avg before -> after |",
                  "|---:|---|---:|---:|---:|---|"]
        for r in runs:
            lines.append(f"| {r['round']} | {label(r['system'])} | {r['seed']} | {r['seconds']:.1f} | "
                         f"{r['accuracy'] * 100:.2f}% | {r['loadavg_before']} -> {r['loadavg_after']} |")
    return "\n".join(lines)


def draw(runs: list[dict], systems: list[str], machine: str, path: Path) -> None:
    """Test accuracy against training seconds (log scale): each run faint, each system's mean labelled with
    its min-max accuracy as an error bar."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    for p in points(runs, systems):
        peer = p["system"] in PEERS
        colour = "tab:gray" if peer else "tab:blue"
        mine = [r for r in runs if r["system"] == p["system"]]
        axes.scatter([r["seconds"] for r in mine], [r["accuracy"] * 100 for r in mine], s=12, alpha=0.35,
                     color=colour)
        axes.errorbar([p["seconds"]], [p["accuracy"] * 100], fmt="s" if peer else "o", markersize=7, color=colour,
                      yerr=[[(p["accuracy"] - p["low"]) * 100], [(p["high"] - p["accuracy"]) * 100]], capsize=3)
        axes.annotate(label(p["system"]), (p["seconds"], p["accuracy"] * 100), textcoords="offset points",
                      xytext=(6, 4), fontsize=8)
    for target in TARGETS:
        axes.axhline(target * 100, color="tab:green", linewidth=0.5, linestyle=":")
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # minor ticks at 2 and 5 of each decade labelled too: a short range may hold no power of ten
    axes.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    axes.margins(x=0.3, y=0.1)  # room for the labels right of the last point
    axes.set_xlabel("training seconds (log scale)")
    axes.set_ylabel("MNIST test accuracy (%)")
    axes.set_title("Time to accuracy: deepdigits (blue) and peers (grey)", fontsize=10)
    figure.text(0.01, 0.005, machine[:150], fontsize=6, color="tab:gray")
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, dpi=110, format="png")
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS),
                        help="peers (keras-003, pytorch-example, mnist-fast-record) and ours:RECIPE[:FIELD=V,...]")
    parser.add_argument("--seeds", "--rounds", dest="seeds", type=int, default=5,
                        help="seeds per system, one round each (default 5)")
    parser.add_argument("--peer-seeds", type=int,
                        help="seeds per peer (default: --seeds); the PyTorch example's port takes about 10 "
                        "minutes a seed, so a run may give the peers fewer rounds than ours")
    parser.add_argument("--seed", type=int, default=0, help="round i uses seed SEED + i")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", help="also write the Markdown here")
    parser.add_argument("--json", help="also write every run as JSON here")
    parser.add_argument("--png", help="draw the frontier here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for system in args.systems:
        if system not in PEERS:
            if not system.startswith("ours:"):
                parser.error(f"--systems: {system!r} is neither a peer ({', '.join(PEERS)}) nor ours:RECIPE")
            try:
                parse_ours(system)
            except Exception as error:  # a bad spec of any kind: one line naming it
                parser.error(f"--systems: {system!r}: {error}")

    import torch

    machine = (f"machine: {cpu_name()}, {os.cpu_count()} cores, vector extensions "
               f"{torch.backends.cpu.get_cpu_capability()}; {args.threads} threads for each system; "
               f"Python {platform.python_version()}, torch {torch.__version__}")
    started_load = loadavg()
    print(machine, file=sys.stderr)
    peer_seeds = args.seeds if args.peer_seeds is None else args.peer_seeds
    runs: list[dict] = []
    for round_ in range(max(args.seeds, peer_seeds)):
        seed = args.seed + round_
        order = list(args.systems) if round_ % 2 == 0 else list(reversed(args.systems))
        for system in order:
            if round_ >= (peer_seeds if system in PEERS else args.seeds):
                continue
            result = run_one(system, seed, args)
            result["round"] = round_
            runs.append(result)
            print(f"round {round_} {system:24s} seed {seed}: {result['seconds']:7.1f} s, "
                  f"{result['accuracy'] * 100:.2f}% (load {result['loadavg_before']} -> {result['loadavg_after']})",
                  file=sys.stderr, flush=True)
            if args.json:  # kept up to date: a long sweep that is stopped still leaves its runs
                Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")
    print(report(runs, args.systems, machine, started_load, every_run=False))
    if args.out:
        Path(args.out).write_text(report(runs, args.systems, machine, started_load) + "\n")
    if args.png:
        draw(runs, args.systems, machine, Path(args.png))


if __name__ == "__main__":
    main()
