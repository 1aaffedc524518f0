"""Small applications for the private network: a backend that names itself, and an HTTP client
that goes through a Tor client's SOCKS port. Used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from python_socks.async_.asyncio import Proxy

__all__ = ["NamedHTTPServer", "http_get_via_tor"]


class _NamedHandler(BaseHTTPRequestHandler):
    server: NamedHTTPServer
    # Keep-alive (every answer has a Content-Length), so the availability harness's keep-alive
    # clients can send many requests on one connection; "Connection: close" still closes.
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.hits += 1
        if self.server.html:
            body = (
                f"<html><body><h1>Hello from {self.server.backend_name}</h1>"
                f"<p>request {self.server.hits}, path {self.path}</p></body></html>\n"
            ).encode()
            content_type = "text/html; charset=utf-8"
        else:
            body = f"hello from {self.server.backend_name}\n".encode()
            content_type = "text/plain"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: callers print their own lines."""


class NamedHTTPServer(ThreadingHTTPServer):
    """HTTP on 127.0.0.1 (a free port), answering every GET with a page naming the backend
    (``hello from <name>``, or a small HTML page); served from a daemon thread."""

    daemon_threads = True

    def __init__(self, name: str, *, html: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _NamedHandler)
        self.backend_name = name
        self.html = html
        self.hits = 0
        self._thread = threading.Thread(target=self.serve_forever, name=f"http-{name}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


async def http_get_via_tor(
    socks: tuple[str, int],
    host: str,
    *,
    path: str = "/",
    port: int = 80,
    isolation: str = "rb",
    timeout: float = 60.0,  # noqa: ASYNC109 (also the SOCKS connect timeout)
) -> tuple[int, str]:
    """GET ``http://host:port/path`` through a Tor SOCKS port with remote DNS; returns (status,
    body). A distinct ``isolation`` user name gets a fresh circuit (tor's IsolateSOCKSAuth)."""
    proxy = Proxy.from_url(f"socks5://{isolation}:x@{socks[0]}:{socks[1]}", rdns=True)
    async with asyncio.timeout(timeout):
        sock = await proxy.connect(host, port, timeout=timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            await writer.drain()
            raw = b""
            while chunk := await reader.read(1 << 16):
                raw += chunk
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode("utf-8", errors="replace")
