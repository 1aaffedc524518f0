"""The asyncio control client against small fake control ports.

A fake server is used here on purpose: real tor cannot be made, on demand, to hang without
answering, close a connection in the middle of a reply, send garbage, present a forged SAFECOOKIE
server hash, or vanish and come back on the same port. Everything tor *can* do is covered against a
real tor in ``test_control_real_tor.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from rustbalance.errors import ConfigError, ControlError
from rustbalance.tor.control import (
    PASSWORD_ENV_VAR,
    ControlAddress,
    ControlAuthenticationError,
    ControlClosedError,
    ControlConnection,
    ControlConnectionError,
    ControlTimeoutError,
    ReconnectingController,
    password_from_env,
    safecookie_client_hash,
    safecookie_server_hash,
)
from rustbalance.tor.control_protocol import (
    ControlProtocolError,
    ControlReplyError,
    HsDescEvent,
    typed_event,
)

ADDR = "pg6mmjiyjmcrsslvykfwnntlaru7p5svn6y2ymmju6nubxndf4pscryd"
FP = "2730B98E6E1B2A59C1D7D0A1D46B1C5E0A4A0C11"
HS_DESC_LINE = f"650 HS_DESC UPLOADED {ADDR} UNKNOWN ${FP}~relay003\r\n".encode()

NULL_PROTOCOLINFO = b"250-PROTOCOLINFO 1\r\n250-AUTH METHODS=NULL\r\n250 OK\r\n"

# A handler gets (command line, data block or None, writer) and writes the answer itself.
Handler = Callable[[str, "str | None", asyncio.StreamWriter], Awaitable[None]]


class FakeTor:
    """A scripted control port on 127.0.0.1; every command line it receives is recorded."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler or default_handler
        self.received: list[str] = []
        self.data_blocks: list[str] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                text = line.decode().rstrip("\r\n")
                data = None
                if text.startswith("+"):
                    block = []
                    while (row := await reader.readline()) not in (b".\r\n", b""):
                        block.append(row.decode())
                    data = "".join(block)
                    self.data_blocks.append(data)
                self.received.append(text)
                await self.handler(text, data, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    def commands(self, prefix: str) -> list[str]:
        return [c for c in self.received if c.startswith(prefix)]

    async def drop_clients(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    async def close(self) -> None:
        await self.drop_clients()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self.server.wait_closed()


async def default_handler(command: str, data: str | None, writer: asyncio.StreamWriter) -> None:
    keyword = command.split(" ", 1)[0]
    if keyword == "PROTOCOLINFO":
        writer.write(NULL_PROTOCOLINFO)
    elif keyword in ("AUTHENTICATE", "SETEVENTS", "SETCONF", "RESETCONF", "+HSPOST", "HSFETCH"):
        writer.write(b"250 OK\r\n")
    elif command == "GETINFO version":
        # An event arrives between the command and its reply (tor.md §9.1).
        writer.write(HS_DESC_LINE + b"250-version=0.4.9.11\r\n250 OK\r\n")
    elif command == "SIGNAL NEWNYM":
        writer.write(b"250 OK\r\n")
    elif keyword == "SIGNAL":
        writer.write(b"552 Unrecognized signal code\r\n")
    else:
        writer.write(b'510 Unrecognized command "' + keyword.encode() + b'"\r\n')
    await writer.drain()


@pytest.fixture
async def fake_tor() -> AsyncIterator[FakeTor]:
    fake = FakeTor()
    await fake.start()
    yield fake
    await fake.close()


async def make_fake(handler: Handler) -> FakeTor:
    fake = FakeTor(handler)
    await fake.start()
    return fake


async def eventually(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``predicate`` for at most ``seconds`` (a bounded loop)."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------


async def test_commands_and_an_event_interleaved_with_a_reply(fake_tor: FakeTor) -> None:
    conn = await ControlConnection.connect(f"127.0.0.1:{fake_tor.port}", timeout=2)
    try:
        sub = await conn.subscribe("HS_DESC")
        assert fake_tor.commands("SETEVENTS") == ["SETEVENTS HS_DESC"]
        assert await conn.get_info("version") == {"version": "0.4.9.11"}
        event = typed_event(await sub.get(timeout=2))
        assert isinstance(event, HsDescEvent)
        assert event.action == "UPLOADED" and event.hsdir_fingerprint == FP
    finally:
        await conn.close()
    assert fake_tor.received[:2] == ["PROTOCOLINFO 1", "AUTHENTICATE"]


async def test_reply_error_carries_code_and_the_connection_stays_usable(
    fake_tor: FakeTor,
) -> None:
    async with await ControlConnection.connect(f"127.0.0.1:{fake_tor.port}", timeout=2) as conn:
        with pytest.raises(ControlReplyError) as info:
            await conn.signal("BOGUS")
        assert info.value.code == 552
        assert info.value.tor_message == "Unrecognized signal code"
        await conn.signal("NEWNYM")


async def test_hs_post_and_hs_fetch_wire_format(fake_tor: FakeTor) -> None:
    async with await ControlConnection.connect(f"127.0.0.1:{fake_tor.port}", timeout=2) as conn:
        await conn.hs_post("hs-descriptor 3\n.dot\n", ADDR + ".onion", servers=[f"${FP.lower()}"])
        await conn.hs_fetch(ADDR, servers=[FP])
        with pytest.raises(ControlError, match="onion"):
            await conn.hs_post("x\n", "not-an-address")
    assert fake_tor.commands("+HSPOST") == [f"+HSPOST SERVER={FP} HSADDRESS={ADDR}"]
    assert fake_tor.data_blocks == ["hs-descriptor 3\r\n..dot\r\n"]
    assert fake_tor.commands("HSFETCH") == [f"HSFETCH {ADDR} SERVER={FP}"]


async def test_setevents_is_the_union_of_subscriptions(fake_tor: FakeTor) -> None:
    async with await ControlConnection.connect(f"127.0.0.1:{fake_tor.port}", timeout=2) as conn:
        first = await conn.subscribe("HS_DESC")
        second = await conn.subscribe("hs_desc_content", "HS_DESC")
        await first.aclose()
        await first.aclose()  # idempotent, no extra SETEVENTS
        await second.aclose()
    assert fake_tor.commands("SETEVENTS") == [
        "SETEVENTS HS_DESC",
        "SETEVENTS HS_DESC HS_DESC_CONTENT",
        "SETEVENTS HS_DESC HS_DESC_CONTENT",
        "SETEVENTS",
    ]


async def test_slow_subscriber_keeps_the_newest_events() -> None:
    async def handler(command: str, data: str | None, writer: asyncio.StreamWriter) -> None:
        if command.startswith("GETINFO"):
            for i in range(10):
                writer.write(f"650 HS_DESC CREATED addr{i} UNKNOWN UNKNOWN\r\n".encode())
            writer.write(b"250-version=1\r\n250 OK\r\n")
            await writer.drain()
        else:
            await default_handler(command, data, writer)

    fake = await make_fake(handler)
    try:
        async with await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=2) as conn:
            sub = await conn.subscribe("HS_DESC", maxsize=3)
            await conn.get_info("version")
            got = [(await sub.get(timeout=1)).text.split()[1] for _ in range(3)]
            assert got == ["addr7", "addr8", "addr9"]
            assert sub.dropped == 7
    finally:
        await fake.close()


async def test_silent_control_port_times_out_instead_of_hanging() -> None:
    async def never(command: str, data: str | None, writer: asyncio.StreamWriter) -> None:
        return

    fake = await make_fake(never)
    try:
        start = time.monotonic()
        with pytest.raises(ControlTimeoutError, match="PROTOCOLINFO"):
            await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=0.5)
        assert time.monotonic() - start < 3
    finally:
        await fake.close()


async def test_timeout_mid_session_closes_the_connection() -> None:
    async def hang_on_hspost(command: str, data: str | None, writer: asyncio.StreamWriter) -> None:
        if not command.startswith("+HSPOST"):
            await default_handler(command, data, writer)

    fake = await make_fake(hang_on_hspost)
    try:
        conn = await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=0.5)
        lost: list[BaseException | None] = []
        conn.add_disconnect_listener(lost.append)
        with pytest.raises(ControlTimeoutError):
            await conn.hs_post("x\n", ADDR)
        # A missing reply leaves the stream out of sync: the connection is not reused.
        assert conn.is_closed
        assert len(lost) == 1 and isinstance(lost[0], ControlTimeoutError)
        with pytest.raises(ControlClosedError):
            await conn.get_info("version")
        await conn.close()
    finally:
        await fake.close()


