"""The front door's case (c) through real tor on the private network: one circuit opening
streams as fast as it can against an onion service served by RustBalance's proxy, while a
legitimate client (its own circuit) keeps requesting (issue 15).

The onion service's tor has ``HiddenServiceExportCircuitID haproxy``: every stream reaches the
proxy with tor's PROXY line naming its rendezvous circuit. The proxy cuts the attacker's
circuit once it holds more than ``limit`` streams at once and asks that tor to close it
(CLOSECIRCUIT on its control port); each cut names a new circuit: the attacker's tor had to
build one to go on. The target records the circuit id of each request it gets
(``circuit_id_header``).
Used by ``tests/proxy/test_front_door_tor.py`` and ``bench_frontdoor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_socks.async_.asyncio import Proxy

from benchmarks import frontdoor as fd
from rustbalance.proxy import CircuitLimits, ProxySettings, ReverseProxy, Target
from rustbalance.testnet import PrivateTorNetwork
from rustbalance.tor.control import ControlConnection

_HEADER = "X-Tor-Circuit-Id"


@dataclass
class TorFloodResult:
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    attacker_streams: int = 0  # streams the attacker's tor opened to the service
    attacker_circuits: set[str] = field(default_factory=set)  # as the target saw them
    legit_circuits: set[str] = field(default_factory=set)
    cut: list[int] = field(default_factory=list)  # circuits the proxy cut
    closed_by_tor: list[int] = field(default_factory=list)  # CLOSECIRCUIT answered 250

    @property
    def success(self) -> float:
        total = self.ok + self.failed
        return self.ok / total if total else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("inf")


@contextlib.asynccontextmanager
async def _application(result: TorFloodResult) -> AsyncIterator[int]:
    """Answers every request ``200 ok``, noting the circuit id each one came on."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1000):
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == _HEADER.lower().encode():
                        who = value.strip().decode()
                        if b"/attack" in head:
                            result.attacker_circuits.add(who)
                        else:
                            result.legit_circuits.add(who)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def _stream(
    socks: tuple[str, int], user: str, onion: str, limit: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    proxy = Proxy.from_url(f"socks5://{user}:x@{socks[0]}:{socks[1]}", rdns=True)
    sock = await proxy.connect(onion, 80, timeout=limit)
    return await asyncio.open_connection(sock=sock)


async def _legit_request(socks: tuple[str, int], onion: str, limit: float) -> float | None:
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await _stream(socks, "legit", onion, limit)
            writer.write(b"GET /legit HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := await reader.read(65536):
                answer += chunk
    except Exception:  # python-socks raises its own types; a failure is a failed request
        return None
    finally:
        if writer is not None:
            writer.transport.abort()
    ok = answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")
    return time.perf_counter() - started if ok else None


async def _attacker(
    socks: tuple[str, int], onion: str, stop: asyncio.Event, result: TorFloodResult, width: int
) -> None:
    """``width`` workers on one circuit (one SOCKS user name: tor's IsolateSOCKSAuth), each
    opening a stream, sending a request and holding the stream, again as soon as it ends."""

    async def worker() -> None:
        while not stop.is_set():  # one stream per turn
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await _stream(socks, "attacker", onion, 30)
                result.attacker_streams += 1
                writer.write(b"GET /attack HTTP/1.1\r\nHost: x\r\n\r\n")
                while not stop.is_set() and await reader.read(65536):
                    pass
            except Exception:  # a refused or closed stream: open the next one
                await asyncio.sleep(0.05)
            finally:
                if writer is not None:
                    writer.transport.abort()

    workers = [asyncio.ensure_future(worker()) for _ in range(width)]
    await stop.wait()
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)


async def circuit_flood_through_tor(
    net: PrivateTorNetwork,
    attacker_socks: tuple[str, int],
    legit_socks: tuple[str, int],
    *,
    limit: int = 8,
    width: int = 24,
    requests: int = 20,
    warm: float = 10.0,
    haproxy: bool = False,
) -> TorFloodResult:
    """The flood and the legitimate requests, against RustBalance's proxy or (``haproxy``)
    HAProxy with the same per-circuit connection limit in a stick table (it refuses the
    extra streams; it cannot close a circuit in tor). Every process and connection started
    here is stopped before it returns (the onion service's tor and HAProxy by PID)."""
    result = TorFloodResult()
    control: list[ControlConnection] = []

    async def close_circuit(circuit: int) -> None:
        result.cut.append(circuit)
        await control[0].request("CLOSECIRCUIT", str(circuit))
        result.closed_by_tor.append(circuit)

    async with contextlib.AsyncExitStack() as stack:
        app_port = await stack.enter_async_context(_application(result))
        if haproxy:
            port = fd.free_port()
            config = fd.haproxy_config(port, app_port, cap=1024, head_timeout=10, per_circuit=limit)
            stack.enter_context(fd.haproxy(config, port))
        else:
            settings = ProxySettings(
                target=Target("127.0.0.1", app_port, False),
                circuit_ids=True,
                circuit_limits=CircuitLimits(max_connections=limit, rate=1000, burst=1000),
                circuit_header=_HEADER,
            )
            proxy = ReverseProxy(settings, close_circuit=close_circuit)
            port = (await stack.enter_async_context(proxy)).port
        name = f"frontdoor{secrets.token_hex(2)}"
        service = await asyncio.to_thread(
            net.add_onion_service, name, {80: port}, ["HiddenServiceExportCircuitID haproxy"]
        )
        stack.push_async_callback(asyncio.to_thread, net.remove, service)
        control.append(await ControlConnection.connect(service.control_address))
        stack.push_async_callback(control[0].close)
        onion = service.onion_address
        assert onion is not None
        await _until_reachable(legit_socks, onion)
        stop = asyncio.Event()
        flood = asyncio.ensure_future(_attacker(attacker_socks, onion, stop, result, width))
        try:
            await asyncio.sleep(warm)  # the flood runs (is cut, builds a new circuit...)
            for _ in range(requests):
                took = await _legit_request(legit_socks, onion, 30)
                if took is None:
                    result.failed += 1
                else:
                    result.ok += 1
                    result.latencies.append(took)
        finally:
            stop.set()
            await flood
    return result


async def _until_reachable(socks: tuple[str, int], onion: str, limit: float = 150) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:  # the descriptor is published a while after start
        if await _legit_request(socks, onion, 30) is not None:
            return
        await asyncio.sleep(2)
    raise RuntimeError(f"{onion} not reachable within {limit} s")
