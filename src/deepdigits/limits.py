"""The HTTP layer of ``deepdigits serve``: Host allow-list, body limits and timeouts, header timeout, connection cap."""

from __future__ import annotations

import asyncio
import http
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger("deepdigits.serve")

# Time. A probe held 400 connections that never finished their headers, or trickled their bodies, open for
# 20 s and more (uvicorn's h11 protocol has no header timeout, and nothing timed out a body).
HEADER_TIMEOUT = 5.0  # seconds from connecting (or from the last answer) to a request's complete headers
BODY_TIMEOUT = 10.0  # seconds from the headers to the end of the body: 8 MB needs 0.8 MB/s, loopback does 300+
RETRY_AFTER_S = 1  # what a 503 asks a client to wait

# Memory held by request bodies of all requests at once (each at most the body limit, 8 MB by default): 16
# full-size uploads.
MAX_BUFFERED_BYTES = 128 * 1024 * 1024

# Connections. Beyond this many open at once a new one is answered 503 and closed at once, kept below the
# file-descriptor limit (often 1024) so that accept() never fails with EMFILE (asyncio logs that with a
# traceback and stops accepting for a second).
MAX_CONNECTIONS = 900
# A request line and headers over this: 400 from h11 while they arrive, 431 from the guard if they came in one
# read (h11 caps only incomplete events: measured, 20 KB of headers in one send were answered 200).
MAX_HEADER_BYTES = 16 * 1024

# Refusals. A client address refused more often than REFUSALS_PER_S on average (REFUSAL_BURST at once) gets
# each further refusal (any 4xx) after REFUSAL_DELAY_S, its body freed first; its good answers are never held.
# A client that keeps sending what is refused (a fuzzer, a broken retry loop) then waits instead of taking
# turns with good requests: the abuse benchmark's hostile clients cost the server 1-2 ms of CPU each for
# 130-330 refusals a second, on a 2-core machine where the server got 0.3-1 core. At most MAX_DELAYED
# refusals wait at once (beyond, they are sent at once), so holding them cannot use up the connections.
REFUSALS_PER_S = 10.0
REFUSAL_BURST = 20
REFUSAL_DELAY_S = 0.5
MAX_DELAYED = 64
MAX_TRACKED_CLIENTS = 4096

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


# --------------------------------------------------------------------------- the Host allow-list


def _host_name(value: str) -> str | None:
    """The name in a Host header or allow-list entry, lower-case, without port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
    elif value.count(":") > 1:  # a bare IPv6 address (allow-list entries such as ::1)
        name, rest = value, ""
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest[0] == ":" and (rest[1:] == "" or rest[1:].isdigit())):
        return None
    return name[:-1] if name.endswith(".") else name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostAllowList:
    """The Host header names a server answers to: the guard against DNS rebinding.

    A web page on any site can make a browser send requests to 127.0.0.1 under a name the page's owner
    controls (DNS rebinding); only the Host header tells such requests apart. ``names`` are host names or IP
    addresses (``[::1]`` or ``::1``); ``*`` allows any host; a wildcard bind address (``0.0.0.0``, ``::``)
    allows any IP-address Host, because an address typed in the browser involves no DNS and so no rebinding.
    Starlette's in-process TestClient (client ``testclient``, which no network peer can be) is not checked.
    """

    def __init__(self, names: Iterable[str]):
        entries = [str(n) for n in names]
        self.any = "*" in entries
        parsed = {_host_name(n) for n in entries if n != "*"}
        self.ip_literals = any(n in WILDCARD_ADDRESSES for n in entries)
        self.names = {n for n in parsed if n and n not in WILDCARD_ADDRESSES}

    def problem(self, scope: dict) -> str | None:
        """Why this request's Host is refused, or None when it is allowed."""
        if self.any or (scope.get("client") or ("",))[0] == "testclient":
            return None
        raw = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if raw is None:
            return "the request has no Host header"
        name = _host_name(raw)
        if name is not None and (name in self.names or (self.ip_literals and _is_ip(name))):
            return None
        shown = ", ".join(sorted(f"[{n}]" if ":" in n else n for n in self.names))
        hint = f"; start the server with --allow-host {name} to allow it" if name else ""
        return f"Host {raw[:100]!r} is not one this server answers to ({shown}){hint}"


# --------------------------------------------------------------------------- the outermost ASGI layer


def _json_message(status: int, detail: str, *, close: bool, retry_after: int | None = None) -> tuple[dict, dict]:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the body was not read to its end: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


