"""Inference speed (images/s at batch 1, 64, 1024), PyTorch beside ONNX Runtime, and peak memory.

Models: `fast` (trained here, about 2 s) and `best` (the built-in model unless --best names a bundle).
Peak RSS is measured in fresh processes: one that trains `fast`, one that serves the built-in model
under a short load.

    python benchmarks/inference.py
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import subprocess
import sys
import textwrap
import time

import numpy as np


def images_per_second(predict, images: np.ndarray, batch: int, seconds: float = 2.0) -> float:
    chunk = images[:batch]
    predict(chunk)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predict(chunk)
        done += len(chunk)
    return done / (time.perf_counter() - started)


def peak_rss_training(data_dir: str | None) -> float:
    """MiB: peak resident memory of a fresh process that loads MNIST and trains the `fast` recipe."""
    code = textwrap.dedent(f"""
        import resource
        from deepdigits import train_recipe
        train_recipe("fast", data_dir={data_dir!r}, verbose=0)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def peak_rss_serving(requests: int = 300) -> float:
    """MiB: peak resident memory of `deepdigits serve` after a burst of requests."""
    from serve_load import drawn_seven, free_port, wait_until_up  # the load test's helpers, same folder

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "deepdigits", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(port)
        body = drawn_seven()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(requests):
            connection.request("POST", "/api/predict", body=body, headers={"Content-Type": "image/png"})
            connection.getresponse().read()
        with open(f"/proc/{server.pid}/status") as f:
            peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        return peak_kib / 1024
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--best", help="bundle for `best` (default: the built-in model)")
    parser.add_argument("--data-dir")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window per measurement")
    args = parser.parse_args()

    import torch

    from deepdigits import load, load_dataset, train_recipe
    from deepdigits.export import OnnxClassifier

    ds = load_dataset("mnist", data_dir=args.data_dir)
    images = ds.x_test[:1024]
    models = {"fast": train_recipe("fast", dataset=ds, verbose=0), "best": load(args.best)}
    rows = []
    for name, clf in models.items():
        runtimes = {"PyTorch": clf.predict_proba, "ONNX Runtime": OnnxClassifier.from_classifier(clf).predict_proba}
        for runtime, predict in runtimes.items():
            rates = [images_per_second(predict, images, batch, args.seconds) for batch in (1, 64, 1024)]
            rows.append((name, runtime, *rates))

    training_mib = peak_rss_training(args.data_dir)
    serving_mib = peak_rss_serving()

    print(f"machine: {platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores; "
          f"torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); Python {platform.python_version()}")
    print()
    print("| model | runtime | batch 1 (img/s) | batch 64 (img/s) | batch 1024 (img/s) |")
    print("|---|---|---:|---:|---:|")
    for name, runtime, b1, b64, b1024 in rows:
        print(f"| {name} | {runtime} | {b1:,.0f} | {b64:,.0f} | {b1024:,.0f} |")
    print()
    print(f"peak RSS while training `fast` (fresh process, data loaded): {training_mib:,.0f} MiB")
    print(f"peak RSS while serving the built-in model (300 requests): {serving_mib:,.0f} MiB")


if __name__ == "__main__":
    main()
