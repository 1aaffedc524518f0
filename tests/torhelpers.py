"""Helpers for end-to-end tests on the private Tor network: HTTP through a Tor client's
SOCKS port, and bounded waits for descriptors to appear."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from python_socks.async_.asyncio import Proxy

from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.errors import RustBalanceError
from rustbalance.tor.network import Controller, FetchError, NetworkView, fetch_descriptor


async def http_get_via_tor(
    socks: tuple[str, int],
    host: str,
    *,
    path: str = "/",
    port: int = 80,
    isolation: str = "rb",
    timeout: float = 60.0,  # noqa: ASYNC109
) -> tuple[int, str]:
    """GET ``http://host:port/path`` through a Tor SOCKS port with remote DNS; returns (status,
    body). A distinct ``isolation`` user name gets a fresh circuit (IsolateSOCKSAuth)."""
    proxy = Proxy.from_url(f"socks5://{isolation}:x@{socks[0]}:{socks[1]}", rdns=True)
    async with asyncio.timeout(timeout):
        sock = await proxy.connect(host, port, timeout=timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read(1 << 20)
            while chunk := await reader.read(1 << 20):
                raw += chunk
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode("utf-8", errors="replace")


async def get_with_retries(
    socks: tuple[str, int],
    host: str,
    *,
    isolation: str,
    deadline_s: float = 120.0,
    per_try: float = 30.0,
) -> str:
    """Retry a GET until it answers 200 (onion services take a while to become reachable)."""
    deadline = time.monotonic() + deadline_s
    last: BaseException | None = None
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        try:
            status, body = await http_get_via_tor(
                socks, host, isolation=f"{isolation}-{attempt}", timeout=per_try
            )
            if status == 200:
                return body
            last = RuntimeError(f"HTTP status {status}")
        except (OSError, TimeoutError, Exception) as exc:  # python-socks raises its own types
            last = exc
        await asyncio.sleep(2)
    raise AssertionError(f"{host} not reachable within {deadline_s} s: {last!r}")


async def wait_for_descriptor(
    ctrl: Controller,
    address: str,
    view: NetworkView,
    *,
    deadline_s: float = 120.0,
) -> DecodedDescriptor:
    """HSFETCH ``address`` until a verified descriptor comes back (services publish a few
    seconds after they bootstrap)."""
    deadline = time.monotonic() + deadline_s
    last: RustBalanceError | None = None
    while time.monotonic() < deadline:
        try:
            return await fetch_descriptor(ctrl, address, view, timeout=30)
        except FetchError as exc:
            last = exc
        await asyncio.sleep(3)
    raise AssertionError(f"no descriptor for {address} within {deadline_s} s: {last}")


class _NamedHandler(BaseHTTPRequestHandler):
    server: NamedHTTPServer

    def do_GET(self) -> None:
        body = f"hello from {self.server.backend_name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


class NamedHTTPServer(ThreadingHTTPServer):
    """A tiny HTTP server on 127.0.0.1 answering ``hello from <name>`` (in a thread)."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _NamedHandler)
        self.backend_name = name
        self._thread = threading.Thread(target=self.serve_forever, name=f"http-{name}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
