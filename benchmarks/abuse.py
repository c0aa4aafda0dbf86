"""Abuse test of `deepdigits serve` on loopback: hostile requests beside good ones, for a bounded time.

Starts the real server (`python -m deepdigits serve`, whichever deepdigits PYTHONPATH gives) on a free
127.0.0.1 port with its stderr captured. First --good-clients clients send good requests alone for
--alone-seconds (a real MNIST test digit as a PNG to /api/predict, the answer checked against its label);
then the same good clients run for --seconds beside --hostile-clients clients (in another process) sending
the hostile mix of issue 15 (integers of 400 digits, 100,000 nested brackets, a 5,000-digit number, a chunked
upload with no length, a foreign Host header, garbage images) and one client holding slow connections
(headers never finished, bodies never finished). Prints Markdown: answers by status for each kind of request, the good
requests' p50/p99 alone and under the mix, the server's peak memory (VmHWM), its 5xx answers and the
tracebacks in its stderr.

    python benchmarks/abuse.py --seconds 12
    PYTHONPATH=/tmp/before/src python benchmarks/abuse.py   # another checkout's server, for before/after
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import io
import json
import multiprocessing
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from _server import free_port, machine_line, wait_until_up
from PIL import Image

ROUTES = ("/api/predict", "/api/predict/batch", "/api/read-number")
CHUNKED_CAP = 64 * 2**20  # a chunked upload stops here if no answer came (a server without a limit takes it all)
SLOW_SOCKETS = 20  # of each slow kind, held by the slow client
SLOW_GIVE_UP_S = 12.0  # a slow connection still open after this is counted "still open"


def mnist_digits(count: int = 32) -> list[tuple[bytes, int]]:
    """The first MNIST test digits as PNGs drawn the usual way (dark ink on white), with their labels."""
    root = Path(os.environ.get("DEEPDIGITS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with gzip.open(root / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    with gzip.open(root / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:count]
    out = []
    for image, label in zip(images, labels, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(255 - image).save(buffer, "PNG")
        out.append((buffer.getvalue(), int(label)))
    return out


def hostile_bodies() -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """name -> (route, body, headers) of the one-shot hostile requests (routes rotate for the JSON ones)."""
    big = "1" + "0" * 400
    png = io.BytesIO()
    Image.new("L", (280, 280), 255).save(png, "PNG")
    gif = io.BytesIO()
    Image.new("L", (10, 10), 255).save(gif, "GIF")
    huge_gif = bytearray(gif.getvalue())
    huge_gif[6:10] = (65535).to_bytes(2, "little") * 2
    js = {"Content-Type": "application/json"}
    return {
        "JSON, integers of 400 digits": ("*", ('{"pixels": [' + ",".join([big] * 784) + "]}").encode(), js),
        "JSON, 100,000 nested brackets": ("*", b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", js),
        "JSON, a 5,000-digit number": ("*", ('{"pixels": [' + "1" * 5000 + "]}").encode(), js),
        "garbage image: random bytes": ("/api/predict", random.Random(0).randbytes(50_000),
                                        {"Content-Type": "image/png"}),
        "garbage image: truncated PNG": ("/api/read-number", png.getvalue()[:200], {"Content-Type": "image/png"}),
        "garbage image: GIF of 65535x65535": ("/api/predict", bytes(huge_gif), {"Content-Type": "image/gif"}),
        "garbage image: empty": ("/api/predict", b"", {"Content-Type": "image/png"}),
    }


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.extra: dict[str, list[float]] = defaultdict(list)

    def add(self, kind: str, outcome: str, seconds: float | None = None) -> None:
        with self.lock:
            self.counts[kind][outcome] += 1
            if seconds is not None:
                self.latencies[kind].append(seconds)


def good_client(port: int, digits: list[tuple[bytes, int]], stop_at: float, tally: Tally, kind: str,
                offset: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = offset
    while time.perf_counter() < stop_at:
        body, label = digits[i % len(digits)]
        i += 1
        started = time.perf_counter()
        try:
            connection.request("POST", "/api/predict", body=body, headers={"Content-Type": "image/png"})
            response = connection.getresponse()
            payload = response.read()
        except OSError as exc:
            tally.add(kind, type(exc).__name__)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        elapsed = time.perf_counter() - started
        if response.status == 200:
            right = json.loads(payload).get("digit") == label
            tally.add(kind, "200" if right else "200 (wrong digit)", elapsed if right else None)
        else:
            tally.add(kind, str(response.status))
        if response.getheader("connection") == "close":
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def one_shot(port: int, route: str, body: bytes, headers: dict[str, str]) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", route, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return str(response.status)
    except OSError as exc:
        return type(exc).__name__
    finally:
        connection.close()


def read_status(sock: socket.socket, timeout: float) -> str:
    """The status of the answer on a raw socket, or what happened instead."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return "still open"
    except ConnectionResetError:
        return "reset, no answer"
    if not data:
        return "closed, no answer"
    return data.split(b" ", 2)[1].decode("ascii", "replace") if data.startswith(b"HTTP/") else "not HTTP"


