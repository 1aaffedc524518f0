"""The event loop per proxy mode: uvloop for http, the stock loop (which splice needs) for tcp."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from rustbalance.proxy.eventloop import ENV_VAR, loop_factory, new_event_loop, run
from rustbalance.proxy.relay import can_splice


def test_http_mode_runs_on_uvloop_and_tcp_mode_on_the_stock_loop() -> None:
    assert loop_factory("http", {}) is uvloop.new_event_loop
    assert loop_factory("tcp", {}) is None
    assert loop_factory("http", {ENV_VAR: "asyncio"}) is None  # the operator's fallback
    assert loop_factory("http", {ENV_VAR: "uvloop"}) is uvloop.new_event_loop


def test_run_uses_the_loop_of_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)

    async def loop_type() -> type[asyncio.AbstractEventLoop]:
        return type(asyncio.get_running_loop())

    assert run(loop_type(), mode="tcp") is type(asyncio.new_event_loop())
    assert issubclass(run(loop_type(), mode="http"), uvloop.Loop)
    monkeypatch.setenv(ENV_VAR, "asyncio")
    assert not issubclass(run(loop_type(), mode="http"), uvloop.Loop)


def test_tcp_mode_loop_still_splices() -> None:
    async def check() -> bool:
        async def serve(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                return can_splice(writer)
            finally:
                writer.transport.abort()
        finally:
            server.close()
            await server.wait_closed()

    loop = new_event_loop("tcp")
    try:
        assert loop.run_until_complete(check()) is True
    finally:
        loop.close()
