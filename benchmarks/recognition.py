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

Exact-read rates are given for the numbers of 2-6 digits and for all of 2-8 digits, read as ``read_number``
reads them (the segmenter and the line reader combined) and, from the same cut, by the segmenter alone.
"Hard" numbers hold a digit the model misreads even unphotographed (its clean 28 x 28 test image); the
column gives how many of them were read exactly anyway. A second table writes one digit of each number as a
letter, symbol, scribble or smiley instead (``nondigits.mnist_like``): how often the reading shows it ("?" or
not a number) and reads the rest right.

    python benchmarks/recognition.py --digits 500 --numbers 300 --marks 100 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import numpy as np

from deepdigits import load, load_dataset
from deepdigits.calibrate import expected_calibration_error
from deepdigits.nondigits import MARK_KINDS, write_mark
from deepdigits.recognize import predict_digit, read_digits
from deepdigits.segment import find_digits
from deepdigits.synthetic import CONDITIONS, condition_options, render_digit, render_number

LENGTHS = range(2, 9)




def number_cases(x: np.ndarray, y: np.ndarray, condition: str, count: int, seed: int, marks: bool = False,
                 picked: list[np.ndarray] | None = None) -> list[tuple[str, bytes]]:
    """``count`` photographed numbers (truth, JPEG bytes) of 2-8 MNIST test digits, as many of each length;
    with ``marks``, one digit of each is a letter, symbol, scribble or smiley instead ("?" in the truth).
    ``picked``, where given, receives each number's indices into ``x``."""
    rng = np.random.default_rng([seed + (1000 if marks else 0), CONDITIONS.index(condition)])
    cases = []
    for k in range(count):
        length = LENGTHS[k % len(LENGTHS)]
        chosen = rng.choice(len(x), length, replace=False)
        if picked is not None:
            picked.append(chosen)
        written, truth = [x[i] for i in chosen], "".join(str(y[i]) for i in chosen)
        if marks:
            where = write_mark(written, MARK_KINDS[k % len(MARK_KINDS)], rng)
            truth = truth[:where] + "?" + truth[where + 1 :]
        cases.append((truth, render_number(written, rng, **condition_options(condition, rng))))
    return cases


def score_marks(cases: list[tuple[str, bytes]], model, reader=True) -> dict:
    """Numbers holding a mark: shown ("?" in the reading, or not a number at all), read exactly (the mark as
    "?", every digit right), and the same for the segmenter alone from the same cut."""
    shown = exact = alone_shown = alone_exact = 0
    for truth, image in cases:
        found = find_digits(image, predictor=model)
        for reading, counts in ((read_digits(found, model, line_reader=reader), 0),
                                (read_digits(found, model, line_reader=False), 1)):
            flagged = "?" in reading.number or reading.not_a_digit
            right = reading.number == truth
            if counts:
                alone_shown, alone_exact = alone_shown + flagged, alone_exact + right
            else:
                shown, exact = shown + flagged, exact + right
    return {"n": len(cases), "shown": shown, "exact": exact, "alone_shown": alone_shown, "alone_exact": alone_exact}


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