async def test_server_closing_mid_reply_gives_closed_error() -> None:
    async def half(command: str, data: str | None, writer: asyncio.StreamWriter) -> None:
        if command.startswith("GETINFO"):
            writer.write(b"250+md/all=\r\npartial line\r\n")
            await writer.drain()
            writer.close()
        else:
            await default_handler(command, data, writer)

    fake = await make_fake(half)
    try:
        conn = await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=2)
        sub = await conn.subscribe("HS_DESC")
        with pytest.raises(ControlClosedError, match="closed"):
            await conn.get_info("md/all")
        assert isinstance(conn.close_reason, ControlClosedError)
        # Subscriptions end with the connection.
        assert [e async for e in sub] == []
        await conn.close()
    finally:
        await fake.close()


@pytest.mark.parametrize(
    "garbage",
    [b"HTTP/1.1 400 Bad Request\r\n", b"250-a=1\r\n251 OK\r\n", b"250+a=\r\n" + b"z" * 5000],
)
async def test_garbage_reply_gives_protocol_error(garbage: bytes) -> None:
    async def bad(command: str, data: str | None, writer: asyncio.StreamWriter) -> None:
        if command.startswith("GETINFO"):
            writer.write(garbage)
            await writer.drain()
        else:
            await default_handler(command, data, writer)

    fake = await make_fake(bad)
    try:
        conn = await ControlConnection.connect(
            f"127.0.0.1:{fake.port}", timeout=2, max_line_length=1024, max_reply_size=4096
        )
        start = time.monotonic()
        with pytest.raises(ControlProtocolError):
            await conn.get_info("version")
        assert time.monotonic() - start < 2.5
        assert conn.is_closed
        await conn.close()
    finally:
        await fake.close()


