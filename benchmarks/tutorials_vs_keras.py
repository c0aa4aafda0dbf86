"""The five tutorials in Keras on TensorFlow beside deepdigits' recipes: training seconds and test accuracy.

Each tutorial runs exactly as it ran: the network of ``deepdigits.models`` written in Keras layer for layer,
the recipe's optimizer (Keras's own, at the recipe's learning rate), batch size, epochs, loss and
validation split, on the same images as ours. Ours is ``deepdigits.train_recipe("tutorial-00N")``, which for
recipes without a validation split (001, 002, 004) holds out the last ``calibrate.HOLDOUT`` training images
(2,000 of MNIST's 60,000; 10,000 for 002, its ``calibration_split``) for calibration and trains on the rest:
the Keras peer trains on those same images
(``calibrate.held_out_range`` decides for both; the table's "train images" column shows how many). 000 and
003 train on the first 54,000 and validate on the last 6,000 (``validation_split=0.1``), in both.

Every run is a fresh subprocess (no thread pool, allocator or cache carries over), both systems with the same
number of threads (``--threads``: torch's intra-op pool, TensorFlow's intra- and inter-op pools, OMP). The
systems alternate within a round (Keras first in even rounds, ours first in odd ones) over ``--rounds``
rounds; round ``i`` uses seed ``--seed + i`` in both. "Training seconds" is the wall time of the fit call
(``Classifier.fit`` inside ``train_recipe``; Keras's ``model.fit``, whose graph tracing it includes), with
each epoch's validation pass; imports and data loading are outside it, and so is the one-time import of
``torch._dynamo`` that PyTorch's first optimizer triggers (measured and printed). Test accuracy is on the
10,000 MNIST test images. The ratio is Keras's seconds over ours within the same round; the table gives its
median and range. The arithmetic each run trained in is printed with it: Keras's default policy,
float32; ours, what the recipe asks for where the CPU computes it natively (``deepdigits.device``).

Tutorial 000 feeds raw 0-255 pixels; the tutorial's code ran on Keras 2, whose cross-entropy clipped the
probabilities. Keras 3 does not and diverges (about 11% accuracy). ``--peer-000-loss keras2-clipped`` gives the
peer Keras 2's clipped loss (as ours trains) for an accuracy-matched comparison.

Needs the optional group: pip install -e ".[peer]" (tensorflow-cpu; Keras 3 comes with it).

    python benchmarks/tutorials_vs_keras.py --rounds 3
    python benchmarks/tutorials_vs_keras.py --tutorials 003 --rounds 3 --out runs/t003.md
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

from _machine import cpu_name, loadavg

TUTORIALS = ("000", "001", "002", "003", "004")
SYSTEMS = ("keras", "deepdigits")
# "baseline": deepdigits from another source tree (--baseline-source), e.g. a worktree of an older commit
LABELS = {"keras": "Keras on TensorFlow", "deepdigits": "deepdigits (PyTorch)", "baseline": "deepdigits baseline"}


# --------------------------------------------------------------------------- the workers (one run each)


def keras_model(tutorial: str):
    """The tutorial's network in Keras, layer for layer as ``deepdigits.models`` defines it."""
    import keras
    from keras import layers

    if tutorial == "000":
        stack = [keras.Input((784,)), layers.Dense(784, activation="relu"), layers.Dense(32, activation="relu"),
                 layers.Dense(10, activation="softmax")]
    elif tutorial == "001":
        stack = [keras.Input((784,)), layers.Dense(512, activation="relu"), layers.Dropout(0.2),
                 layers.Dense(512, activation="relu"), layers.Dropout(0.2), layers.Dense(10, activation="softmax")]
    elif tutorial == "002":
        stack = [keras.Input((784,)), layers.Dense(10, activation="sigmoid"), layers.Dense(10, activation="softmax")]
    elif tutorial == "003":
        stack = [keras.Input((28, 28, 1)),
                 layers.Conv2D(32, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
                 layers.Conv2D(64, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
                 layers.Flatten(), layers.Dropout(0.5), layers.Dense(10, activation="softmax")]
    elif tutorial == "004":
        stack = [keras.Input((784,)), layers.Dense(512, activation="relu"), layers.Dense(10, activation="softmax")]
    else:
        raise ValueError(tutorial)
    return keras.Sequential(stack)


def keras_optimizer(name: str, learning_rate: float):
    """Keras's optimizer of that name at the recipe's rate (Keras's defaults otherwise, as the tutorials used)."""
    import keras

    return {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam,
            "rmsprop": keras.optimizers.RMSprop}[name](learning_rate=learning_rate)


def keras2_clipped_categorical_crossentropy(y_true, y_pred):
    """Keras 2's categorical cross-entropy on softmax outputs: probabilities clipped to [1e-7, 1 - 1e-7]."""
    from keras import ops

    y_pred = ops.clip(y_pred, 1e-7, 1.0 - 1e-7)
    return -ops.sum(y_true * ops.log(y_pred), axis=-1)


def run_keras(tutorial: str, seed: int, threads: int, peer_000_loss: str, ds, epochs: int | None) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    from deepdigits.calibrate import held_out_range
    from deepdigits.recipes import get_recipe

    recipe = get_recipe(f"tutorial-{tutorial}")
    keras.utils.set_random_seed(seed)
    n = len(ds.x_train)
    # the images ours trains (and validates) on: with a validation split, all of them (Keras takes the last
    # fraction, as ours does); without one, all but the images ours holds out for calibration (the last
    # calibrate.HOLDOUT, or the recipe's calibration_split: 10,000 for tutorial 002)
    stop = n if recipe.validation_split else held_out_range(n, 0.0, recipe.calibration_split).start
    shape = (-1, 28, 28, 1) if tutorial == "003" else (-1, 784)
    x_train = ds.x_train[:stop].reshape(shape).astype("float32") * recipe.input_scale
    y_train = keras.utils.to_categorical(ds.y_train[:stop], 10)
    x_test = ds.x_test.reshape(shape).astype("float32") * recipe.input_scale
    loss = "categorical_crossentropy"
    if tutorial == "000" and peer_000_loss == "keras2-clipped":
        loss = keras2_clipped_categorical_crossentropy
    started = time.perf_counter()
    model = keras_model(tutorial)
    model.compile(optimizer=keras_optimizer(recipe.optimizer, recipe.learning_rate), loss=loss,
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=recipe.batch_size, epochs=epochs or recipe.epochs,
              validation_split=recipe.validation_split, verbose=0)
    seconds = time.perf_counter() - started
    predicted = model.predict(x_test, batch_size=1000, verbose=0).argmax(axis=1)
    trained_on = math.ceil(stop * (1.0 - recipe.validation_split))  # Keras 3's split point
    return {"seconds": seconds, "accuracy": float((predicted == ds.y_test).mean()), "train_images": trained_on,
            "precision": keras.config.dtype_policy().name,
            "version": f"keras {keras.__version__}, tensorflow {tf.__version__}"}


def run_deepdigits(tutorial: str, seed: int, threads: int, ds, epochs: int | None) -> dict:
    import torch

    torch.set_num_threads(threads)
    import deepdigits
    from deepdigits import classifier

    # The first optimizer a process makes imports torch._dynamo (about 1 s): a one-time import like Keras's
    # own, so it happens here, outside the clock, and is reported.
    started = time.perf_counter()
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    import_seconds = time.perf_counter() - started

    fits = []
    original_fit = classifier.Classifier.fit

    def timed_fit(self, x, y, **kwargs):
        fits.append({"train_images": len(x)})
        started = time.perf_counter()
        try:
            return original_fit(self, x, y, **kwargs)
        finally:
            fits[-1]["seconds"] = time.perf_counter() - started

    classifier.Classifier.fit = timed_fit  # the exact train_recipe path, with a clock around its fit call
    try:
        clf = deepdigits.train_recipe(f"tutorial-{tutorial}", dataset=ds, seed=seed, epochs=epochs, verbose=0)
    finally:
        classifier.Classifier.fit = original_fit
    (fit,) = fits
    return {"seconds": fit["seconds"], "accuracy": float(clf.score(ds.x_test, ds.y_test)),
            "train_images": fit["train_images"], "precision": clf.precision,
            "import_seconds": import_seconds, "version": f"torch {torch.__version__}"}


def worker(args) -> None:
    if args.worker == "keras":
        import tensorflow  # noqa: F401  (first: deepdigits' import sets OMP_WAIT_POLICY, meant for torch)
    from deepdigits import load_dataset

    ds = load_dataset("mnist", data_dir=args.data_dir)
    before = loadavg()
    if args.worker == "keras":
        result = run_keras(args.tutorial, args.seed, args.threads, args.peer_000_loss, ds, args.epochs)
    else:
        result = run_deepdigits(args.tutorial, args.seed, args.threads, ds, args.epochs)
    result.update(system=args.worker, tutorial=args.tutorial, seed=args.seed, threads=args.threads,
                  loadavg_before=before, loadavg_after=loadavg())
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the driver


def run_one(system: str, tutorial: str, seed: int, args) -> dict:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if system == "baseline":
        env["PYTHONPATH"] = os.pathsep.join([args.baseline_source, *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, __file__, "--worker", "deepdigits" if system == "baseline" else system,
               "--tutorial", tutorial, "--seed", str(seed), "--threads", str(args.threads),
               "--peer-000-loss", args.peer_000_loss]
    if args.epochs:
        command += ["--epochs", str(args.epochs)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"{system} tutorial {tutorial} seed {seed} failed (exit {done.returncode})")
    return {**json.loads(lines[-1][len("RESULT "):]), "system": system}


def median_and_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def report(runs: list[dict], args, machine: str, started_load: str) -> str:
    systems = [s for s in ("keras", "baseline", "deepdigits") if s in args.systems]
    lines = [machine, f"load average (1, 5, 15 min) at start: {started_load}; at end: {loadavg()}", ""]
    if args.epochs:
        lines[-1:] = [f"SHORTENED RUN: {args.epochs} epoch(s) in every system, not the tutorials' own count", ""]
    header = ["tutorial"]
    for system in systems:
        header += [f"{LABELS[system]}: training s (median)", "test acc. (mean)"]
    ratios = [(other, "deepdigits") for other in ("keras", "baseline") if other in systems and "deepdigits" in systems]
    header += [f"{LABELS[a]} / ours: median (range)" for a, _ in ratios]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for tutorial in args.tutorials:
        by = {s: {r["round"]: r for r in runs if r["tutorial"] == tutorial and r["system"] == s} for s in systems}
        if not all(by.values()):
            continue
        cells = [tutorial]
        for system in systems:
            mine = list(by[system].values())
            cells.append(f"{statistics.median(r['seconds'] for r in mine):.1f}")
            cells.append(f"{statistics.mean(r['accuracy'] for r in mine) * 100:.2f}%")
        for a, b in ratios:  # within the same round only
            rounds = sorted(set(by[a]) & set(by[b]))
            cells.append(median_and_range([by[a][i]["seconds"] / by[b][i]["seconds"] for i in rounds]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every run (in the order they ran):", "",
              "| round | tutorial | system | seed | train images | arithmetic | training s | test acc. "
              "| load avg before -> after |",
              "|---:|---|---|---:|---:|---|---:|---:|---|"]
    for r in runs:
        lines.append(f"| {r['round']} | {r['tutorial']} | {LABELS[r['system']]} | {r['seed']} | {r['train_images']:,} "
                     f"| {r.get('precision', 'float32')} | {r['seconds']:.1f} | {r['accuracy'] * 100:.2f}% "
                     f"| {r['loadavg_before']} -> {r['loadavg_after']} |")
    imports = [r["import_seconds"] for r in runs if "import_seconds" in r]
    if imports:
        lines += ["", f"(PyTorch's one-time import on its first optimizer, outside the clock: median "
                      f"{statistics.median(imports):.2f} s)"]
    if "000" in args.tutorials and "keras" in systems:
        lines += [f"(tutorial 000's loss in Keras: {args.peer_000_loss})"]
    if "baseline" in systems:
        lines += [f"(baseline: deepdigits from {args.baseline_source})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tutorials", nargs="+", default=list(TUTORIALS), choices=TUTORIALS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="round i uses seed SEED + i")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=[*SYSTEMS, "baseline"])
    parser.add_argument("--baseline-source", help="a deepdigits src/ folder (e.g. of a git worktree at an older "
                        "commit) run as a third system, 'baseline', alternated with the others")
    parser.add_argument("--peer-000-loss", choices=("keras3", "keras2-clipped"), default="keras3",
                        help="tutorial 000's loss in Keras: as its code runs in Keras 3 (default), or Keras 2's")
    parser.add_argument("--epochs", type=int, help="a shortened run: this many epochs in both (the table says so)")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", help="also write the Markdown here")
    parser.add_argument("--json", help="also write every run as JSON here")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--tutorial", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_source and "baseline" not in args.systems:
        args.systems.append("baseline")
    if "baseline" in args.systems and not args.baseline_source:
        parser.error("the baseline system needs --baseline-source")
    if args.worker:
        worker(args)
        return

    import torch

    machine = (f"machine: {cpu_name()}, {os.cpu_count()} cores, vector extensions "
               f"{torch.backends.cpu.get_cpu_capability()} (torch.backends.cpu.get_cpu_capability()); "
               f"{args.threads} threads for each system; Python {platform.python_version()}")
    started_load = loadavg()
    print(machine, file=sys.stderr)
    runs: list[dict] = []
    for round_ in range(args.rounds):
        seed = args.seed + round_
        for tutorial in args.tutorials:
            order = list(args.systems) if round_ % 2 == 0 else list(reversed(args.systems))
            for system in order:
                result = run_one(system, tutorial, seed, args)
                result["round"] = round_
                runs.append(result)
                print(f"round {round_} tutorial {tutorial} {system:10s} seed {seed}: {result['seconds']:7.1f} s, "
                      f"{result['accuracy'] * 100:.2f}% (load {result['loadavg_before']} -> "
                      f"{result['loadavg_after']})", file=sys.stderr, flush=True)
    versions = sorted({r["version"] for r in runs})
    text = report(runs, args, machine + "; " + "; ".join(versions), started_load)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
