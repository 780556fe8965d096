"""A fault-injecting HTTP proxy on 127.0.0.1, put between s3fs and the moto S3 server.

Real object stores fail in two ways a checkpoint must survive: a request
answered with a 5xx (``503 SlowDown``/``ServiceUnavailable``, ``500
InternalError``), and a connection cut in the middle of an upload. moto does
neither, so this proxy forwards every request to moto unchanged except those
matching a :class:`Rule`, which it answers with an error status or by
closing the socket halfway through reading the request body.

Rules live in the test process; ranks in other processes reach the proxy
through ``endpoint_url`` like any S3 endpoint, so the faults hit exactly the
code path production uses.

Example:
    >>> with FaultProxy(s3_endpoint.url) as proxy:  # doctest: +SKIP
    ...     proxy.add(Rule("status", method="PUT", path_contains="/data-", times=2))
    ...     save_through(proxy.url)  # the first two data uploads get a 503
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal

__all__ = ["Rule", "FaultProxy"]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}
_ERROR_CODES = {500: "InternalError", 503: "ServiceUnavailable"}


@dataclass
class Rule:
    """Which requests to fail, and how.

    Attributes:
        action: ``"status"`` answers with ``status`` and an S3 error body;
            ``"drop"`` reads half the request body, then closes the connection
            without answering (a connection lost mid-upload).
        method: HTTP method to match (``"PUT"``, ``"POST"``, ...); ``None``: any.
        path_contains: substring of the decoded request path (``"/data-"``,
            ``"manifest.json"``); ``None``: any.
        times: how many matching requests to fail; ``None``: every one.
        skip: let this many matching requests through first.
        status: the status for ``"status"``.
        hits: how many requests this rule has failed so far.
    """

    action: Literal["status", "drop"]
    method: str | None = None
    path_contains: str | None = None
    times: int | None = None
    skip: int = 0
    status: int = 503
    hits: int = field(default=0, init=False)
    _seen: int = field(default=0, init=False, repr=False)

    def _claims(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.path_contains is not None and self.path_contains not in path:
            return False
        self._seen += 1
        if self._seen <= self.skip or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True


class FaultProxy:
    """Forwards HTTP to ``upstream``, failing requests that match its rules."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.hostname is None or parsed.port is None:
            raise ValueError(f"upstream must look like http://host:port, got {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port)
        self.log: list[tuple[str, str, str]] = []  # (method, path, "forwarded" | action)
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def faults(self) -> int:
        """How many requests were failed so far."""
        with self._lock:
            return sum(1 for _, _, outcome in self.log if outcome != "forwarded")

    def _decide(self, method: str, path: str) -> Rule | None:
        with self._lock:
            rule = next((r for r in self._rules if r._claims(method, path)), None)
            self.log.append((method, path, rule.action if rule else "forwarded"))
            return rule

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        rule = proxy._decide(self.command, urllib.parse.unquote(self.path))
        if rule is not None and rule.action == "drop":
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length // 2)
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()  # RST, no response: the client sees a connection reset
            return
        body = self._read_body()
        if rule is not None:
            code = _ERROR_CODES.get(rule.status, "InternalError")
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by FaultProxy</Message><RequestId>fault</RequestId></Error>"
            ).encode()
            self._respond(rule.status, [("Content-Type", "application/xml")], payload)
            return
        self._forward(proxy, body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, proxy: FaultProxy, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length"}}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            upstream_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        finally:
            connection.close()
        self._respond(response.status, upstream_headers, data, head=self.command == "HEAD")

    def _respond(self, status: int, headers: list[tuple[str, str]], body: bytes, *, head: bool = False) -> None:
        self.send_response_only(status)
        for key, value in headers:
            if key.lower() != "content-length" or head:
                self.send_header(key, value)
        if not head:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