def safecookie_handler(cookie_path: Path, cookie: bytes, forge: bool) -> Handler:
    server_nonce = bytes(range(32))
    state: dict[str, bytes] = {}

    async def handler(command: str, data: str | None, writer: asyncio.StreamWriter) -> None:
        words = command.split(" ")
        if words[0] == "PROTOCOLINFO":
            writer.write(
                b"250-PROTOCOLINFO 1\r\n"
                b'250-AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE="'
                + str(cookie_path).encode()
                + b'"\r\n250 OK\r\n'
            )
        elif words[0] == "AUTHCHALLENGE":
            client_nonce = bytes.fromhex(words[2])
            state["client_nonce"] = client_nonce
            key = b"Tor safe cookie authentication server-to-controller hash"
            server_hash = hmac.new(key, cookie + client_nonce + server_nonce, "sha256").digest()
            if forge:
                server_hash = hashlib.sha256(b"not the cookie").digest()
            writer.write(
                f"250 AUTHCHALLENGE SERVERHASH={server_hash.hex().upper()} "
                f"SERVERNONCE={server_nonce.hex().upper()}\r\n".encode()
            )
        elif words[0] == "AUTHENTICATE":
            key = b"Tor safe cookie authentication controller-to-server hash"
            expected = hmac.new(
                key, cookie + state["client_nonce"] + server_nonce, "sha256"
            ).hexdigest()
            ok = len(words) == 2 and words[1].lower() == expected
            writer.write(b"250 OK\r\n" if ok else b"515 Authentication failed\r\n")
        else:
            await default_handler(command, data, writer)
        await writer.drain()

    return handler


async def test_safecookie_authentication(tmp_path: Path) -> None:
    cookie = bytes(range(100, 132))
    path = tmp_path / "control_auth_cookie"
    path.write_bytes(cookie)
    fake = await make_fake(safecookie_handler(path, cookie, forge=False))
    try:
        conn = await ControlConnection.connect(
            f"127.0.0.1:{fake.port}", timeout=2, randbytes=lambda n: b"\x07" * n
        )
        await conn.close()
        await conn.close()  # idempotent
        assert fake.received[1] == "AUTHCHALLENGE SAFECOOKIE " + "07" * 32
        # The cookie itself never goes over the wire with SAFECOOKIE.
        assert all(cookie.hex() not in line.lower() for line in fake.received)
    finally:
        await fake.close()


