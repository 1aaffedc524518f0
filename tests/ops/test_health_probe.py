"""Health probe: the pure state machine, and the prober against a real HTTP target on
127.0.0.1 that is stopped and restarted, with a fake clock (sleep advances it)."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from rustbalance.config import HealthConfig
from rustbalance.node.health_probe import HealthProber, ProbeResult, TargetHealth, probe_once
from rustbalance.proxy import ProxySettings, Target


def test_state_machine_transitions() -> None:
    health = TargetHealth(3)
    fail, ok = ProbeResult(False, "status 503"), ProbeResult(True, "status 200")
    assert health.observe(ok) == [] and health.up
    assert [lvl for lvl, _ in health.observe(fail)] == [logging.WARNING]
    assert [lvl for lvl, _ in health.observe(fail)] == [logging.WARNING]
    records = health.observe(fail)
    assert [lvl for lvl, _ in records] == [logging.WARNING, logging.ERROR]
    assert "Target is DOWN" in records[1][1] and not health.up
    assert [lvl for lvl, _ in health.observe(fail)] == [logging.WARNING]  # no second ERROR
    records = health.observe(ok)
    assert records == [(logging.INFO, "Target is UP again (status 200)")] and health.up
    # A success resets the count: two failures are not enough again.
    health.observe(fail)
    health.observe(fail)
    assert health.up
    with pytest.raises(ValueError):
        TargetHealth(0)


class Target503:
    """An HTTP server on a fixed port that can be stopped and started again."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.status = 200
        self.paths: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.paths.append(head.split(b" ")[1])
        writer.write(
            f"HTTP/1.1 {self.status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".encode()
        )
        await writer.drain()
        writer.close()


def _settings(port: int) -> ProxySettings:
    return ProxySettings(target=Target("127.0.0.1", port, is_onion=False), connect_timeout=2)


async def test_prober_marks_down_after_three_failures_and_up_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = Target503()
    await target.start()
    clock = [1000.0]
    probe_times: list[float] = []
    changes: list[bool] = []

    async def fake_sleep(seconds: float) -> None:
        clock[0] += seconds

    async def probe(
        settings: ProxySettings, path: str, status: int, timeout_secs: float
    ) -> ProbeResult:
        # Real probe of the real target; the test stops and restarts it between probes.
        probe_times.append(clock[0])
        result = await probe_once(settings, path, status, timeout_secs)
        n = len(probe_times)
        if n == 1:
            await target.stop()
        elif n == 4:
            await target.start()
        return result

    health = HealthConfig(
        http_probe_enabled=True,
        http_probe_path="/health",
        http_probe_interval_secs=60,
        http_probe_timeout_secs=2,
        probe_failure_threshold=3,
    )
    prober = HealthProber(
        _settings(target.port),
        health,
        start_delay=120,
        clock=lambda: clock[0],
        sleep=fake_sleep,
        on_change=changes.append,
        probe=probe,
    )
    try:
        with caplog.at_level(logging.INFO, logger="rustbalance.health"):
            await prober.run(max_probes=5)
    finally:
        await target.stop()
    # First probe after the start delay, then one per interval.
    assert probe_times == [1120.0, 1180.0, 1240.0, 1300.0, 1360.0]
    assert target.paths == [b"/health", b"/health"]
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING] * 3 + [logging.ERROR, logging.INFO]
    assert "Target is DOWN" in caplog.records[3].getMessage()
    assert "Target is UP again" in caplog.records[4].getMessage()
    assert changes == [False, True] and prober.up


async def test_unexpected_status_and_timeout_count_as_failures() -> None:
    target = Target503()
    target.status = 503
    await target.start()
    try:
        result = await probe_once(_settings(target.port), "/", 200, 2)
        assert not result.ok and "503" in result.detail
        assert (await probe_once(_settings(target.port), "/", 503, 2)).ok
    finally:
        await target.stop()
    # A listener that never answers: the probe's own timeout ends it.
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = int(silent.sockets[0].getsockname()[1])
    try:
        result = await probe_once(_settings(port), "/", 200, 0.3)
        assert not result.ok and "timed out" in result.detail
    finally:
        # Since Python 3.12 wait_closed() waits for every accepted connection: close them.
        for writer in held:
            writer.close()
        silent.close()
        await asyncio.wait_for(silent.wait_closed(), 10)


async def test_stop_ends_the_loop() -> None:
    async def never(
        settings: ProxySettings, path: str, status: int, timeout_secs: float
    ) -> ProbeResult:
        raise AssertionError("no probe expected")

    prober = HealthProber(_settings(1), HealthConfig(), start_delay=0.01, probe=never)
    prober.stop()
    await prober.run()
    assert prober.probes == 0
