"""A fault-injecting HTTP proxy in front of moto's S3 server, for the S3 fault tests.

Clients (s3fs/botocore in the driver and in Ray workers, LanceDB's Rust object_store) are pointed at
`proxy.url` instead of moto. Each request is forwarded whole (bodies are read completely, chunked
uploads forwarded verbatim), and with probability `rate` a fault drawn from a seeded RNG replaces the
normal answer:

  slowdown        503 with an S3 SlowDown error body, request not forwarded
  internal        500 InternalError, request not forwarded
  reset           the connection is reset (SO_LINGER 0) before forwarding
  internal_after  forwarded (moto executed it), then answered 500: the client cannot tell it happened
  reset_after     forwarded, then the connection is reset: the response is lost
  truncate        forwarded, the headers and half the body are sent, then the connection is closed

`fail_next(method, path_prefix, fault)` scripts one fault for one request. `deny(bucket, key_prefix)`
answers every request on matching keys (and listings of matching prefixes) with 403 AccessDenied,
always, as S3 does for missing permissions. Counters let a test prove that faults really happened and
that a denied client gave up after few requests.
"""

from __future__ import annotations

import http.client
import io
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

FAULTS = ("slowdown", "internal", "reset", "internal_after", "reset_after", "truncate")
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
}


@dataclass
class Event:
    """One request as the proxy saw it: what was asked and what was done to it."""

    method: str
    path: str
    outcome: str  # "ok", a fault name, or "denied"
    at: float = field(default_factory=time.monotonic)


class FaultProxy:
    """The proxy's state: fault policy, RNG and counters. Thread-safe; start it with `running()`."""

    def __init__(self, upstream: str, rate: float = 0.1, seed: int = 0, faults: tuple[str, ...] = FAULTS):
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rate = rate
        self.faults = tuple(faults)
        self.events: list[Event] = []
        self.url = ""
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._deny: tuple[str, str, tuple[str, ...]] | None = None
        self._scripted: list[tuple[str, str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._sockets: set[socket.socket] = set()

    # -- policy --------------------------------------------------------------------------------------
    def deny(self, bucket: str, key_prefix: str = "", methods: tuple[str, ...] = ()) -> None:
        """From now on, 403 AccessDenied for keys of BUCKET under KEY_PREFIX (and listings of them);
        only for METHODS when given (e.g. ("PUT", "POST"): read-only credentials)."""
        with self._lock:
            self._deny = (bucket, key_prefix, tuple(m.upper() for m in methods))

    def fail_next(self, method: str, path_prefix: str, fault: str) -> None:
        """Inject FAULT into the next METHOD request whose path starts with PATH_PREFIX (once)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
        with self._lock:
            self._scripted.append((method.upper(), path_prefix, fault))

    def decide(self, method: str, target: str) -> str:
        """The outcome of one request: "ok", "denied" or a fault name (drawn under the lock)."""
        with self._lock:
            path = unquote(urlsplit(target).path)
            scripted = next((s for s in self._scripted if s[0] == method and path.startswith(s[1])), None)
            if scripted is not None:
                self._scripted.remove(scripted)
                outcome = scripted[2]
            elif self._deny is not None and _matches(method, target, *self._deny):
                outcome = "denied"
            elif self.rate and self._rng.random() < self.rate:
                outcome = self._rng.choice(self.faults)
            else:
                outcome = "ok"
            self.events.append(Event(method, path, outcome))
        return outcome

    # -- counters ------------------------------------------------------------------------------------
    def counts(self, since: float = 0.0) -> Counter:
        """Outcomes of the requests seen at or after SINCE (time.monotonic())."""
        with self._lock:
            return Counter(e.outcome for e in self.events if e.at >= since)

    def injected(self, since: float = 0.0) -> int:
        c = self.counts(since)
        return sum(c[f] for f in FAULTS)

    # -- server --------------------------------------------------------------------------------------
    @contextmanager
    def running(self) -> Iterator[FaultProxy]:
        """Serve on 127.0.0.1 (a random port) while the block runs; every connection is closed after."""
        proxy = self

        class Handler(_Handler):
            state = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()
            with self._lock:
                open_sockets = list(self._sockets)
            for sock in open_sockets:  # idle keep-alive connections: their handler threads then end
                with suppress(OSError):  # ENOTCONN: the peer closed it first, nothing to end
                    sock.shutdown(socket.SHUT_RDWR)

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._sockets.add if add else self._sockets.discard)(sock)


def _matches(method: str, target: str, bucket: str, key_prefix: str, methods: tuple[str, ...]) -> bool:
    """Path-style S3: /BUCKET/KEY, or a listing /BUCKET?prefix=P (denied when P is under the prefix)."""
    if methods and method not in methods:
        return False
    parts = urlsplit(target)
    path = unquote(parts.path).lstrip("/")
    name, _, key = path.partition("/")
    if name != bucket:
        return False
    if not key:
        listed = parse_qs(parts.query).get("prefix", [""])[0]
        return listed.startswith(key_prefix)
    return key.startswith(key_prefix)


def error_body(code: str, message: str, resource: str) -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, asks the state what to do, forwards it to moto and/or injects the fault."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real S3 clients use it
    state: FaultProxy
    timeout = 60  # an idle keep-alive connection is dropped after this

    def setup(self) -> None:
        super().setup()
        self.state._track(self.connection, True)

    def finish(self) -> None:
        self.state._track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        return  # quiet: the events list is the log

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _handle(self) -> None:
        body = self._read_body()
        outcome = self.state.decide(self.command, self.path)
        if outcome in ("slowdown", "internal", "denied"):
            self._error(outcome)
        elif outcome == "reset":
            self._reset()
        else:
            status, reason, headers, data = self._forward(body)
            if outcome == "internal_after":
                self._error("internal")
            elif outcome == "reset_after" or (outcome == "truncate" and len(data) < 2):
                self._reset()
            elif outcome == "truncate":
                self._respond(status, reason, headers, data, cut=len(data) // 2)
            else:
                self._respond(status, reason, headers, data)

    # -- request -------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        """The body exactly as sent: Content-Length bytes, or the raw chunked stream up to its end."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.state.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    # -- responses -----------------------------------------------------------------------------------
    def _respond(
        self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes, cut: int | None = None
    ) -> None:
        self.send_response_only(status, reason)
        keep_length = self.command == "HEAD" or status in (204, 304)
        for k, v in headers:
            low = k.lower()
            if low in _HOP or low == "transfer-encoding" or (low == "content-length" and not keep_length):
                continue
            self.send_header(k, v)
        if not keep_length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD" or status in (204, 304):
            return
        if cut is None:
            self.wfile.write(data)
            return
        self.wfile.write(data[:cut])
        self.wfile.flush()
        # FIN, not RST: an RST can make the peer drop the bytes it has not read yet, and then this would
        # only be another reset; a short body followed by end-of-stream is the mid-body failure
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _error(self, kind: str) -> None:
        status, code, message = _ERRORS[kind]
        body = b"" if self.command == "HEAD" else error_body(code, message, urlsplit(self.path).path)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16].upper())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the connection: SO_LINGER 0 makes close() send RST instead of FIN."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()
        self.wfile.close()  # the socket's fd closes only once its file objects are closed
        self.connection.close()
        self.rfile, self.wfile = io.BytesIO(), io.BytesIO()  # for the base class's final flush/close