def score(cases: list[tuple[str, bytes]], model, reader=True, hard: list[bool] | None = None) -> dict:
    """Exact reads for 2-6 and 2-8 digits, right digit counts, digits right where the count is, and time:
    the segmenter alone (``alone_*``) and with the line reader, from the same cut (``find_digits``); each
    digit's probabilities where the count is right (for its calibration error). ``hard`` marks the numbers
    holding a digit the model misreads unphotographed: how many, and how many of them were read exactly."""
    hard = hard or [False] * len(cases)
    rows, alone = [], []
    probabilities: list[list[float]] = []
    labels: list[int] = []
    seconds = 0.0
    for truth, image in cases:
        started = time.perf_counter()
        found = find_digits(image, predictor=model)
        reading = read_digits(found, model, line_reader=reader)
        number = reading.number
        seconds += time.perf_counter() - started
        if len(number) == len(truth):
            probabilities += [d.probabilities for d in reading.digits]
            labels += [int(t) for t in truth]
        alone.append(read_digits(found, model, line_reader=False).number == truth)
        rows.append((len(truth), number == truth, len(number) == len(truth),
                     sum(a == b for a, b in zip(number, truth, strict=False)) if len(number) == len(truth) else 0))
    short = [r for r in rows if r[0] <= 6]
    return {"n_short": len(short), "exact_short": sum(r[1] for r in short), "n": len(rows),
            "exact": sum(r[1] for r in rows), "alone": sum(alone),
            "alone_short": sum(a for a, r in zip(alone, rows, strict=True) if r[0] <= 6),
            "count_right": sum(r[2] for r in rows), "digits": sum(r[0] for r in rows),
            "digits_right": sum(r[3] for r in rows), "ms": seconds / max(1, len(rows)) * 1000,
            "hard": sum(hard), "hard_exact": sum(r[1] for r, h in zip(rows, hard, strict=True) if h),
            "probabilities": probabilities, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=int, default=500, help="single-digit photos")
    parser.add_argument("--numbers", type=int, default=300, help="photos of 2-8 digit numbers per condition")
    parser.add_argument("--marks", type=int, default=100, help="photos of numbers with a mark per condition")
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--model", help="model bundle (default: the built-in model)")
    parser.add_argument("--line-reader", help="line reader folder (default: the built-in one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    for name in ("digits", "numbers", "marks"):
        if getattr(args, name) < 0:
            parser.error(f"--{name}: expected 0 or more, got {getattr(args, name)}")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ds = load_dataset("mnist", data_dir=args.data_dir)
    model = load(args.model)
    reader = True  # the built-in line reader
    if args.line_reader:
        from deepdigits.errors import DeepDigitsError
        from deepdigits.linereader import LineReader

        try:
            reader = LineReader.load(args.line_reader)
        except DeepDigitsError as exc:
            parser.error(f"--line-reader: {exc}")

    print(f"command: python {shlex.join(sys.argv)}")
    print(machine_line())
    print(f"model: {getattr(model, 'architecture', None) or args.model or 'built-in'}; "
          f"line reader: {args.line_reader or 'built-in'}; seed {args.seed}")
    print()
    if args.digits:
        rng = np.random.default_rng(args.seed)
        started = time.perf_counter()
        picks = rng.choice(len(ds.x_test), args.digits, replace=False)
        right = sum(predict_digit(render_digit(ds.x_test[i], rng), model).digit == ds.y_test[i] for i in picks)
        ms = (time.perf_counter() - started) / args.digits * 1000
        print(f"single-digit photos: {right} of {args.digits} right ({right / args.digits:.1%}), {ms:.0f} ms each")
        print()
    if args.numbers:
        number_table(args, ds, model, reader)
    if args.marks:
        print("Numbers with a letter, symbol, scribble or smiley among the digits:")
        print()
        print("| condition | mark shown | read exactly | segmenter alone: shown / exactly |")
        print("|---|---:|---:|---:|")
        totals = dict.fromkeys(("n", "shown", "exact", "alone_shown", "alone_exact"), 0)
        for condition in args.conditions:
            result = score_marks(number_cases(ds.x_test, ds.y_test, condition, args.marks, args.seed, marks=True),
                                 model, reader)
            totals = {key: totals[key] + result[key] for key in totals}
            print(mark_row(condition, result))
        if len(args.conditions) > 1:
            print(mark_row("**all**", totals))
        print()
    print(f"load average at the end: {load_average()}")


def number_table(args: argparse.Namespace, ds, model, reader) -> None:
    """The numbers table: each way of writing, then all of them. "Hard" numbers hold a digit the model misreads
    even as the unphotographed 28 x 28 test image: the segmenter's reading of them is wrong before any photo
    effect, so (numbers - hard) / numbers is about the exact rate of a pipeline that reads every photographed
    digit as well as its clean image (the line reader, another network, rescues a few)."""
    misread = np.asarray(model.predict(ds.x_test)) != ds.y_test
    print("| condition | 2-6 digits exact | 2-8 digits exact | segmenter alone: 2-6 / 2-8 | digit count right "
          "| digits right | digit ECE | hard: read exactly | ms per number |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    total: dict = {}
    for condition in args.conditions:
        picked: list[np.ndarray] = []
        cases = number_cases(ds.x_test, ds.y_test, condition, args.numbers, args.seed, picked=picked)
        result = score(cases, model, reader, hard=[bool(misread[p].any()) for p in picked])
        for key, value in result.items():
            total[key] = total.get(key, [] if isinstance(value, list) else 0) + value
        print(row(condition, result))
    if len(args.conditions) > 1:
        total["ms"] /= len(args.conditions)
        print(row("**all**", total))
    print()


def mark_row(name: str, r: dict) -> str:
    n = r["n"]
    return (f"| {name} | {r['shown']}/{n} {r['shown'] / n:.1%} | {r['exact']}/{n} {r['exact'] / n:.1%} "
            f"| {r['alone_shown'] / n:.1%} / {r['alone_exact'] / n:.1%} |")


def row(name: str, r: dict) -> str:
    return (f"| {name} | {r['exact_short']}/{r['n_short']} {r['exact_short'] / r['n_short']:.1%} "
            f"| {r['exact']}/{r['n']} {r['exact'] / r['n']:.1%} "
            f"| {r['alone_short'] / r['n_short']:.1%} / {r['alone'] / r['n']:.1%} | {r['count_right'] / r['n']:.1%} "
            f"| {r['digits_right'] / r['digits']:.2%} "
            f"| {expected_calibration_error(np.array(r['probabilities']), np.array(r['labels'])):.2%} "
            f"| {r['hard_exact']}/{r['hard']} | {r['ms']:.0f} |")


if __name__ == "__main__":
    main()
