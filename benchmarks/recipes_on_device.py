"""Every recipe trained on this machine's default device (a CUDA GPU where there is one): time and accuracy.

Each recipe is ``deepdigits.train_recipe(R, seed=S)`` (what ``deepdigits train --recipe R --seed S`` runs),
in this one process, one after the other on the same data; the bundle is saved and loaded again, and the
reloaded model must score the same. ``--ddp R`` also trains R under torchrun with one process (NCCL on a GPU,
gloo on a CPU) and reads the world size and backend the bundle recorded. Prints a Markdown table with the
machine line (GPU or CPU, torch, CUDA).

    python benchmarks/recipes_on_device.py --ddp fast
    python benchmarks/recipes_on_device.py --recipes fast tutorial-003
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_RECIPES = ("fast", "tutorial-000", "tutorial-001", "tutorial-002", "tutorial-003", "tutorial-004", "best")


def machine_line() -> str:
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        where = (f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                 f"native bfloat16: {torch.cuda.is_bf16_supported(including_emulation=False)}")
    else:
        where = f"CPU only ({torch.backends.cpu.get_cpu_capability()})"
    return (f"machine: {where}; {os.cpu_count()} CPU cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def train_one(name: str, ds, seed: int, folder: Path) -> dict:
    import torch

    import deepdigits

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    clf = deepdigits.train_recipe(name, dataset=ds, seed=seed, verbose=0)
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    clf.save(folder / name)
    again = deepdigits.load(folder / name)
    reloaded = float((again.predict(ds.x_test) == ds.y_test).mean())
    calibration = (clf.metrics or {}).get("calibration") or {}
    return {"recipe": name, "precision": clf.precision, "epochs": len(clf.history), "train_s": clf.train_seconds,
            "wall_s": wall, "accuracy": clf.metrics["accuracy"], "reloaded": reloaded,
            "ece": calibration.get("ece"), "peak_mib": peak}


def train_ddp(name: str, seed: int, folder: Path, data_dir: str | None) -> dict:
    out = folder / f"ddp-{name}"
    command = ["torchrun", "--standalone", "--nproc_per_node=1", "-m", "deepdigits", "train", "--recipe", name,
               "--seed", str(seed), "--out", str(out), "--quiet"]
    if data_dir:
        command += ["--data-dir", data_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-2000:])
        raise SystemExit(f"torchrun {name} failed (exit {done.returncode})")
    document = json.loads((out / "model.json").read_text())
    warned = "Grad strides do not match bucket view strides" in done.stderr
    return {"recipe": f"{name} (torchrun, 1 process)", "precision": document.get("precision"),
            "epochs": len(document.get("history") or []), "train_s": document["train_seconds"],
            "accuracy": document["metrics"]["accuracy"], "distributed": document.get("distributed"),
            "ece": (document["metrics"].get("calibration") or {}).get("ece"), "ddp_stride_warning": warned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    parser.add_argument("--ddp", nargs="*", default=[], help="recipes also trained under torchrun, 1 process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()

    from deepdigits import load_dataset

    machine = machine_line()
    print(machine, file=sys.stderr)
    ds = load_dataset("mnist", data_dir=args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="recipes-on-device-") as folder:
        for name in args.recipes:
            rows.append(train_one(name, ds, args.seed, Path(folder)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for name in args.ddp:
            rows.append(train_ddp(name, args.seed, Path(folder), args.data_dir))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(machine)
    print()
    print("| recipe | precision | epochs | training s | test accuracy | reloaded | ECE after T | peak GPU MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        reloaded = f"{r['reloaded'] * 100:.2f}%" if "reloaded" in r else "-"
        ece = f"{r['ece'] * 100:.2f}%" if r.get("ece") is not None else "-"
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        print(f"| {r['recipe']} | {r['precision']} | {r['epochs']} | {r['train_s']:.1f} | {r['accuracy'] * 100:.2f}% "
              f"| {reloaded} | {ece} | {peak} |")
    for r in rows:
        if "distributed" in r:
            print(f"\n{r['recipe']}: model.json records {json.dumps(r['distributed'])}; DDP stride warning: "
                  f"{'yes' if r['ddp_stride_warning'] else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