class Refusal(Exception):
    """An answer given before the application runs; the connection is closed unless the body was read out."""

    def __init__(self, status: int, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after
        self.read_out = False


class RefusalPacer:
    """Per client address, a token bucket of refusals: within it a refusal goes at once, past it it waits."""

    def __init__(self, rate: float = REFUSALS_PER_S, burst: int = REFUSAL_BURST, delay: float = REFUSAL_DELAY_S,
                 max_delayed: int = MAX_DELAYED, max_clients: int = MAX_TRACKED_CLIENTS):
        self.rate, self.burst, self.delay = rate, burst, delay
        self.max_delayed, self.max_clients = max_delayed, max_clients
        self.delayed = 0
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when last counted)
        self._lock = threading.Lock()

    def take(self, address: str) -> float:
        """Seconds to hold this client's refusal (0: within its allowance); call :meth:`done` after a hold."""
        now = time.monotonic()
        with self._lock:
            if address not in self._buckets and len(self._buckets) >= self.max_clients:
                self._buckets.clear()  # a flood of addresses: start over rather than grow
            tokens, then = self._buckets.get(address, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens >= 1 or self.delayed >= self.max_delayed:
                self._buckets[address] = (max(0.0, tokens - 1), now)
                return 0.0
            self._buckets[address] = (tokens, now)
            self.delayed += 1
            return self.delay

    def done(self) -> None:
        with self._lock:
            self.delayed -= 1


class Guard:
    """Outermost ASGI layer: Host allow-list, the whole body read under a limit and a deadline, JSON 500s.

    The body is read here, for every content type and transfer encoding, with a running byte count: a
    chunked 400 MB upload without Content-Length gets 413 once 8 MB have arrived (before this, the multipart
    parser spooled all 400 MB to a temporary file and answered after 2.0 s). The application then sees the
    body replayed from memory, so nothing downstream reads the socket or spools. ``max_buffered`` bounds the
    bytes held by all requests at once. ``sniff(scope, head)``, where given, sees the first ``sniff_bytes``
    of a POST body that goes on past them and may raise :class:`Refusal` before the rest is read. ``pacer``,
    where given, holds the refusals (4xx) of a client refused too often (:class:`RefusalPacer`).
    """

    def __init__(self, app: Callable, *, hosts: HostAllowList, max_body: int, body_timeout: float,
                 max_buffered: int, sniff: Callable[[dict, bytes], None] | None = None, sniff_bytes: int = 65536,
                 pacer: RefusalPacer | None = None):
        self.app = app
        self.pacer = pacer
        self.sniff, self.sniff_bytes = sniff, sniff_bytes
        self.hosts = hosts
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.max_buffered = max_buffered
        self.buffered = 0
        self._count_lock = threading.Lock()  # TestClient runs requests on several event loops at once

    def _hold(self, size: int) -> bool:
        with self._count_lock:
            if self.buffered + size > self.max_buffered:
                return False
            self.buffered += size
            return True

    def _release(self, size: int) -> None:
        with self._count_lock:
            self.buffered -= size

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        address = (scope.get("client") or ("",))[0]
        pending: list[dict] = []  # a refusal's messages, held until the request's body is freed

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.pacer is not None and 400 <= message["status"] < 500 and self.pacer.take(address):
                    pending.append(message)
                    return
            if pending:
                pending.append(message)
                return
            await send(message)

        held = [0]
        try:
            header_bytes = (sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + len(scope.get("raw_path", b""))
                            + len(scope.get("query_string", b"")))
            if header_bytes > MAX_HEADER_BYTES:
                raise Refusal(431, f"request headers of {header_bytes:,} bytes; the limit is {MAX_HEADER_BYTES:,}")
            problem = self.hosts.problem(scope)
            if problem:
                raise Refusal(400, problem)
            body = await self._read_body(scope, receive, held)
            if body is None:  # the client went away
                return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, tracked_send)
            body = None  # not kept while a refusal waits
            if pending:
                await self._send_late(pending, send, held)
        except Refusal as refusal:
            messages = list(_json_message(refusal.status, refusal.detail, close=not refusal.read_out,
                                          retry_after=refusal.retry_after))
            if self.pacer is not None and self.pacer.take(address):
                await self._send_late(messages, send, held)
            else:
                for message in messages:
                    await send(message)
        except Exception as exc:  # a bug: one log line, and a 500 that shows nothing of the internals
            reason = " ".join(str(exc).split())[:200]
            log.error("internal error answering %s %s: %s: %s", scope.get("method"), scope.get("path"),
                      type(exc).__name__, reason)
            if not started:
                for message in _json_message(500, "internal error", close=False):
                    await send(message)
        finally:
            self._release(held[0])

    async def _send_late(self, messages: list[dict], send: Callable[[dict], Awaitable[None]], held: list[int]) -> None:
        """Sends a held refusal after the pacer's delay, the request's body given back first."""
        self._release(held[0])
        held[0] = 0
        try:
            await asyncio.sleep(self.pacer.delay)  # type: ignore[union-attr]
            for message in messages:
                await send(message)
        finally:
            self.pacer.done()  # type: ignore[union-attr]

    async def _read_body(self, scope: dict, receive: Callable[[], Awaitable[dict]], held: list[int]) -> bytes | None:
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise Refusal(413, f"request body is {int(declared):,} bytes; the limit is {self.max_body:,}")
        try:
            # One deadline for the whole body, not a wait_for (a task and a timer) per message; uvicorn's
            # receive() waits on an event, so cancelling it is safe.
            async with asyncio.timeout(self.body_timeout):
                return await self._read_messages(scope, receive, held)
        except TimeoutError:
            raise Refusal(408, f"the request body did not arrive within {self.body_timeout:g} s") from None

    async def _read_messages(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                             held: list[int]) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        sniffed = self.sniff is None or scope.get("method") != "POST"
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise Refusal(413, f"request body is over the limit of {self.max_body:,} bytes")
            if chunk:
                if not self._hold(len(chunk)):
                    raise Refusal(503, f"busy: too many uploads in progress; try again in {RETRY_AFTER_S} s",
                                   retry_after=RETRY_AFTER_S)
                held[0] += len(chunk)
                chunks.append(chunk)
            if not sniffed and size >= self.sniff_bytes and message.get("more_body", False):
                sniffed = True
                try:
                    self.sniff(scope, b"".join(chunks)[:self.sniff_bytes])  # type: ignore[misc]
                except Refusal as refusal:
                    if not any(k == b"content-length" for k, _ in scope["headers"]):
                        raise  # chunked: no end to wait for; answered now, the connection closed
                    # A declared length (within the limit): the rest is read and dropped, held nowhere, so
                    # the connection stays usable, as when the application refuses a whole body.
                    self._release(held[0])
                    held[0], chunks = 0, []
                    while message.get("more_body", False):
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return None
                    refusal.read_out = True
                    raise
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# --------------------------------------------------------------------------- the HTTP protocol


