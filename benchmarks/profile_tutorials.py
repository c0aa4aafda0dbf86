"""Where a tutorial's training time goes: torch.profiler over a few hundred of its training steps, by phase and op.

Each tutorial's recipe is prepared exactly as ``deepdigits.train.fit`` prepares it (``train.prepare``: layout,
optimizer, threads, precision) on the images ``train_recipe`` trains on; the steps then repeat
``TrainingRun.train_epoch``'s body with a ``record_function`` label around each phase: data (indexing the
batch), forward (network and loss), backward (zero_grad and backward), optimizer (step), metrics (the
on-device sums), host sync (reading a sum, as the progress bar does when it is shown). One validation pass
over the recipe's validation images (``evaluate_batches``) is profiled on its own. Printed: wall ms per step
without the profiler, each phase's share, and the top ops by self CPU time.

    python benchmarks/profile_tutorials.py --tutorials 003 001 004 --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import deepdigits  # noqa: F401  (first: it chooses OMP_WAIT_POLICY before torch loads)

# isort: split
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from deepdigits import fused, load_dataset, models, train
from deepdigits.calibrate import held_out_range
from deepdigits.classifier import Classifier, _labels
from deepdigits.data import validation_split as split_last_fraction
from deepdigits.recipes import get_recipe

PHASES = ("data", "forward", "backward", "optimizer", "metrics", "host sync")


def step(run: train.TrainingRun, order: torch.Tensor, i: int, sums: list[torch.Tensor], sync: bool,
         forward=None) -> None:
    """One training step as ``TrainingRun.train_epoch`` takes it (one process), each phase labelled."""
    with record_function("data"):
        i %= len(order) // run.batch_size
        batch = order[i * run.batch_size : (i + 1) * run.batch_size]
        xb, yb = run.x.index_select(0, batch), run.y.index_select(0, batch)
    with record_function("forward"):
        with run.autocast:
            logits = (forward or run.network)(xb).float()
        loss = run.loss_fn(logits, yb)
    with record_function("backward"):
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("optimizer"):
        run.optimizer.step()
    with record_function("metrics"):
        sums[0] += loss.detach() * len(batch)
        sums[1] += (logits.detach().argmax(1) == yb).sum()
    if sync:
        with record_function("host sync"):
            sums[0].item(), sums[1].item()


def prepared(tutorial: str, ds, **overrides) -> tuple[train.TrainingRun, Classifier, tuple]:
    """The recipe's run as ``fit`` prepares it (``overrides`` replace ``fit`` options), and its validation data."""
    recipe = get_recipe(f"tutorial-{tutorial}")
    clf = Classifier.from_recipe(recipe, class_names=ds.class_names)
    x_train, y_train, x_val, y_val = split_last_fraction(ds.x_train, ds.y_train, recipe.validation_split)
    stop = held_out_range(len(ds.x_train), recipe.validation_split).start
    x_train, y_train = x_train[:stop], y_train[:stop]
    options = {**recipe.fit_options(), **overrides}
    run = train.prepare(
        clf.network, clf._tensor(x_train), _labels(y_train), optimizer=options["optimizer"],
        learning_rate=options["learning_rate"], batch_size=options["batch_size"], epochs=1, seed=0,
        loss=options["loss"], weight_decay=options["weight_decay"], schedule=options["schedule"], augment=False,
        label_smoothing=options["label_smoothing"], ema_decay=0.0, bf16=options["bf16"],
        channels_last=options["channels_last"], verbose=0, device=torch.device("cpu"))
    return run, clf, (x_val, y_val)


