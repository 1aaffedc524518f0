"""node/status.py: the local status endpoint (unix socket, 0600) and its client."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rustbalance.node.coordination import ClusterStatus
from rustbalance.node.publish_policy import HsDirResult, PeriodResult, PublishState
from rustbalance.node.snapshot import (
    ClusterSnapshot,
    IntroSnapshot,
    NodeSnapshot,
    PublishSnapshot,
    TorSnapshot,
    status_document,
)
from rustbalance.node.status import (
    StatusError,
    StatusServer,
    read_status,
)
from rustbalance.proxy.session import ProxyStats

MASTER = "a" * 56 + ".onion"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="rbst-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def sample_status() -> dict[str, Any]:
    publish = PublishState()
    publish.record(
        {
            "current": PeriodResult(ok=True, hsdirs=(HsDirResult("$AB12", True),)),
            "next": PeriodResult(ok=False, error="551 Unable to upload"),
        },
        1_700_000_000.0,
    )
    cluster = ClusterStatus(
        term=4,
        election_role="publisher",
        publisher="node-a",
        counters={"heartbeats_sent": 9},
        rejected={},
        peer_intro_points={"node-b": 3},
        live_peers=("node-b",),
        known_peers=("node-b", "node-c"),
    )
    return status_document(
        NodeSnapshot(
            node_id="node-a",
            master_onion_address=MASTER,
            multi=True,
            publisher=True,
            ready=True,
            uptime_secs=12.5,
            generated_at=1_700_000_001.0,
            tor=TorSnapshot("managed", running=True, restarts=2),
            intro=IntroSnapshot((b"\x01" * 32,) * 3, (b"\x02" * 32,) * 6),
            publish=PublishSnapshot(state=publish),
            cluster=ClusterSnapshot(cluster, native_publishing=False),
            proxy=ProxyStats(active=1, total=12),
        )
    )


def test_status_document_has_the_documented_keys() -> None:
    doc = sample_status()
    assert doc["node_id"] == "node-a"
    assert (doc["mode"], doc["role"]) == ("multi", "publisher")
    assert doc["tor"] == {"running": True, "restarts": 2, "restart_failures": 0, "mode": "managed"}
    assert (doc["intro_points"]["own"], doc["intro_points"]["published"]) == (3, 6)
    assert doc["last_publish"]["current"] == 1_700_000_000.0
    assert doc["last_publish"]["next"] is None
    assert doc["last_publish"]["results"]["current"]["hsdirs"] == [
        {"hsdir": "$AB12", "ok": True, "reason": None}
    ]
    assert doc["peers"] == [
        {"node_id": "node-b", "alive": True},
        {"node_id": "node-c", "alive": False},
    ]
    assert doc["proxy"]["total"] == 12
    assert doc["master_onion_address"] == MASTER


async def test_server_answers_each_connection_with_live_state(short_dir: Path) -> None:
    path = short_dir / "run" / "status.sock"
    calls = 0

    def provider() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        doc = sample_status()
        doc["intro_points"]["own"] = calls
        return doc

    async with StatusServer(path, provider):
        # Socket 0600 and its folder, created by us, 0700.
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert mode_of(path) == 0o600
        assert mode_of(path.parent) == 0o700
        first = await asyncio.to_thread(read_status, path, 5.0)
        second = await asyncio.to_thread(read_status, path, 5.0)
    assert first["intro_points"]["own"] == 1
    assert second["intro_points"]["own"] == 2
    assert first["node_id"] == "node-a"
    assert not path.exists()  # removed on close


async def test_existing_folder_permissions_are_left_alone(short_dir: Path) -> None:
    os.chmod(short_dir, 0o755)
    path = short_dir / "status.sock"
    async with StatusServer(path, sample_status):
        assert mode_of(path) == 0o600
        assert mode_of(short_dir) == 0o755


async def test_stale_socket_is_replaced_and_live_one_is_refused(short_dir: Path) -> None:
    path = short_dir / "status.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays: a daemon that was killed
    async with StatusServer(path, sample_status):
        doc = await asyncio.to_thread(read_status, path)
        assert doc["role"] == "publisher"
        with pytest.raises(StatusError, match="another daemon already serves status"):
            await StatusServer(path, sample_status).start()
        assert path.exists()


async def test_refuses_a_path_that_is_not_a_socket(short_dir: Path) -> None:
    path = short_dir / "status.sock"
    path.write_text("important")
    with pytest.raises(StatusError, match="exists and is not a socket"):
        await StatusServer(path, sample_status).start()
    assert path.read_text() == "important"


async def test_provider_failure_is_reported_to_the_client(short_dir: Path) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("state lock poisoned")

    path = short_dir / "status.sock"
    async with StatusServer(path, broken):
        with pytest.raises(StatusError, match="daemon reported: status unavailable: state lock"):
            await asyncio.to_thread(read_status, path)


def test_no_daemon_running(short_dir: Path) -> None:
    path = short_dir / "status.sock"
    with pytest.raises(StatusError, match=r"no daemon running \(status socket .* does not exist"):
        read_status(path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(StatusError, match=r"no daemon running \(nothing listens on"):
        read_status(path)


def test_permission_denied_is_explained(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root bypasses file modes, so simulate what a non-root operator's connect() gets.
    def deny(self: socket.socket, address: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", deny)
    with pytest.raises(StatusError, match=r"permission denied on .*status.sock \(run as"):
        read_status(short_dir / "status.sock")


async def _serve_raw(path: Path, payload: bytes | None) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if payload is None:
            await reader.read()  # never answers; waits for the client to give up
        else:
            writer.write(payload)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "daemon sent invalid status JSON"),
        (b"[1, 2]", "invalid status JSON: not an object"),
        (b"\xff\xfe", "daemon sent invalid status JSON"),
    ],
)
async def test_bad_json_is_a_clear_error(short_dir: Path, payload: bytes, message: str) -> None:
    path = short_dir / "status.sock"
    server = await _serve_raw(path, payload)
    try:
        with pytest.raises(StatusError, match=message):
            await asyncio.to_thread(read_status, path)
    finally:
        server.close()
        await server.wait_closed()


async def test_silent_daemon_times_out(short_dir: Path) -> None:
    path = short_dir / "status.sock"
    server = await _serve_raw(path, None)
    try:
        with pytest.raises(StatusError, match=r"daemon did not answer within 0\.2s"):
            await asyncio.to_thread(read_status, path, 0.2)
    finally:
        server.close()
        await server.wait_closed()
