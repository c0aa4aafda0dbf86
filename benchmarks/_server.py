"""What the serving benchmarks share: a free loopback port, waiting for the server, the machine line."""

from __future__ import annotations

import http.client
import os
import platform
import socket
import time

from _machine import cpu_name, loadavg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, timeout: float = 90) -> None:
    """Return once GET /healthz answers 200 on 127.0.0.1:``port``; exit the benchmark after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("server did not start")


def machine_line() -> str:
    """CPU model, torch's vector extension, cores, Python and the load average (other work on the machine)."""
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # only for the report
        capability = "unknown"
    return (f"{cpu_name()}, vector extension {capability}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, load average {loadavg()}")