def profile_tutorial(tutorial: str, ds, steps: int, sync_every: int, top: int) -> str:
    recipe = get_recipe(f"tutorial-{tutorial}")
    run, clf, (x_val, y_val) = prepared(tutorial, ds)
    steps = min(steps, run.steps - 1)
    order = torch.randperm(len(run.x), generator=run.shuffle)
    sums = [torch.zeros(()), torch.zeros((), dtype=torch.long)]
    run.network.train()
    for i in range(20):  # warm-up: oneDNN primitives, allocator
        step(run, order, i, sums, sync=False)
    started = time.perf_counter()
    for i in range(steps):
        step(run, order, i, sums, sync=i % sync_every == 0)
    wall_ms = (time.perf_counter() - started) * 1000 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(run, order, i, sums, sync=i % sync_every == 0)
    events = {e.key: e for e in prof.key_averages()}
    total_us = sum(events[p].cpu_time_total for p in PHASES if p in events)
    lines = [f"### tutorial {tutorial}: {recipe.architecture}, batch {run.batch_size}, {recipe.optimizer}, "
             f"{torch.get_num_threads()} threads, {run.history.precision}, "
             f"{'channels-last' if run.memory_format == torch.channels_last else 'contiguous'}",
             "", f"{wall_ms:.2f} ms per step without the profiler ({steps} steps; {run.steps} steps an epoch: "
             f"{wall_ms * run.steps / 1000:.1f} s of steps); with it {total_us / 1000 / steps:.2f} ms", "",
             "| phase | ms per step | share |", "|---|---:|---:|"]
    for phase in PHASES:
        if phase in events:
            us = events[phase].cpu_time_total
            lines.append(f"| {phase} | {us / 1000 / steps:.3f} | {us / total_us:.0%} |")
    if x_val is not None and len(x_val):
        xv = clf._tensor(x_val).contiguous(memory_format=run.memory_format)
        yv = _labels(y_val)
        train.evaluate_batches(run.network, xv, yv, run.loss_fn)
        started = time.perf_counter()
        train.evaluate_batches(run.network, xv, yv, run.loss_fn)
        lines += ["", f"validation pass over {len(xv):,} images: {time.perf_counter() - started:.2f} s"]
        run.network.train()
    ops = sorted((e for e in prof.key_averages() if e.key not in PHASES and not e.key.startswith("ProfilerStep")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    self_total = sum(e.self_cpu_time_total for e in prof.key_averages())
    lines += ["", "| op (top by self CPU time) | calls per step | self ms per step | share of self CPU |",
              "|---|---:|---:|---:|"]
    for e in ops:
        lines.append(f"| {e.key} | {e.count / steps:.0f} | {e.self_cpu_time_total / 1000 / steps:.3f} | "
                     f"{e.self_cpu_time_total / self_total:.0%} |")
    return "\n".join(lines)


def variant(name: str, tutorial: str, ds) -> tuple[train.TrainingRun, object, bool, float]:
    """A run of the tutorial changed in one respect: (run, forward callable, sync every step, setup seconds)."""
    started = time.perf_counter()
    precision = {"bf16": True, "float32": False}.get(name.split("+")[0])  # else the recipe's own
    run, _, _ = prepared(tutorial, ds, **({} if precision is None else {"bf16": precision}))
    forward, sync = None, name == "sync-every-step"
    if name == "contiguous":
        run.network.to(memory_format=torch.contiguous_format)
        run.x = run.x.contiguous()
        run.memory_format = torch.contiguous_format
    elif name == "relu-then-pool":
        layers = run.network
        for i, layer in enumerate(layers):
            if isinstance(layer, models.PooledReLU):
                layers[i] = nn.ReLU()
            elif isinstance(layer, models.MaxPoolReLU):
                layers[i] = nn.MaxPool2d(layer.kernel_size)
    elif name == "torch-dropout":
        for i, layer in enumerate(run.network):
            if isinstance(layer, models.Dropout):
                run.network[i] = nn.Dropout(layer.p)
    elif name.endswith("compile"):
        forward = torch.compile(run.network)
    elif name == "torch-rmsprop":  # torch's own RMSprop, not train.RMSprop's fused update
        group = run.optimizer.param_groups[0]
        run.optimizer = torch.optim.RMSprop(run.network.parameters(), lr=group["lr"], alpha=group["alpha"],
                                            eps=group["eps"], weight_decay=group["weight_decay"])
    elif name == "float32-data":  # batches drawn from float32 images, cast by autocast each step
        run.x = run.float_x if run.float_x is not None else run.x
    elif name == "torch-ops":  # no fused kernels: torch's layers, torch's Adam, autocast casting the weights
        run.network = nn.Sequential(*run.network)
        if isinstance(run.optimizer, fused.WeightCopies):
            name = {fused.Bf16Adam: "adam", fused.Bf16RMSprop: "rmsprop", fused.Bf16SGD: "sgd"}[type(run.optimizer)]
            run.optimizer = train.make_optimizer(name, run.network.parameters(), run.optimizer.param_groups[0]["lr"])
            run.autocast = run.autocast.autocast
    elif name not in ("recipe", "bf16", "float32", "sync-every-step", "1-thread", "fp32-bf16-math",
                      "float32+fp32-bf16-math"):
        raise SystemExit(f"unknown variant {name!r}; expected one of: {', '.join(VARIANTS)}")
    run.network.train()
    return run, forward, sync, time.perf_counter() - started


VARIANTS = ("recipe", "bf16", "float32", "contiguous", "relu-then-pool", "torch-dropout", "sync-every-step",
            "compile", "bf16+compile", "1-thread", "fp32-bf16-math", "float32+fp32-bf16-math", "torch-rmsprop",
            "float32-data", "torch-ops")


def settle(name: str, threads: int) -> None:
    """The process-wide settings of a variant, set before each of its blocks: threads, oneDNN's fp32 math."""
    torch.set_num_threads(1 if name == "1-thread" else threads)
    # float32 tensors, convolutions and matrix products computed by oneDNN in bfloat16 (AMX) inside
    math = "bf16" if name.endswith("fp32-bf16-math") else "none"
    torch.backends.mkldnn.conv.fp32_precision = math
    torch.backends.mkldnn.matmul.fp32_precision = math


def compare(tutorial: str, ds, names: list[str], rounds: int, block: int) -> str:
    """Training steps of each variant in one process, in alternating blocks of ``block`` steps: ms per step."""
    runs, threads = {}, torch.get_num_threads()
    for name in names:
        settle(name, threads)
        run, forward, sync, setup = variant(name, tutorial, ds)
        order = torch.randperm(len(run.x), generator=torch.Generator().manual_seed(0))
        sums = [torch.zeros(()), torch.zeros((), dtype=torch.long)]
        started = time.perf_counter()
        for i in range(5):  # warm-up (for compile: the compilation)
            step(run, order, i, sums, sync, forward)
        runs[name] = (run, forward, sync, order, sums, time.perf_counter() - started + setup)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    position = 5
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            run, forward, sync, order, sums, _ = runs[name]
            settle(name, threads)
            started, cpu_started = time.perf_counter(), time.process_time()
            for i in range(position, position + block):
                step(run, order, i, sums, sync, forward)
            times[name].append((time.perf_counter() - started) * 1000 / block)
            cpu[name].append((time.process_time() - cpu_started) * 1000 / block)
        position += block
    settle(names[0], threads)
    base = names[0]
    steps = runs[base][0].steps
    lines = [f"### tutorial {tutorial}: {rounds} rounds of {block} steps each, alternated in one process, "
             f"{threads} threads", "",
             f"| variant | precision | ms per step (median) | s per epoch of steps ({steps} steps) | "
             f"{base} / variant per round: median (range) | CPU ms per step (all threads) | {base} / variant "
             "in CPU time | setup + first 5 steps s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        ratios = [b / v for b, v in zip(times[base], times[name], strict=True)]
        cpu_ratios = [b / v for b, v in zip(cpu[base], cpu[name], strict=True)]
        run = runs[name][0]
        lines.append(f"| {name} | {run.history.precision} | {statistics.median(times[name]):.1f} | "
                     f"{statistics.median(times[name]) * steps / 1000:.1f} | {statistics.median(ratios):.2f}x "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) | {statistics.median(cpu[name]):.1f} | "
                     f"{statistics.median(cpu_ratios):.2f}x ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}) | "
                     f"{runs[name][5]:.1f} |")
    return "\n".join(lines)


def compare_validation(tutorial: str, ds, batches: list[int], rounds: int) -> str:
    """One validation pass (``evaluate_batches``) at each batch size, alternated: seconds."""
    run, _, (x_val, y_val) = prepared(tutorial, ds)
    if x_val is None or not len(x_val):
        x_val, y_val = ds.x_train[-2000:], ds.y_train[-2000:]
    xv = Classifier.from_recipe(get_recipe(f"tutorial-{tutorial}"))._tensor(x_val).contiguous(
        memory_format=run.memory_format)
    yv = _labels(y_val)
    times: dict[int, list[float]] = {b: [] for b in batches}
    train.evaluate_batches(run.network, xv, yv, run.loss_fn)
    for r in range(rounds):
        for b in batches if r % 2 == 0 else batches[::-1]:
            started = time.perf_counter()
            train.evaluate_batches(run.network, xv, yv, run.loss_fn, batch_size=b)
            times[b].append(time.perf_counter() - started)
    lines = [f"### tutorial {tutorial}: validation pass over {len(xv):,} images, {rounds} rounds alternated", "",
             f"| eval batch | s (median) | batch {batches[0]} / this: median (range) |", "|---:|---:|---:|"]
    for b in batches:
        ratios = [a / t for a, t in zip(times[batches[0]], times[b], strict=True)]
        lines.append(f"| {b} | {statistics.median(times[b]):.2f} | {statistics.median(ratios):.2f}x "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) |")
    return "\n".join(lines)


RUN_SCRIPT = """
import dataclasses, json, sys, time
import deepdigits
from deepdigits import load_dataset
from deepdigits.recipes import get_recipe
tutorial, data_dir, epochs, seed, bf16 = sys.argv[1:]
recipe = dataclasses.replace(get_recipe("tutorial-" + tutorial), bf16=bf16 == "bf16")
ds = load_dataset("mnist", data_dir=data_dir or None)
cpu = time.process_time()
clf = deepdigits.train_recipe(recipe, dataset=ds, epochs=int(epochs) or None, seed=int(seed), verbose=0)
cpu = time.process_time() - cpu
print("RESULT " + json.dumps({"seconds": clf.train_seconds, "epoch_seconds": [e["seconds"] for e in clf.history],
                              "cpu_seconds": cpu,
                              "accuracy": float(clf.metrics["accuracy"]), "precision": clf.precision}))
"""


def run_fresh(tutorial: str, data_dir: str | None, epochs: int, seed: int, precision: str, env: dict) -> dict:
    """One ``train_recipe`` run of the tutorial in a fresh process (``precision`` "bf16" asks for autocast)."""
    done = subprocess.run([sys.executable, "-c", RUN_SCRIPT, tutorial, data_dir or "", str(epochs), str(seed),
                           precision], env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"tutorial {tutorial} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def compare_precision(tutorial: str, seeds: list[int], data_dir: str | None, epochs: int = 0) -> str:
    """The whole recipe in float32 and asked for bfloat16, a fresh process each, alternated per seed."""
    rows = []
    for r, seed in enumerate(seeds):
        for precision in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            load = Path("/proc/loadavg").read_text().split()[0]
            result = run_fresh(tutorial, data_dir, epochs, seed, precision, dict(os.environ))
            rows.append((seed, precision, result, load))
            print(f"seed {seed} {precision}: {result['seconds']:.1f} s, {result['cpu_seconds']:.1f} CPU s, "
                  f"{result['accuracy']:.2%} (load {load})",
                  file=sys.stderr, flush=True)
    length = f"{epochs} epoch(s) of the recipe" if epochs else "whole recipe"
    lines = [f"### tutorial {tutorial}: {length}, fresh process per run, float32 and bfloat16 alternated", "",
             "| seed | asked | trained in | training s | CPU s (all threads, whole call) | test accuracy "
             "| 1-min load before |", "|---:|---|---|---:|---:|---:|---|"]
    lines += [f"| {seed} | {p} | {res['precision']} | {res['seconds']:.1f} | {res['cpu_seconds']:.1f} | "
              f"{res['accuracy']:.2%} | {load} |" for seed, p, res, load in rows]
    return "\n".join(lines)


def compare_wait_policies(tutorial: str, policies: list[str], rounds: int, threads: int | None,
                          data_dir: str | None) -> str:
    """One epoch of the tutorial in a fresh process per OMP_WAIT_POLICY ("unset": deepdigits' choice), alternated."""
    times: dict[str, list[float]] = {p: [] for p in policies}
    loads = []
    for r in range(rounds):
        for policy in policies if r % 2 == 0 else policies[::-1]:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            if policy == "spin-default":  # libgomp's own default (spin 300,000 times, then sleep), set
                env.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="300000")  # so deepdigits keeps it
            elif policy.startswith("spin-"):  # spin-N: spin N times, then sleep
                env.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT=policy[len("spin-"):])
            elif policy != "unset":
                env["OMP_WAIT_POLICY"] = policy
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            loads.append(Path("/proc/loadavg").read_text().split()[0])
            result = run_fresh(tutorial, data_dir, 1, 0, "fp32", env)
            times[policy].append(result["epoch_seconds"][0])
            print(f"round {r} {policy}: {result['seconds']:.2f} s (load {loads[-1]})", file=sys.stderr, flush=True)
    base = policies[0]
    lines = [f"### tutorial {tutorial}: one epoch in a fresh process per run, {rounds} rounds alternated; "
             f"1-minute load average before each run {min(loads, key=float)}-{max(loads, key=float)}", "",
             f"| OMP_WAIT_POLICY | epoch s (median) | every run | {base} / this per round: median (range) |",
             "|---|---:|---|---:|"]
    for policy in policies:
        ratios = [b / t for b, t in zip(times[base], times[policy], strict=True)]
        lines.append(f"| {policy} | {statistics.median(times[policy]):.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in times[policy])} | {statistics.median(ratios):.2f}x "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tutorials", nargs="+", default=["003", "001", "004"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sync-every", type=int, default=1, help="read the sums every N steps (1: as an "
                        "unthrottled per-step loss.item() would)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--compare", nargs="+", metavar="VARIANT", help="instead of profiling, time these "
                        f"variants of each tutorial's step in alternating blocks (the first is the base): {VARIANTS}")
    parser.add_argument("--validation-batches", nargs="+", type=int, metavar="N",
                        help="instead of profiling, time a validation pass at these eval batch sizes")
    parser.add_argument("--wait-policies", nargs="+", metavar="POLICY", help="instead of profiling, time one "
                        "epoch in fresh processes under these OMP_WAIT_POLICY values (PASSIVE, ACTIVE, unset: "
                        "deepdigits' choice, spin-default: libgomp's default spinning, whatever the load, "
                        "spin-N: spin N times (GOMP_SPINCOUNT), then sleep)")
    parser.add_argument("--precision-seeds", nargs="+", type=int, metavar="SEED", help="instead of profiling, "
                        "run the whole recipe in float32 and asked for bfloat16 with each seed, alternated")
    parser.add_argument("--epochs", type=int, help="with --precision-seeds: this many epochs, not the recipe's")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=20, help="steps per block with --compare")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own)")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = None if args.wait_policies or args.precision_seeds else load_dataset("mnist", data_dir=args.data_dir)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"machine: {cpu}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, torch "
          f"{torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (spinning)')}, "
          f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}\n")
    for tutorial in args.tutorials:
        if args.precision_seeds:
            text = compare_precision(tutorial, args.precision_seeds, args.data_dir, args.epochs or 0)
        elif args.wait_policies:
            text = compare_wait_policies(tutorial, args.wait_policies, args.rounds, args.threads, args.data_dir)
        elif args.compare:
            text = compare(tutorial, ds, args.compare, args.rounds, args.block)
        elif args.validation_batches:
            text = compare_validation(tutorial, ds, args.validation_batches, args.rounds)
        else:
            text = profile_tutorial(tutorial, ds, args.steps, args.sync_every, args.top)
        print(text + "\n", flush=True)
    print(f"load average at end {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()
