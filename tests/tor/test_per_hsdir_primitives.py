"""Per-HSDir upload and fetch (distinct descriptors, issue 19) against a scripted control port.

A fake control port is used on purpose, for what real tor cannot be made to do on demand: an
HSDir that never answers, malformed ``HS_DESC`` / ``HS_DESC_CONTENT`` events, an HSDir that
serves garbage, tor's own upload racing ours. What real tor does is covered on the private
network in ``test_distinct_publish.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rustbalance.errors import ControlError
from rustbalance.tor.consensus import HSDirRelay
from rustbalance.tor.control import ControlConnection
from rustbalance.tor.control_protocol import ControlReplyError
from rustbalance.tor.network import (
    NetworkView,
    fetch_per_hsdir,
    network_view_from_documents,
    upload_per_hsdir,
)

from .test_control_client import ADDR, NULL_PROTOCOLINFO, FakeTor

OTHER = "x" * 52 + "yyid"  # a different, well-formed-looking address for noise events
RELAYS = [HSDirRelay(f"{i:X}" * 40, f"relay{i}", bytes([i]) * 32) for i in (0xA, 0xB, 0xC, 0xD)]
A, B, C, D = RELAYS
DATA = Path(__file__).resolve().parent.parent / "data"


def _line(text: str) -> bytes:
    return (text + "\r\n").encode()


def _hsdir(relay: HSDirRelay) -> str:
    return f"${relay.fingerprint}~{relay.nickname}"


Script = Callable[[str, "str | None"], list[bytes]]


async def _fake(script: Script) -> FakeTor:
    """A fake whose answers to +HSPOST / HSFETCH are ``250 OK`` and then ``script``'s events."""

    async def handler(command: str, data: str | None, writer: asyncio.StreamWriter) -> None:
        keyword = command.split(" ", 1)[0]
        if keyword == "PROTOCOLINFO":
            writer.write(NULL_PROTOCOLINFO)
        elif keyword in ("AUTHENTICATE", "SETEVENTS"):
            writer.write(b"250 OK\r\n")
        elif keyword == "+HSPOST" and data is not None and data.startswith("refuse"):
            writer.write(b'552 Server "' + command.split("=")[1].split(" ")[0].encode() + b'"\r\n')
        elif keyword in ("+HSPOST", "HSFETCH"):
            writer.write(b"250 OK\r\n" + b"".join(script(command, data)))
        else:
            writer.write(b'510 Unrecognized command "' + keyword.encode() + b'"\r\n')
        await writer.drain()

    fake = FakeTor(handler)
    await fake.start()
    return fake


@pytest.fixture
async def view() -> AsyncIterator[NetworkView]:
    yield network_view_from_documents(
        (DATA / "consensus_microdesc.txt").read_text(),
        (DATA / "consensus_microdescs.txt").read_text(),
    )


async def test_each_text_goes_to_its_own_hsdirs_and_every_verdict_is_reported() -> None:
    def script(command: str, data: str | None) -> list[bytes]:
        if data is not None and data.startswith("text-one"):
            return [
                _line(f"650 HS_DESC UPLOADED {OTHER} UNKNOWN {_hsdir(A)}"),  # another address
                _line("650 HS_DESC UPLOADED"),  # malformed: ignored, not fatal
                # tor's own service uploads to B too: its verdict comes first and is skipped.
                _line(f"650 HS_DESC UPLOAD {ADDR} UNKNOWN {_hsdir(B)} desc-id"),
                _line(f"650 HS_DESC UPLOADED {ADDR} UNKNOWN {_hsdir(B)}"),
                _line(f"650 HS_DESC UPLOADED {ADDR} UNKNOWN {_hsdir(A)}"),
                _line(
                    f"650 HS_DESC FAILED {ADDR} UNKNOWN {_hsdir(B)} desc-id REASON=UPLOAD_REJECTED"
                ),
            ]
        return []  # C never answers

    fake = await _fake(script)
    try:
        async with await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=2) as conn:
            results = await upload_per_hsdir(
                conn, ADDR, [(A, "text-one\n"), (B, "text-one\n"), (C, "text-two\n")], timeout=1.5
            )
    finally:
        await fake.close()
    assert fake.commands("+HSPOST") == [
        f"+HSPOST SERVER={A.fingerprint} SERVER={B.fingerprint} HSADDRESS={ADDR}",
        f"+HSPOST SERVER={C.fingerprint} HSADDRESS={ADDR}",
    ]
    assert fake.data_blocks == ["text-one\r\n", "text-two\r\n"]
    assert [(r.fingerprint, r.ok, r.reason) for r in results] == [
        (A.fingerprint, True, None),
        (B.fingerprint, False, "UPLOAD_REJECTED"),
        (C.fingerprint, False, "TIMEOUT"),
    ]


