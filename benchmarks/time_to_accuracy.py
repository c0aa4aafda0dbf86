"""Seconds to 99.0% MNIST test accuracy: deepdigits' `fast` recipe beside tutorial 003 in Keras on TensorFlow.

Both run in this one process on the same data, one after the other, over several seeds. Test accuracy is
measured after every epoch with the clock stopped; "seconds to 99.0%" is the training time up to the first
epoch that reaches it. The peer is tutorial 003's network and recipe exactly as the tutorial ran it
(Adam, batch 128, 10 epochs, validation_split 0.1). It needs the optional group: pip install -e ".[peer]".

    python benchmarks/time_to_accuracy.py --seeds 0 1 2 3 4 --peer-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _machine import cpu_name

from deepdigits import Classifier, load_dataset
from deepdigits.device import precision_text
from deepdigits.recipes import get_recipe

TARGET = 0.99


def import_optimizer_dependencies() -> float:
    """Seconds the first optimizer in a process takes: torch.optim imports torch._dynamo then.

    That is a one-time import, like the peer's ``import keras`` which is also outside the clock, not
    training; it is measured and printed rather than charged to the first seed.
    """
    import torch

    started = time.perf_counter()
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    return time.perf_counter() - started


def run_ours(ds, seed: int) -> dict:
    recipe = get_recipe("fast")
    curve = []  # (training seconds so far, test accuracy) per epoch
    paused = 0.0
    started = time.perf_counter()

    def on_epoch_end(epoch, _metrics):
        nonlocal paused
        stop = time.perf_counter()
        accuracy = clf.score(ds.x_test, ds.y_test)
        curve.append((stop - started - paused, accuracy))
        paused += time.perf_counter() - stop

    clf = Classifier.from_recipe(recipe, seed=seed)  # model build inside the clock
    clf.fit(ds.x_train, ds.y_train, verbose=0, on_epoch_end=on_epoch_end, **{**recipe.fit_options(), "seed": seed})
    total = time.perf_counter() - started - paused
    final = clf.score(ds.x_test, ds.y_test)  # after fit's final batch-norm/weights step
    return {"system": "deepdigits fast (PyTorch)", "seed": seed, "curve": curve, "final": final, "total": total}


def run_peer(ds, seed: int) -> dict:
    import keras

    keras.utils.set_random_seed(seed)
    x_train = (ds.x_train.astype("float32") / 255)[..., None]
    x_test = (ds.x_test.astype("float32") / 255)[..., None]
    y_train = keras.utils.to_categorical(ds.y_train, 10)
    curve = []
    paused = 0.0
    started = time.perf_counter()

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            nonlocal paused
            stop = time.perf_counter()
            predicted = self.model.predict(x_test, batch_size=1000, verbose=0).argmax(axis=1)
            curve.append((stop - started - paused, float((predicted == ds.y_test).mean())))
            paused += time.perf_counter() - stop

    layers = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Flatten(), layers.Dropout(0.5), layers.Dense(10, activation="softmax"),
    ])
    model.compile("adam", loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=128, epochs=10, validation_split=0.1, verbose=0, callbacks=[Probe()])
    total = time.perf_counter() - started - paused
    return {"system": "tutorial 003 (Keras on TensorFlow)", "seed": seed, "curve": curve, "final": curve[-1][1],
            "total": total}


def seconds_to_target(curve) -> float | None:
    return next((seconds for seconds, accuracy in curve if accuracy >= TARGET), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds for ours")
    parser.add_argument("--peer-seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds for the peer (none: skip)")
    parser.add_argument("--data-dir")
    args = parser.parse_args()

    ds = load_dataset("mnist", data_dir=args.data_dir)
    import_seconds = import_optimizer_dependencies()
    runs = [run_ours(ds, seed) for seed in args.seeds]
    if args.peer_seeds:
        runs += [run_peer(ds, seed) for seed in args.peer_seeds]

    import torch

    versions = f"torch {torch.__version__}"
    if args.peer_seeds:
        import tensorflow as tf

        versions += f", tensorflow {tf.__version__}"
    print(f"machine: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores; "
          f"Python {platform.python_version()}, {versions}")
    print(f"ours trains in {precision_text(get_recipe('fast').bf16, torch.device('cpu'))}")
    print(f"(one-time import when the process makes its first optimizer, not counted: {import_seconds:.2f} s)")
    print()
    print("| system | seed | seconds to 99.0% | final test accuracy | training seconds |")
    print("|---|---:|---:|---:|---:|")
    for r in runs:
        reached = seconds_to_target(r["curve"])
        shown = f"{reached:.1f}" if reached is not None else "not reached"
        print(f"| {r['system']} | {r['seed']} | {shown} | {r['final'] * 100:.2f}% | {r['total']:.1f} |")
    print()
    systems = list(dict.fromkeys(r["system"] for r in runs))
    means = {}
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        times = [seconds_to_target(r["curve"]) for r in mine]
        reached = [t for t in times if t is not None]
        means[system] = np.mean(reached) if reached else None
        mean_time = f"{means[system]:.1f} s" if reached else "never"
        print(f"{system}: mean final accuracy {np.mean([r['final'] for r in mine]) * 100:.2f}% over {len(mine)} "
              f"seeds; reached 99.0% in {len(reached)} of {len(mine)}, mean time to it {mean_time}; mean training "
              f"time {np.mean([r['total'] for r in mine]):.1f} s")
    if len(systems) == 2 and all(means.values()):
        print(f"ratio: the peer takes {means[systems[1]] / means[systems[0]]:.1f}x as long as ours to reach 99.0%")


if __name__ == "__main__":
    main()