def _raw_response(status: int, detail: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 answer with a JSON detail, written straight to a socket that is then closed."""
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def server_protocol(header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> type:
    """uvicorn's h11 protocol with a header timeout, a cap on open connections and JSON 400s.

    uvicorn 0.54 times out only idle keep-alive connections, and only after a first answer: measured, 400
    sockets that sent ``GET /healthz HTTP/1.1\\r\\nHo`` were all still open after 20 s. Here a timer runs from
    the connection (and from each answer on a kept-alive one) until a request's headers are complete; when it
    fires the connection gets 408 (if it sent part of a request) and is closed. uvicorn's own
    ``limit_concurrency`` is not used: it still reads each request and answers plain text, and it counts
    connections and requests together; this cap refuses the connection itself, with JSON.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _partial = False  # bytes of a request arrived while the timer ran

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_raw_response(503, f"busy: {max_connections} connections are open; try again "
                                              f"in {RETRY_AFTER_S} s", RETRY_AFTER_S))
                transport.close()
                return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._partial = self._partial or self._header_timer is not None
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a new request's headers are complete: the guard times its body
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():  # armed first: a pipelined request found next disarms it
                self._arm_header_timer()
            super().on_response_complete()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_raw_response(400, f"malformed HTTP request: a bad request line, or headers "
                                               f"over {MAX_HEADER_BYTES // 1024} KB"))
            self.transport.close()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._partial = False
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self._partial:
                self.transport.write(_raw_response(408, f"the request headers did not arrive within "
                                                   f"{header_timeout:g} s"))
            self.transport.close()

    return GuardedH11Protocol


def _connection_cap() -> int:
    """MAX_CONNECTIONS, or fewer where the file-descriptor limit is lower (leaving ~120 for the process)."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return MAX_CONNECTIONS
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, min(MAX_CONNECTIONS, soft - 124))


def server_config(app, host: str = "127.0.0.1", port: int = 8000, *, header_timeout: float = HEADER_TIMEOUT,
                  max_connections: int | None = None):
    """The uvicorn configuration ``serve`` runs ``app`` with (tests run it in a thread)."""
    import uvicorn

    cap = _connection_cap() if max_connections is None else max_connections
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=server_protocol(header_timeout, cap),
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=5,
                          timeout_graceful_shutdown=5)