async def test_an_hsdir_named_twice_is_refused_before_anything_is_sent() -> None:
    fake = await _fake(lambda _c, _d: [])
    try:
        async with await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=2) as conn:
            with pytest.raises(ControlError, match="named twice"):
                await upload_per_hsdir(conn, ADDR, [(A, "one\n"), (A, "two\n")])
            with pytest.raises(ControlError, match="no HSDirs"):
                await upload_per_hsdir(conn, ADDR, [])
    finally:
        await fake.close()
    assert fake.commands("+HSPOST") == []


async def test_a_refused_hspost_fails_only_its_own_hsdirs() -> None:
    """tor answers 552 for an HSDir that left its consensus since our view: the other
    descriptors still go out; when every HSPOST is refused, tor's error is raised as before."""

    def script(_command: str, _data: str | None) -> list[bytes]:
        return [_line(f"650 HS_DESC UPLOADED {ADDR} UNKNOWN {_hsdir(A)}")]

    fake = await _fake(script)
    try:
        async with await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=2) as conn:
            results = await upload_per_hsdir(
                conn, ADDR, [(A, "fine\n"), (C, "refuse\n")], timeout=1.5
            )
            with pytest.raises(ControlReplyError) as info:
                await upload_per_hsdir(conn, ADDR, [(B, "refuse\n"), (D, "refuse too\n")])
    finally:
        await fake.close()
    assert [(r.fingerprint, r.ok, r.reason) for r in results] == [
        (A.fingerprint, True, None),
        (C.fingerprint, False, "REFUSED 552"),
    ]
    assert info.value.code == 552
    assert len(fake.commands("+HSPOST")) == 4


async def test_fetch_reports_what_each_hsdir_served(view: NetworkView) -> None:
    def script(command: str, _data: str | None) -> list[bytes]:
        return [
            _line(f"650 HS_DESC REQUESTED {ADDR} NO_AUTH {_hsdir(A)} desc-id"),
            _line(f"650 HS_DESC FAILED {ADDR} NO_AUTH {_hsdir(A)} desc-id REASON=NOT_FOUND"),
            _line(f"650+HS_DESC_CONTENT UNKNOWN UNKNOWN {_hsdir(A)}"),
            b".\r\n650 OK\r\n",
            _line(f"650+HS_DESC_CONTENT {ADDR} desc-id {_hsdir(B)}"),
            b"hs-descriptor 3\r\ngarbage\r\n.\r\n650 OK\r\n",
            _line(f"650+HS_DESC_CONTENT {OTHER} desc-id {_hsdir(C)}"),  # not ours
            b"hs-descriptor 3\r\n.\r\n650 OK\r\n",
            _line(f"650+HS_DESC_CONTENT {ADDR} desc-id not-an-hsdir"),  # malformed
            b"hs-descriptor 3\r\n.\r\n650 OK\r\n",
        ]

    fake = await _fake(script)
    try:
        async with await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=2) as conn:
            results = await fetch_per_hsdir(conn, ADDR, view, [A, B, C, D], timeout=1.5)
            with pytest.raises(ControlError, match="named twice"):
                await fetch_per_hsdir(conn, ADDR, view, [A, A])
    finally:
        await fake.close()
    assert fake.commands("HSFETCH") == [
        f"HSFETCH {ADDR} " + " ".join(f"SERVER={r.fingerprint}" for r in RELAYS)
    ]
    assert [(r.fingerprint, r.ok, r.reason) for r in results] == [
        (A.fingerprint, False, "NOT_FOUND"),
        (B.fingerprint, False, "BAD_DESCRIPTOR"),
        (C.fingerprint, False, "TIMEOUT"),
        (D.fingerprint, False, "TIMEOUT"),
    ]