async def test_forged_safecookie_server_hash_is_refused(tmp_path: Path) -> None:
    cookie = bytes(32)
    path = tmp_path / "cookie"
    path.write_bytes(cookie)
    fake = await make_fake(safecookie_handler(path, cookie, forge=True))
    try:
        with pytest.raises(ControlAuthenticationError, match="server hash"):
            await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=2)
        assert fake.commands("AUTHENTICATE") == []
    finally:
        await fake.close()


async def test_cookie_file_of_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cookie"
    path.write_bytes(b"short")
    fake = await make_fake(safecookie_handler(path, b"short", forge=False))
    try:
        with pytest.raises(ControlAuthenticationError, match="32 bytes"):
            await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=2)
    finally:
        await fake.close()


async def test_password_required_but_missing_names_the_env_var() -> None:
    async def pw_only(command: str, data: str | None, writer: asyncio.StreamWriter) -> None:
        if command.startswith("PROTOCOLINFO"):
            writer.write(b"250-PROTOCOLINFO 1\r\n250-AUTH METHODS=HASHEDPASSWORD\r\n250 OK\r\n")
            await writer.drain()
        elif command.startswith("AUTHENTICATE"):
            ok = command == 'AUTHENTICATE "s3cr\\"et"'
            writer.write(b"250 OK\r\n" if ok else b"515 Authentication failed\r\n")
            await writer.drain()
        else:
            await default_handler(command, data, writer)

    fake = await make_fake(pw_only)
    try:
        with pytest.raises(ControlAuthenticationError, match=PASSWORD_ENV_VAR):
            await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=2)
        with pytest.raises(ControlAuthenticationError, match="515"):
            await ControlConnection.connect(f"127.0.0.1:{fake.port}", password="wrong", timeout=2)
        conn = await ControlConnection.connect(
            f"127.0.0.1:{fake.port}", password='s3cr"et', timeout=2
        )
        await conn.close()
    finally:
        await fake.close()


async def test_connection_refused_is_a_control_error() -> None:
    with pytest.raises(ControlConnectionError, match="cannot connect"):
        await ControlConnection.connect(f"127.0.0.1:{free_port()}", timeout=2)


