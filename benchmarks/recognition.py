"""How well the built-in model (or another) reads realistic photos made from MNIST test digits.

Uses the same generator as the tests (deepdigits.synthetic): dark ink on light paper, off-centre, 60-260 px
tall, thin to thick strokes, rotated up to 10 degrees, a lighting gradient, noise and JPEG compression.
Numbers are 2-8 such digits side by side (as many of each length), written under each condition:

- clean: today's generator, gaps of 10-60% of the digits' height;
- touching: every digit touches its neighbour (ink against ink, up to 6% of the height overlapping);
- slant: the whole number sheared 5-10 degrees, left or right;
- baseline: the baseline drifts (tilt and wave, up to 40% of the height), digit heights vary +-15%;
- mixed: all at once, as people write: a third of the neighbours touch, gaps of 2-80%, slant within
  +-10 degrees, a drifting baseline and varied heights.

Exact-read rates are given for the numbers of 2-6 digits and for all of 2-8 digits.

    python benchmarks/recognition.py --digits 500 --numbers 300 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable

import numpy as np

from deepdigits import load, load_dataset
from deepdigits.recognize import predict_digit, read_number
from deepdigits.synthetic import render_digit, render_number

LENGTHS = range(2, 9)


def condition_options(condition: str, rng: np.random.Generator) -> dict:
    """The keyword options of ``render_number`` for one number written under ``condition``."""
    if condition == "clean":
        return {}
    if condition == "touching":
        return {"touching": 1.0}
    if condition == "slant":
        return {"slant": float(rng.choice([-1, 1]) * rng.uniform(5, 10))}
    if condition == "baseline":
        return {"drift": 0.4, "height_spread": 0.15}
    if condition == "mixed":
        return {"touching": 0.33, "gaps": (0.02, 0.8), "slant": float(rng.uniform(-10, 10)), "drift": 0.4,
                "height_spread": 0.15}
    raise ValueError(condition)


CONDITIONS = ("clean", "touching", "slant", "baseline", "mixed")


def number_cases(x: np.ndarray, y: np.ndarray, condition: str, count: int, seed: int,
                 ) -> list[tuple[str, bytes]]:
    """``count`` photographed numbers (truth, JPEG bytes) of 2-8 MNIST test digits, as many of each length."""
    rng = np.random.default_rng([seed, CONDITIONS.index(condition)])
    cases = []
    for k in range(count):
        length = LENGTHS[k % len(LENGTHS)]
        chosen = rng.choice(len(x), length, replace=False)
        truth = "".join(str(y[i]) for i in chosen)
        cases.append((truth, render_number([x[i] for i in chosen], rng, **condition_options(condition, rng))))
    return cases


def machine_line() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {model}; torch {torch.__version__} CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"{cores} cores, {torch.get_num_threads()} torch threads; load average {load_average()}")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: the machine is shared, and the times depend on them."""
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "-"


def score(cases: list[tuple[str, bytes]], read: Callable[[bytes], str]) -> dict:
    """Exact reads for 2-6 and 2-8 digits, right digit counts, and digits right where the count is."""
    rows = []
    started = time.perf_counter()
    for truth, image in cases:
        number = read(image)
        rows.append((len(truth), number == truth, len(number) == len(truth),
                     sum(a == b for a, b in zip(number, truth, strict=False)) if len(number) == len(truth) else 0))
    seconds = time.perf_counter() - started
    short = [r for r in rows if r[0] <= 6]
    return {"n_short": len(short), "exact_short": sum(r[1] for r in short), "n": len(rows),
            "exact": sum(r[1] for r in rows), "count_right": sum(r[2] for r in rows),
            "digits": sum(r[0] for r in rows), "digits_right": sum(r[3] for r in rows),
            "ms": seconds / max(1, len(rows)) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=int, default=500, help="single-digit photos")
    parser.add_argument("--numbers", type=int, default=300, help="photos of 2-8 digit numbers per condition")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--model", help="model bundle (default: the built-in model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--data-dir")
    args = parser.parse_args()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ds = load_dataset("mnist", data_dir=args.data_dir)
    model = load(args.model)

    print(f"command: python {shlex.join(sys.argv)}")
    print(machine_line())
    print(f"model: {getattr(model, 'architecture', None) or args.model or 'built-in'}; seed {args.seed}")
    print()
    if args.digits:
        rng = np.random.default_rng(args.seed)
        started = time.perf_counter()
        picks = rng.choice(len(ds.x_test), args.digits, replace=False)
        right = sum(predict_digit(render_digit(ds.x_test[i], rng), model).digit == ds.y_test[i] for i in picks)
        ms = (time.perf_counter() - started) / args.digits * 1000
        print(f"single-digit photos: {right} of {args.digits} right ({right / args.digits:.1%}), {ms:.0f} ms each")
        print()
    print("| condition | 2-6 digits exact | 2-8 digits exact | digit count right | digits right | ms per number |")
    print("|---|---:|---:|---:|---:|---:|")
    total: dict[str, float] = {}
    for condition in args.conditions:
        cases = number_cases(ds.x_test, ds.y_test, condition, args.numbers, args.seed)
        result = score(cases, lambda image: read_number(image, model).number)
        for key, value in result.items():
            total[key] = total.get(key, 0) + value
        print(row(condition, result))
    if len(args.conditions) > 1:
        total["ms"] /= len(args.conditions)
        print(row("**all**", total))
    print()
    print(f"load average at the end: {load_average()}")


def row(name: str, r: dict) -> str:
    return (f"| {name} | {r['exact_short']}/{r['n_short']} {r['exact_short'] / r['n_short']:.1%} "
            f"| {r['exact']}/{r['n']} {r['exact'] / r['n']:.1%} | {r['count_right'] / r['n']:.1%} "
            f"| {r['digits_right'] / r['digits']:.2%} | {r['ms']:.0f} |")


if __name__ == "__main__":
    main()
