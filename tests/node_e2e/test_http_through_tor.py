"""HTTP mode through Tor: a client talks to the master address, the node's proxy to the target.

The target redirects with an absolute ``Location`` on itself and sets a cookie with
``Domain=<target>``; the client sees both rewritten for the master address. HEAD and a chunked
response work, and several requests share one SOCKS connection (keep-alive).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from python_socks.async_.asyncio import Proxy

from rustbalance.testnet import PrivateTorNetwork
from tests.node_e2e import RunningNode, running_node

CHUNKS = [b"first chunk\n", b"second, longer chunk\n" * 3, b"last\n"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: _Target

    def _body(
        self, body: bytes, *, head: bool = False, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._body(b"a body HEAD must not carry\n", head=True, extra={"X-Head": "yes"})

    def do_GET(self) -> None:
        self.server.seen_hosts.append(self.headers.get("Host", ""))
        if self.path == "/login":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.port}/home?x=1")
            self.send_header("Set-Cookie", "sid=abc123; Domain=127.0.0.1; Path=/; HttpOnly")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in CHUNKS:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._body(f"path {self.path}\n".encode())

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


class _Target(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen_hosts: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, name="http-target", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


class _Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


async def _read_response(reader: asyncio.StreamReader, *, head: bool = False) -> _Response:
    """One HTTP/1.1 response: Content-Length, chunked, or no body (HEAD, 1xx/204/304)."""
    raw_head = await reader.readuntil(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
    resp = _Response(status, headers, b"")
    if head or status in (204, 304) or status < 200:
        return resp
    if (resp.header("Transfer-Encoding") or "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                break
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        resp.body = body
        return resp
    resp.body = await reader.readexactly(int(resp.header("Content-Length") or "0"))
    return resp


@pytest.fixture(scope="module")
def http_node(
    tor_network: PrivateTorNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningNode, _Target]]:
    target = _Target()
    try:
        with running_node(
            tor_network,
            tmp_path_factory.mktemp("http-node"),
            name="node-http",
            overrides={
                "target": {"address": f"127.0.0.1:{target.port}"},
                "proxy": {"mode": "http"},
            },
        ) as node:
            node.wait_published()
            yield node, target
    finally:
        target.close()


async def _connect(
    socks: tuple[str, int], onion: str, user: str, limit: float = 150
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    deadline = time.monotonic() + limit
    attempt = 0
    while True:
        attempt += 1
        proxy = Proxy.from_url(f"socks5://{user}{attempt}:x@{socks[0]}:{socks[1]}", rdns=True)
        try:
            sock = await proxy.connect(onion, 80, timeout=30)
        except Exception:  # python-socks raises its own types; the service may not be up yet
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(2)
            continue
        return await asyncio.open_connection(sock=sock)


@pytest.mark.tor
async def test_keep_alive_redirect_cookie_head_and_chunked_on_one_connection(
    tor_network: PrivateTorNetwork, http_node: tuple[RunningNode, _Target]
) -> None:
    node, target = http_node
    socks = tor_network.clients[0].socks_address
    assert socks is not None
    onion = node.address
    before = (await asyncio.to_thread(node.process.status))["proxy"]
    reader, writer = await _connect(socks, onion, "http")
    try:
        async with asyncio.timeout(120):

            async def ask(method: str, path: str) -> _Response:
                writer.write(f"{method} {path} HTTP/1.1\r\nHost: {onion}\r\n\r\n".encode())
                await writer.drain()
                return await _read_response(reader, head=method == "HEAD")

            # 1. Redirect + cookie, rewritten for the master address.
            login = await ask("GET", "/login")
            assert login.status == 302
            assert login.header("Location") == f"http://{onion}/home?x=1"
            cookie = login.header("Set-Cookie")
            assert cookie is not None
            assert "Domain=127.0.0.1" not in cookie
            assert f"Domain={onion}" in cookie
            assert cookie.startswith("sid=abc123;") and "HttpOnly" in cookie
            # 2. HEAD: headers, no body (the next response must still parse).
            head = await ask("HEAD", "/")
            assert head.status == 200
            assert head.header("X-Head") == "yes"
            assert head.header("Content-Length") == str(len(b"a body HEAD must not carry\n"))
            # 3. Chunked response, body intact.
            chunked = await ask("GET", "/chunked")
            assert chunked.status == 200
            assert chunked.body == b"".join(CHUNKS)
            # 4. More requests on the same connection.
            for i in range(3):
                plain = await ask("GET", f"/page{i}")
                assert plain.status == 200
                assert plain.body == f"path /page{i}\n".encode()
    finally:
        writer.close()
    # The target saw its own Host, not the master address.
    assert target.seen_hosts
    assert all(h in (f"127.0.0.1:{target.port}", "127.0.0.1") for h in target.seen_hosts)
    # All six requests went through one proxied connection (each connection's own log line is
    # DEBUG now: the status counters say it).
    after = (await asyncio.to_thread(node.process.status))["proxy"]
    assert after["requests"] - before["requests"] == 6
    assert after["total"] - before["total"] == 1
