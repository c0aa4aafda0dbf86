"""How well the built-in model (or another) reads realistic photos made from MNIST test digits.

Uses the same generator as the tests (deepdigits.synthetic): dark ink on light paper, off-centre, 60-260 px
tall, thin to thick strokes, rotated up to 10 degrees, a lighting gradient, noise and JPEG compression;
numbers of 2-6 such digits side by side with varied gaps.

    python benchmarks/recognition.py --digits 500 --numbers 100
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from deepdigits import load, load_dataset
from deepdigits.recognize import predict_digit, read_number
from deepdigits.synthetic import render_digit, render_number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=int, default=500, help="single-digit photos")
    parser.add_argument("--numbers", type=int, default=100, help="photos of 2-6 digit numbers")
    parser.add_argument("--model", help="model bundle (default: the built-in model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir")
    args = parser.parse_args()

    ds = load_dataset("mnist", data_dir=args.data_dir)
    model = load(args.model)
    rng = np.random.default_rng(args.seed)

    started = time.perf_counter()
    picks = rng.choice(len(ds.x_test), args.digits, replace=False)
    right = sum(predict_digit(render_digit(ds.x_test[i], rng), model).digit == ds.y_test[i] for i in picks)
    digit_seconds = time.perf_counter() - started

    started = time.perf_counter()
    exact = digits_right = digits_total = 0
    for _ in range(args.numbers):
        chosen = rng.choice(len(ds.x_test), int(rng.integers(2, 7)), replace=False)
        truth = "".join(str(ds.y_test[i]) for i in chosen)
        number = read_number(render_number([ds.x_test[i] for i in chosen], rng), model).number
        exact += number == truth
        if len(number) == len(truth):
            digits_right += sum(a == b for a, b in zip(number, truth, strict=True))
        digits_total += len(truth)
    number_seconds = time.perf_counter() - started

    print(f"model: {getattr(model, 'architecture', args.model)}; seed {args.seed}")
    print()
    print("| input | count | right | rate | ms per image |")
    print("|---|---:|---:|---:|---:|")
    print(f"| single-digit photos | {args.digits} | {right} | {right / args.digits:.1%} "
          f"| {digit_seconds / args.digits * 1000:.0f} |")
    print(f"| numbers of 2-6 digits (exact) | {args.numbers} | {exact} | {exact / args.numbers:.1%} "
          f"| {number_seconds / args.numbers * 1000:.0f} |")
    print(f"| digits within those numbers | {digits_total} | {digits_right} | {digits_right / digits_total:.1%} | |")


if __name__ == "__main__":
    main()
