"""Test accuracy and training time of the `best` recipe and of an ensemble of `best` networks.

Either evaluates bundles already trained by `deepdigits train --recipe best --seed N` (their training time
is read from the bundle), or, with --train, trains the members here first (about 9 minutes each on 2 cores).

    python benchmarks/accuracy.py --members runs/best-s0 runs/best-s1 runs/best-s2
    python benchmarks/accuracy.py --train --seeds 0 1 2 --out runs
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="*", default=[], help="bundles of `best` networks")
    parser.add_argument("--train", action="store_true", help="train the members here first")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to train with --train")
    parser.add_argument("--out", default="runs", help="where --train saves the member bundles")
    parser.add_argument("--data-dir")
    args = parser.parse_args()

    import torch

    from deepdigits import combine, load, load_dataset, train_recipe

    ds = load_dataset("mnist", data_dir=args.data_dir)
    members = []
    if args.train:
        for seed in args.seeds:
            clf = train_recipe("best", dataset=ds, seed=seed, verbose=0)
            clf.save(Path(args.out) / f"best-s{seed}")
            members.append((f"best, seed {seed}", clf))
    members += [(f"best ({path})", load(path)) for path in args.members]
    if not members:
        raise SystemExit("nothing to measure: pass --members BUNDLE ... or --train")

    rows = []
    for name, clf in members:
        accuracy = float((clf.predict(ds.x_test) == ds.y_test).mean())
        rows.append((name, clf.n_params, accuracy, clf.train_seconds))
    if len(members) >= 2:
        ensemble = combine([clf for _, clf in members])
        accuracy = float((ensemble.predict(ds.x_test) == ds.y_test).mean())
        rows.append((f"ensemble of {len(members)} (probabilities averaged)", ensemble.n_params, accuracy,
                     ensemble.train_seconds))

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"Python {platform.python_version()}")
    print()
    print("| model | parameters | test accuracy | errors of 10,000 | training seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, params, accuracy, seconds in rows:
        print(f"| {name} | {params:,} | {accuracy * 100:.2f}% | {round((1 - accuracy) * 10000)} | {seconds:.0f} |")
    singles = [r[2] for r in rows[: len(members)]]
    print()
    print(f"single networks: mean {np.mean(singles) * 100:.3f}%, best {max(singles) * 100:.2f}%")


if __name__ == "__main__":
    main()