async def test_unix_socket_address(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    fake = FakeTor()

    server = await asyncio.start_unix_server(fake._serve, str(path))
    try:
        async with await ControlConnection.connect(f"unix:{path}", timeout=2) as conn:
            assert await conn.get_info("version") == {"version": "0.4.9.11"}
    finally:
        await fake.drop_clients()
        server.close()


def test_control_address_parse() -> None:
    assert ControlAddress.parse("127.0.0.1:9051") == ControlAddress(host="127.0.0.1", port=9051)
    assert ControlAddress.parse("9051") == ControlAddress(host="127.0.0.1", port=9051)
    assert ControlAddress.parse("[::1]:9051") == ControlAddress(host="::1", port=9051)
    assert ControlAddress.parse("unix:/run/tor/control") == ControlAddress(path="/run/tor/control")
    assert ControlAddress.parse("/run/tor/control") == ControlAddress(path="/run/tor/control")
    assert str(ControlAddress.parse("[::1]:9051")) == "[::1]:9051"
    for bad in ("host:0", "host:70000", "host:", "::1:9051", "unix:", "x"):
        with pytest.raises(ConfigError):
            ControlAddress.parse(bad)


def test_password_from_env() -> None:
    assert password_from_env({PASSWORD_ENV_VAR: "pw"}) == "pw"
    assert password_from_env({PASSWORD_ENV_VAR: ""}) is None
    assert password_from_env({}) is None


def test_safecookie_hashes_use_distinct_keys() -> None:
    # control-spec §3.24: the two hashes use different HMAC keys over the same message.
    cookie, cn, sn = b"c" * 32, b"n" * 32, b"s" * 32
    server = safecookie_server_hash(cookie, cn, sn)
    client = safecookie_client_hash(cookie, cn, sn)
    assert len(server) == len(client) == 32 and server != client
    expected = hmac.new(
        b"Tor safe cookie authentication server-to-controller hash", cookie + cn + sn, "sha256"
    ).digest()
    assert server == expected


# --------------------------------------------------------------------------------------------
# Reconnecting controller
# --------------------------------------------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered() -> None:
    ctl = ReconnectingController(
        "127.0.0.1:9051", initial_backoff=1.0, max_backoff=8.0, random=lambda: 1.0
    )
    assert [ctl.backoff_delay(a) for a in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    low = ReconnectingController("127.0.0.1:9051", initial_backoff=1.0, random=lambda: 0.0)
    assert low.backoff_delay(2) == 2.0


async def test_reconnecting_controller_recovers_and_resubscribes() -> None:
    port = free_port()
    delays: list[float] = []

    async def fast_sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0.01)

    ctl = ReconnectingController(
        f"127.0.0.1:{port}",
        timeout=2,
        initial_backoff=1.0,
        max_backoff=4.0,
        sleep=fast_sleep,
        random=lambda: 1.0,
    )
    ups: list[ControlConnection] = []
    downs: list[BaseException | None] = []

    async def on_up(conn: ControlConnection) -> None:
        ups.append(conn)

    ctl.on_connected(on_up)
    ctl.on_disconnected(downs.append)
    fake = FakeTor()
    try:
        async with ctl:
            sub = await ctl.subscribe("HS_DESC")
            # Nothing listens yet: the controller backs off exponentially.
            await eventually(lambda: len(delays) >= 4)
            assert delays[:4] == [1.0, 2.0, 4.0, 4.0]
            with pytest.raises(ControlTimeoutError):
                await ctl.get_info("version")  # no connection within the timeout... yet
            await fake.start(port)
            await ctl.wait_connected(timeout=5)
            assert await ctl.get_info("version") == {"version": "0.4.9.11"}
            # The event tor sent between the command and its reply reached the subscriber.
            assert isinstance(typed_event(await sub.get(timeout=2)), HsDescEvent)
            assert fake.commands("SETEVENTS") == ["SETEVENTS HS_DESC"]
            assert len(ups) == 1

            # Tor restarts: the session drops, listeners hear it, and it comes back.
            await fake.drop_clients()
            await eventually(lambda: ctl.connections >= 2)
            assert len(downs) == 1 and isinstance(downs[0], ControlClosedError)
            assert fake.commands("SETEVENTS") == ["SETEVENTS HS_DESC", "SETEVENTS HS_DESC"]
            assert await ctl.get_info("version") == {"version": "0.4.9.11"}
            event = typed_event(await sub.get(timeout=2))
            assert isinstance(event, HsDescEvent) and event.address == ADDR
            assert len(ups) == 2
        await ctl.close()  # idempotent after __aexit__
        assert [e async for e in sub] == []
        with pytest.raises(ControlClosedError):
            await ctl.get_info("version")
    finally:
        await fake.close()


async def test_cancelled_command_does_not_desync_later_replies() -> None:
    async def slow(command: str, data: str | None, writer: asyncio.StreamWriter) -> None:
        if command == "GETINFO slow":
            await asyncio.sleep(0.3)
            writer.write(b"250-slow=late\r\n250 OK\r\n")
            await writer.drain()
        else:
            await default_handler(command, data, writer)

    fake = await make_fake(slow)
    try:
        async with await ControlConnection.connect(f"127.0.0.1:{fake.port}", timeout=2) as conn:
            task = asyncio.create_task(conn.get_info("slow"))
            await eventually(lambda: "GETINFO slow" in fake.received)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The late "slow" reply is consumed by the abandoned command, not handed to this one.
            assert await conn.get_info("version") == {"version": "0.4.9.11"}
    finally:
        await fake.close()


async def test_bad_arguments_are_refused_before_sending(fake_tor: FakeTor) -> None:
    conn = await ControlConnection.connect(f"127.0.0.1:{fake_tor.port}", timeout=2)
    sent = len(fake_tor.received)
    with pytest.raises(ControlError, match="whitespace"):
        await conn.get_info("version extra")
    with pytest.raises(ControlError):
        await conn.set_conf({"ContactInfo": "a\x01b"})
    with pytest.raises(ControlError, match="fingerprint"):
        await conn.hs_fetch(ADDR, servers=["nickname"])
    assert len(fake_tor.received) == sent
    await conn.close()
    with pytest.raises(ControlClosedError):
        await conn.subscribe("HS_DESC")
