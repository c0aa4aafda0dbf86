"""Data-parallel training on one machine: 2 processes x 1 thread against 1 process x 2 threads, alternated.

Each run is a fresh ``deepdigits train`` command (nothing carries over between runs):

    OMP_NUM_THREADS=2 deepdigits train --recipe R --epochs 1 --out OUT --quiet                 # 1 process x 2 threads
    OMP_NUM_THREADS=1 deepdigits train --recipe R --epochs 1 --processes 2 --out OUT --quiet   # 2 processes x 1 thread

The two layouts alternate within a round (threads first in even rounds, processes first in odd ones), so
other work on the machine falls on both alike; the load average is printed before and after every run.
Training seconds are ``train_seconds`` of the bundle's ``model.json`` (the epochs, with validation where the
recipe has it); images per second are the training images (those before the calibration slice) times
epochs over them; wall seconds are the whole command (start-up, data, test set, calibration, saving).
The ratio is threads' seconds over processes' within a round (above 1: two processes were quicker).

The ``ensemble`` recipe is compared another way: its members one after another in one process of 2 threads
(``--processes 1``) against 2 member processes of 1 thread each (``--processes 2``); its training seconds
are the members' summed, so its images per second and its ratio are over wall time. ``ensemble-of-R-N``
(e.g. ``ensemble-of-fast-2``) is the same comparison for an ensemble of N members of recipe R, trained
through ``deepdigits.train_run`` (the CLI names only the three-``best`` ensemble).

    python benchmarks/processes_vs_threads.py --rounds 2 --recipes fast best tutorial-003
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_name, loadavg

LAYOUTS = {"threads": ("1 process x 2 threads", 2, None), "processes": ("2 processes x 1 thread", 1, 2)}
ENSEMBLE_LAYOUTS = {"threads": ("members in turn, 2 threads", 2, 1),  # --processes 1: one after another
                    "processes": ("2 member processes x 1 thread", 2, 2)}  # each worker takes 2 cores / 2


def machine_line() -> str:
    import torch

    return (f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores, vector extension "
            f"{torch.backends.cpu.get_cpu_capability()}; Python {platform.python_version()}, torch {torch.__version__}")


ENSEMBLE_OF = """
import sys
from deepdigits.recipes import Recipe, get_recipe
from deepdigits.runs import train_run
member, members, out, processes, epochs, data_dir = sys.argv[1:7]
base = get_recipe(member)
recipe = Recipe(f"ensemble-of-{member}", "ensemble", base.optimizer, base.learning_rate, base.batch_size, base.epochs,
                members=int(members), member_recipe=member)
train_run(recipe, out, processes=int(processes), epochs=int(epochs), data_dir=data_dir or None, verbose=0)
"""


def is_ensemble(recipe: str) -> bool:
    return recipe == "ensemble" or recipe.startswith("ensemble-of-")


def run_once(recipe: str, layout: str, epochs: int, data_dir: str | None, work: Path) -> dict:
    label, threads, processes = (ENSEMBLE_LAYOUTS if is_ensemble(recipe) else LAYOUTS)[layout]
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"{recipe}-{layout}-")) / "run"
    if recipe.startswith("ensemble-of-"):
        member, members = recipe.removeprefix("ensemble-of-").rsplit("-", 1)
        command = [sys.executable, "-c", ENSEMBLE_OF, member, members, str(out), str(processes), str(epochs),
                   data_dir or ""]
    else:
        command = [sys.executable, "-m", "deepdigits", "train", "--recipe", recipe, "--epochs", str(epochs),
                   "--out", str(out), "--quiet"]
        if data_dir:
            command += ["--data-dir", data_dir]
        if processes:
            command += ["--processes", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load_before = loadavg()
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    load_after = loadavg()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    meta = json.loads((out / "model.json").read_text())
    # training stops where the held-out slice begins
    if is_ensemble(recipe):
        images = meta["calibration"]["fit_on"]["start"] * sum(m["epochs"] for m in meta["recipe"]["members"])
        per_second = images / wall
    else:
        images = meta["calibration"]["fit_on"]["start"] * len(meta["history"])
        per_second = images / meta["train_seconds"]
    return {"recipe": recipe, "layout": layout, "label": label, "train_seconds": meta["train_seconds"],
            "images_per_second": per_second, "wall": wall,
            "accuracy": meta["metrics"]["accuracy"], "world": meta.get("distributed"),
            "load_before": load_before, "load_after": load_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["fast", "best", "tutorial-003"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", default=os.environ.get("DEEPDIGITS_DATA"))
    args = parser.parse_args()

    print(machine_line())
    print(f"OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY', 'not set (deepdigits chooses)')}; "
          f"load average at start {loadavg()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="processes-vs-threads-") as work:
        for round_ in range(args.rounds):
            order = ("threads", "processes") if round_ % 2 == 0 else ("processes", "threads")
            for recipe in args.recipes:
                for layout in order:
                    r = run_once(recipe, layout, args.epochs, args.data_dir, Path(work))
                    r["round"] = round_
                    results.append(r)
                    print(f"round {round_ + 1} {recipe:<13} {r['label']:<23} training {r['train_seconds']:7.1f} s "
                          f"{r['images_per_second']:8,.0f} images/s  wall {r['wall']:7.1f} s  accuracy "
                          f"{r['accuracy']:.2%}  load {r['load_before']} -> {r['load_after']}", flush=True)

    print("\n| recipe | layout | training (s) | images/s | wall (s) | test accuracy |")
    print("|---|---|---:|---:|---:|---:|")
    for recipe in args.recipes:
        for layout in LAYOUTS:
            rows = [r for r in results if r["recipe"] == recipe and r["layout"] == layout]
            label = rows[0]["label"]

            def cells(key: str, form: str, rows: list = rows) -> str:
                return ", ".join(format(r[key], form) for r in rows)

            print(f"| {recipe} | {label} | {cells('train_seconds', '.1f')} | "
                  f"{cells('images_per_second', ',.0f')} | {cells('wall', '.1f')} | {cells('accuracy', '.2%')} |")
    print("\nthreads' seconds over processes' seconds, per round (above 1: two processes were quicker):")
    for recipe in args.recipes:
        pairs = [(t, p) for t in results for p in results if t["recipe"] == p["recipe"] == recipe
                 and t["round"] == p["round"] and t["layout"] == "threads" and p["layout"] == "processes"]
        training = [t["train_seconds"] / p["train_seconds"] for t, p in pairs]
        wall = [t["wall"] / p["wall"] for t, p in pairs]
        train_text = "" if is_ensemble(recipe) else (  # its training seconds are the members' summed
            f"training {', '.join(f'{x:.2f}' for x in training)} (median {statistics.median(training):.2f}); ")
        print(f"  {recipe}: {train_text}wall {', '.join(f'{x:.2f}' for x in wall)} "
              f"(median {statistics.median(wall):.2f})")
    print(f"load average at the end {loadavg()}")


if __name__ == "__main__":
    main()
