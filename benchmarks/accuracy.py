"""Test accuracy and training time of the `best` recipe and of an ensemble of `best` networks.

Either evaluates bundles already trained by `deepdigits train --recipe best --seed N` (their training time
is read from the bundle), or, with --train, trains the members here first (about 9 minutes each on 2 cores).

    python benchmarks/accuracy.py --members runs/best-s0 runs/best-s1 runs/best-s2
    python benchmarks/accuracy.py --members runs/best-s0 runs/best-s1 runs/best-s2 --tta
    python benchmarks/accuracy.py --train --seeds 0 1 2 --out runs
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np


def tta_views(images: np.ndarray) -> list[np.ndarray]:
    """Nine views of uint8 digits for test-time augmentation: as they are, shifted one pixel each way,
    rotated 8 degrees each way, zoomed to 92% and 108% (bilinear, rounded back to uint8 like any image)."""
    import torch

    from deepdigits.augment import affine_warp

    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    views = [images] + [np.roll(padded, shift, axis)[:, 1:-1, 1:-1] for axis in (1, 2) for shift in (-1, 1)]
    x = torch.from_numpy(images).float().unsqueeze(1)
    for degrees, zoom in ((8, 1.0), (-8, 1.0), (0, 0.92), (0, 1.08)):
        per_image = [torch.full((len(x),), value, dtype=torch.float64)
                     for value in (np.deg2rad(degrees), zoom, 0.0, 0.0)]
        moved = affine_warp(x, *per_image)
        views.append(moved.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy())
    return views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="*", default=[], help="bundles of `best` networks")
    parser.add_argument("--train", action="store_true", help="train the members here first")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to train with --train")
    parser.add_argument("--out", default="runs", help="where --train saves the member bundles")
    parser.add_argument("--tta", action="store_true",
                        help="also score with test-time augmentation (probabilities of 9 views averaged)")
    parser.add_argument("--data-dir")
    args = parser.parse_args()

    import torch

    from deepdigits import DeepDigitsError, combine, load, load_dataset, train_recipe

    ds = load_dataset("mnist", data_dir=args.data_dir)
    members = []
    if args.train:
        for seed in args.seeds:
            clf = train_recipe("best", dataset=ds, seed=seed, verbose=0)
            clf.save(Path(args.out) / f"best-s{seed}")
            members.append((f"best, seed {seed}", clf))
    try:
        members += [(f"best ({path})", load(path)) for path in args.members]
    except DeepDigitsError as exc:
        raise SystemExit(f"accuracy.py: error: {exc}") from None
    if not members:
        raise SystemExit("nothing to measure: pass --members BUNDLE ... or --train")

    views = tta_views(ds.x_test) if args.tta else []

    def score(clf) -> tuple[float, float | None]:
        # the first view is the test set as it is: its probabilities give the plain score too
        probabilities = [clf.predict_proba(view) for view in views or [ds.x_test]]
        plain = float((probabilities[0].argmax(1) == ds.y_test).mean())
        if not views:
            return plain, None
        return plain, float((sum(probabilities).argmax(1) == ds.y_test).mean())

    rows = []
    for name, clf in members:
        rows.append((name, clf.n_params, *score(clf), clf.train_seconds))
    if len(members) >= 2:
        ensemble = combine([clf for _, clf in members])
        rows.append((f"ensemble of {len(members)} (probabilities averaged)", ensemble.n_params, *score(ensemble),
                     ensemble.train_seconds))

    print(f"machine: {platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores; "
          f"torch {torch.__version__}; Python {platform.python_version()}")
    trained_in = {name: clf.precision or "not recorded" for name, clf in members}
    print("trained in: " + "; ".join(f"{name}: {precision}" for name, precision in trained_in.items()))
    print()
    tta_header, tta_rule = (" with TTA (9 views) |", "---:|") if views else ("", "")
    print(f"| model | parameters | test accuracy | errors of 10,000 |{tta_header} training seconds |")
    print(f"|---|---:|---:|---:|{tta_rule}---:|")
    for name, params, accuracy, with_tta, seconds in rows:
        tta_cell = f" {with_tta * 100:.2f}% |" if with_tta is not None else ""
        print(f"| {name} | {params:,} | {accuracy * 100:.2f}% | {round((1 - accuracy) * 10000)} |{tta_cell} "
              f"{seconds:.0f} |")
    singles = [r[2] for r in rows[: len(members)]]
    print()
    print(f"single networks: mean {np.mean(singles) * 100:.3f}%, best {max(singles) * 100:.2f}%")
    if views:
        singles_tta = [r[3] for r in rows[: len(members)]]
        print(f"single networks with TTA: mean {np.mean(singles_tta) * 100:.3f}%, best {max(singles_tta) * 100:.2f}%")


if __name__ == "__main__":
    main()
