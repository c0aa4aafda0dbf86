"""Load test of `deepdigits serve` on loopback: N concurrent clients for a bounded time.

Starts the real server (uvicorn) on a free 127.0.0.1 port, sends /api/predict requests with a drawn-digit
PNG from each client for --seconds, and prints answers/s, p50/p99 latency of the right answers, the busy
answers (503 or 429 with Retry-After: that client then waits as asked) and the error count as Markdown.
With --readers N, N more clients read photographed numbers of touching digits (/api/read-number) meanwhile.

    python benchmarks/serve_load.py --clients 8 --seconds 20
    python benchmarks/serve_load.py --clients 2 --readers 2 --seconds 8
"""

from __future__ import annotations

import argparse
import http.client
import io
import subprocess
import sys
import threading
import time

import numpy as np
from _server import free_port, machine_line, wait_until_up
from PIL import Image, ImageDraw


def drawn_seven() -> bytes:
    """A 280x280 PNG like the drawing page sends: a thick dark 7 on white."""
    image = Image.new("L", (280, 280), 255)
    draw = ImageDraw.Draw(image)
    draw.line([(80, 70), (200, 70), (120, 230)], fill=20, width=22, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def client(port: int, body: bytes, stop_at: float, latencies: list[float], errors: list[str],
           busy: list[float]) -> None:
    """Requests one after another; a 503/429 (the server's bounded queue is full) waits its Retry-After."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            connection.request("POST", "/api/predict", body=body, headers={"Content-Type": "image/png"})
            response = connection.getresponse()
            payload = response.read()
            if response.status in (429, 503) and response.getheader("retry-after"):
                busy.append(time.perf_counter() - started)
                time.sleep(min(float(response.getheader("retry-after")), max(0.0, stop_at - time.perf_counter())))
                continue
            if response.status != 200 or b'"digit":7' not in payload:
                errors.append(f"{response.status}: {payload[:80]!r}")
                continue
        except OSError as exc:
            errors.append(repr(exc))
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        latencies.append(time.perf_counter() - started)


def touching_numbers(count: int = 8) -> list[bytes]:
    """Photographed 4-digit numbers of MNIST test digits, every digit pushed against the one before (JPEG)."""
    from deepdigits.data import load_dataset
    from deepdigits.synthetic import render_number

    test = load_dataset("mnist")
    photos = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(test.x_test), 4, replace=False)
        photos.append(render_number([test.x_test[i] for i in picks], rng, touching=1.0))
    return photos


def number_reader(port: int, photos: list[bytes], stop_at: float, latencies: list[float], errors: list[str]) -> None:
    """Numbers to /api/read-number one after another: long jobs beside the single digits."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = 0
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        connection.request("POST", "/api/read-number", body=photos[i % len(photos)],
                           headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        response.read()
        i += 1
        (latencies if response.status == 200 else errors).append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (runs)")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each run (bounded)")
    parser.add_argument("--model", help="model bundle to serve (default: the built-in model)")
    parser.add_argument("--runtime", nargs="+", choices=["torch", "onnx"], default=["torch"],
                        help="server runtimes to measure, one after the other")
    parser.add_argument("--readers", type=int, default=0,
                        help="clients reading photographed numbers of touching digits at the same time (default 0)")
    args = parser.parse_args()

    rows = []
    for runtime in args.runtime:
        rows += measure(runtime, args)
    beside = f"; {args.readers} clients reading numbers beside them" if args.readers else ""
    print(f"machine: {machine_line()}; {args.seconds:.0f} s per run; POST /api/predict with a 280x280 PNG{beside}")
    print()
    print("| runtime | clients | answered | answered/s | p50 ms | p99 ms | busy (503/429) | errors "
          "| numbers read (p50 ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for runtime, clients, n, rate, p50, p99, errors, busy, numbers in rows:
        print(f"| {runtime} | {clients} | {n} | {rate:.1f} | {p50:.1f} | {p99:.1f} | {busy} | {errors} | {numbers} |")
    if any(r[6] for r in rows):
        raise SystemExit(1)


def measure(runtime: str, args) -> list[tuple]:
    port = free_port()
    command = [sys.executable, "-m", "deepdigits", "serve", "--port", str(port), "--runtime", runtime]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_until_up(port)
        body = drawn_seven()
        photos = touching_numbers() if args.readers else []
        for clients in args.clients:
            latencies: list[float] = []
            errors: list[str] = []
            busy: list[float] = []
            read: list[float] = []
            stop_at = time.perf_counter() + args.seconds
            threads = [threading.Thread(target=client, args=(port, body, stop_at, latencies, errors, busy))
                       for _ in range(clients)]
            threads += [threading.Thread(target=number_reader, args=(port, photos, stop_at, read, errors))
                        for _ in range(args.readers)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            ms = np.array(latencies) * 1000
            rows.append((runtime, clients, len(latencies), len(latencies) / elapsed,
                         float(np.percentile(ms, 50)) if len(ms) else float("nan"),
                         float(np.percentile(ms, 99)) if len(ms) else float("nan"), len(errors), len(busy),
                         f"{len(read)} ({np.median(read) * 1000:.0f})" if read else "-"))
            if errors:
                print(f"first error with {clients} clients: {errors[0]}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=10)
    return rows


if __name__ == "__main__":
    main()