def chunked_upload(port: int) -> tuple[str, int]:
    """A multipart upload with Transfer-Encoding: chunked and no length, until an answer comes or 64 MB."""
    boundary = "abuse"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n"
                     f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode())
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                "Content-Type: image/png\r\n\r\n").encode()
        block = b"0" * 65536
        try:
            sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
            while sent < CHUNKED_CAP and not select.select([sock], [], [], 0)[0]:
                sock.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                sent += len(block)
            if sent >= CHUNKED_CAP:
                tail = f"\r\n--{boundary}--\r\n".encode()
                sock.sendall(f"{len(tail):x}\r\n".encode() + tail + b"\r\n0\r\n\r\n")
        except OSError:
            pass
        return read_status(sock, 30), sent


def hostile_client(port: int, stop_at: float, tally: Tally, seed: int, rate: float) -> None:
    """Hostile requests one after another (``rate`` > 0: at most that many a second), kinds drawn at random."""
    bodies = hostile_bodies()
    kinds = [*bodies, "chunked upload, no length", "Host: attacker.example"]
    rng = random.Random(seed)
    good_png = mnist_digits(1)[0][0]
    next_at = time.perf_counter()
    while time.perf_counter() < stop_at:
        if rate > 0:
            time.sleep(max(0.0, next_at - time.perf_counter()))
            next_at = max(next_at, time.perf_counter() - 1 / rate) + 1 / rate
        kind = rng.choice(kinds)
        started = time.perf_counter()
        if kind == "chunked upload, no length":
            outcome, sent = chunked_upload(port)
            with tally.lock:
                tally.extra["MB sent per chunked upload"].append(sent / 2**20)
        elif kind == "Host: attacker.example":
            outcome = one_shot(port, "/api/predict", good_png,
                               {"Content-Type": "image/png", "Host": f"attacker.example:{port}"})
        else:
            route, body, headers = bodies[kind]
            outcome = one_shot(port, rng.choice(ROUTES) if route == "*" else route, body, headers)
        tally.add(kind, outcome, time.perf_counter() - started)


def slow_client(port: int, stop_at: float, tally: Tally) -> None:
    """SLOW_SOCKETS connections that never finish their headers and as many that never finish their body."""
    headers_kind, body_kind = "slow headers (never finished)", "slow body (never finished)"
    held: list[tuple[str, socket.socket, float]] = []
    for _ in range(SLOW_SOCKETS):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        held.append((headers_kind, sock, time.perf_counter()))
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
                     "Content-Length: 100000\r\n\r\n\x89PNG".encode())
        held.append((body_kind, sock, time.perf_counter()))
    give_up = max(stop_at, time.perf_counter() + SLOW_GIVE_UP_S)
    waiting = {sock: (kind, opened) for kind, sock, opened in held}
    while waiting and time.perf_counter() < give_up:  # each answer timed when it comes, not when read
        for sock in select.select(list(waiting), [], [], max(0.0, give_up - time.perf_counter()))[0]:
            kind, opened = waiting.pop(sock)
            tally.add(kind, read_status(sock, 1.0), time.perf_counter() - opened)
            sock.close()
    for sock, (kind, opened) in waiting.items():
        tally.add(kind, f"still open after {time.perf_counter() - opened:.0f} s")
        sock.close()


def hostile_process(port: int, start: float, stop: float, clients: int, rate: float, results) -> None:
    """The hostile clients and the slow one, from ``start`` to ``stop`` (time.monotonic()), in their own process:
    sharing the good clients' GIL would slow the good clients' own side and count it against the server."""
    tally = Tally()
    time.sleep(max(0.0, start - time.monotonic()))
    stop_at = time.perf_counter() + (stop - time.monotonic())
    threads = [threading.Thread(target=hostile_client, args=(port, stop_at, tally, i, rate)) for i in range(clients)]
    threads.append(threading.Thread(target=slow_client, args=(port, stop_at, tally)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(({k: dict(v) for k, v in tally.counts.items()}, dict(tally.latencies), dict(tally.extra)))


def run_phase(port: int, digits, seconds: float, good_clients: int, hostile_clients: int, tally: Tally,
              kind: str, rate: float = 0.0) -> float:
    """Good clients here for ``seconds``, with the hostile ones (another process) over the same span if any."""
    start = time.monotonic() + (3.0 if hostile_clients else 0.0)  # time to spawn the hostile process
    stop = start + seconds
    if hostile_clients:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        process = context.Process(target=hostile_process, args=(port, start, stop, hostile_clients, rate, results))
        process.start()
    time.sleep(max(0.0, start - time.monotonic()))
    stop_at = time.perf_counter() + (stop - time.monotonic())
    threads = [threading.Thread(target=good_client, args=(port, digits, stop_at, tally, kind, i * 7))
               for i in range(good_clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if hostile_clients:
        counts, latencies, extra = results.get(timeout=seconds + SLOW_GIVE_UP_S + 60)
        process.join()
        for name, outcomes in counts.items():
            tally.counts[name].update(outcomes)
        for name, values in latencies.items():
            tally.latencies[name].extend(values)
        for name, values in extra.items():
            tally.extra[name].extend(values)
    return elapsed


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_memory_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    ms = np.array(values) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12.0, help="duration of the mix (bounded; default 12)")
    parser.add_argument("--alone-seconds", type=float, default=6.0, help="good requests alone first (default 6)")
    parser.add_argument("--good-clients", type=int, default=2, help="clients sending good requests (default 2)")
    parser.add_argument("--hostile-clients", type=int, default=4,
                        help="clients sending the hostile mix, besides the slow-connection one (default 4)")
    parser.add_argument("--hostile-rate", type=float, default=0.0,
                        help="requests a second per hostile client (default 0: each as soon as the last is answered)")
    args = parser.parse_args()

    port = free_port()
    digits = mnist_digits()
    tally = Tally()
    with tempfile.TemporaryFile() as stderr:
        alive, peak = measure(port, digits, args, tally, stderr)
        stderr.seek(0)
        log = stderr.read().decode("utf-8", "replace")
    report(args, tally, alive, peak, log)


def measure(port: int, digits, args, tally: Tally, stderr) -> tuple[bool, float]:
    """Runs the server and both phases; (server still up, its peak memory in MB)."""
    server = subprocess.Popen([sys.executable, "-m", "deepdigits", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until_up(port)
        for body, _label in digits[:4]:  # warm up
            one_shot(port, "/api/predict", body, {"Content-Type": "image/png"})
        for phase, seconds, hostile in (("alone", args.alone_seconds, 0), ("under the mix", args.seconds,
                                                                            args.hostile_clients)):
            cpu = cpu_seconds(server.pid)
            elapsed = run_phase(port, digits, seconds, args.good_clients, hostile, tally, f"good, {phase}",
                                args.hostile_rate)
            tally.extra[f"server CPU use {phase} (cores busy)"].append((cpu_seconds(server.pid) - cpu) / elapsed)
        time.sleep(0.5)
        alive = server.poll() is None
        peak = peak_memory_mb(server.pid) if alive else float("nan")
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return alive, peak


def report(args, tally: Tally, alive: bool, peak: float, log: str) -> None:
    where = os.environ.get("PYTHONPATH") or "the installed deepdigits"
    print(f"machine: {machine_line()}")
    print(f"server: `python -m deepdigits serve` from {where}; {args.alone_seconds:g} s good requests alone, then "
          f"{args.seconds:g} s under the mix; {args.good_clients} good clients, {args.hostile_clients} hostile "
          f"clients ({f'{args.hostile_rate:g} requests/s each' if args.hostile_rate else 'closed loop'}) and 1 "
          f"holding {2 * SLOW_SOCKETS} slow connections")
    print()
    print("| requests | sent | answers by status | slowest answer s |")
    print("|---|---:|---|---:|")
    five_xx = overload = 0
    for kind, counts in tally.counts.items():
        shown = ", ".join(f"{outcome}: {n}" for outcome, n in sorted(counts.items()))
        slowest = max(tally.latencies[kind], default=float("nan"))
        print(f"| {kind} | {sum(counts.values())} | {shown} | {slowest:.2f} |")
        for outcome, n in counts.items():
            if outcome == "503":
                overload += n
            elif outcome[:1] == "5" and outcome[:3].isdigit():
                five_xx += n
    alone = percentiles(tally.latencies["good, alone"])
    mixed = percentiles(tally.latencies["good, under the mix"])
    print()
    print("| good requests (200, right digit) | p50 ms | p99 ms |")
    print("|---|---:|---:|")
    print(f"| alone | {alone[0]:.1f} | {alone[1]:.1f} |")
    print(f"| under the mix | {mixed[0]:.1f} | {mixed[1]:.1f} ({mixed[1] / alone[1]:.2f}x alone) |")
    print()
    sent = tally.extra["MB sent per chunked upload"]
    print("| server | |")
    print("|---|---:|")
    print(f"| peak memory (VmHWM) | {peak:,.0f} MB |")
    print(f"| 5xx answers other than 503 | {five_xx} |")
    print(f"| 503 answers (intended overload answers) | {overload} |")
    print(f"| tracebacks in stderr | {log.count('Traceback')} |")
    print(f"| stderr lines | {len(log.splitlines())} |")
    for phase in ("alone", "under the mix"):
        for value in tally.extra[f"server CPU use {phase} (cores busy)"]:
            print(f"| server CPU use, good requests {phase} (cores busy) | {value:.2f} |")
    if sent:
        print(f"| MB sent per chunked upload before the answer (mean; client stops at 64) | {np.mean(sent):.1f} |")
    print(f"| server still up at the end | {'yes' if alive else 'no'} |")


if __name__ == "__main__":
    main()
