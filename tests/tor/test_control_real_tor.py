"""The control client against a real ``tor`` child process (no network: ``DisableNetwork 1``).

One tor per module, with a TCP control port chosen by tor (``ControlPort auto``, written to
``ControlPortWriteToFile``) and a unix-socket control port, cookie authentication and a
``HashedControlPassword`` computed here with tor's S2K. The password only ever goes into the
0600 torrc file, never on a command line. tor is stopped by PID when the module ends.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rustbalance.tor.control import (
    ControlAddress,
    ControlAuthenticationError,
    ControlConnection,
    ReconnectingController,
)
from rustbalance.tor.control_protocol import ControlReplyError

PASSWORD = "correct horse battery staple"


def tor_s2k_hash(password: str, salt: bytes, count_byte: int = 0x60) -> str:
    """tor's HashedControlPassword: RFC 2440 §3.6.1.3 iterated+salted S2K with SHA-1.

    control-spec §3.5 / tor's ``secret_to_key_rfc2440``: the bytes ``salt || password`` are
    hashed repeatedly until ``(16 + (c & 15)) << ((c >> 4) + 6)`` bytes were fed; the result is
    ``"16:" + hex(salt || c || digest)``. 0x60 is tor's own choice (65536 bytes).
    """
    count = (16 + (count_byte & 15)) << ((count_byte >> 4) + 6)
    block = salt + password.encode()
    digest = hashlib.sha1()  # tor's format mandates SHA-1
    while count > 0:
        chunk = block[:count]
        digest.update(chunk)
        count -= len(chunk)
    return "16:" + (salt + bytes([count_byte]) + digest.digest()).hex().upper()


def v3_address(public_key: bytes) -> str:
    """rend-spec-v3 [ONIONADDRESS]: base32(PUBKEY | CHECKSUM | VERSION), lower case."""
    version = b"\x03"
    checksum = hashlib.sha3_256(b".onion checksum" + public_key + version).digest()[:2]
    return base64.b32encode(public_key + checksum + version).decode().lower()


@dataclass(frozen=True)
class RunningTor:
    pid: int
    tcp: str
    unix: str
    data_dir: Path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, SIGKILL after 10 s; bounded waits."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def real_tor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTor]:
    base = tmp_path_factory.mktemp("ctl")
    data_dir = base / "data"
    sock_dir = base / "sock"
    for directory in (data_dir, sock_dir):
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)
    port_file = data_dir / "control_port"
    sock_path = sock_dir / "control"
    torrc = base / "torrc"
    defaults = base / "torrc-defaults"
    defaults.write_text("")  # tor.md §13.10: empty regular files, not /dev/null
    fd = os.open(torrc, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(
            "\n".join(
                [
                    f"DataDirectory {data_dir}",
                    "DisableNetwork 1",
                    "SocksPort 0",
                    "ControlPort auto",
                    f"ControlPort unix:{sock_path}",
                    f"ControlPortWriteToFile {port_file}",
                    "CookieAuthentication 1",
                    f"HashedControlPassword {tor_s2k_hash(PASSWORD, os.urandom(8))}",
                    f"Log notice file {data_dir / 'tor.log'}",
                    # tor exits by itself should this test process die.
                    f"__OwningControllerProcess {os.getpid()}",
                    "",
                ]
            )
        )
    proc = subprocess.Popen(
        ["tor", "-f", str(torrc), "--defaults-torrc", str(defaults)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tcp = _wait_for_control_port(proc, port_file, data_dir)
        yield RunningTor(proc.pid, tcp, str(sock_path), data_dir)
    finally:
        _stop(proc)


def _wait_for_control_port(proc: subprocess.Popen[bytes], port_file: Path, data_dir: Path) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (data_dir / "tor.log").read_text() if (data_dir / "tor.log").exists() else ""
            raise AssertionError(f"tor exited with {proc.returncode}:\n{log[-2000:]}")
        if port_file.exists():
            for line in port_file.read_text().splitlines():
                if line.startswith("PORT="):
                    address = ControlAddress.parse(line[5:])
                    try:
                        with socket.create_connection((address.host, address.port), timeout=1):
                            return line[5:]
                    except OSError:
                        pass
        time.sleep(0.1)
    raise AssertionError("tor's control port did not come up within 30 s")


async def test_safecookie_is_preferred(real_tor: RunningTor) -> None:
    async with await ControlConnection.connect(real_tor.tcp, timeout=10) as conn:
        assert conn.auth_method == "SAFECOOKIE"
        version = (await conn.get_info("version"))["version"]
        assert version.startswith("0.4.")


async def test_cookie_authentication(real_tor: RunningTor) -> None:
    conn = await ControlConnection.connect(real_tor.tcp, timeout=10, allowed_methods={"COOKIE"})
    async with conn:
        assert conn.auth_method == "COOKIE"
        assert (await conn.get_info("version"))["version"]


async def test_password_authentication(real_tor: RunningTor) -> None:
    conn = await ControlConnection.connect(
        real_tor.tcp, password=PASSWORD, timeout=10, allowed_methods={"HASHEDPASSWORD"}
    )
    async with conn:
        assert conn.auth_method == "HASHEDPASSWORD"
        assert (await conn.get_info("version"))["version"]
    with pytest.raises(ControlAuthenticationError, match="515"):
        await ControlConnection.connect(
            real_tor.tcp, password="wrong", timeout=10, allowed_methods={"HASHEDPASSWORD"}
        )


async def test_unix_socket_control_port(real_tor: RunningTor) -> None:
    async with await ControlConnection.connect(f"unix:{real_tor.unix}", timeout=10) as conn:
        info = await conn.get_info("version", "process/pid")
        assert int(info["process/pid"]) == real_tor.pid


async def test_getconf_setconf_resetconf_and_conf_changed_event(real_tor: RunningTor) -> None:
    async with await ControlConnection.connect(real_tor.tcp, timeout=10) as conn:
        sub = await conn.subscribe("CONF_CHANGED")
        before = await conn.get_conf("MaxClientCircuitsPending", "ContactInfo")
        assert before == {"MaxClientCircuitsPending": ["32"], "ContactInfo": []}
        await conn.set_conf(
            {"MaxClientCircuitsPending": "48", "ContactInfo": 'ops "team" <a@b>\\x'}
        )
        after = await conn.get_conf("MaxClientCircuitsPending", "ContactInfo")
        assert after == {"MaxClientCircuitsPending": ["48"], "ContactInfo": ['ops "team" <a@b>\\x']}
        event = await sub.get(timeout=10)
        assert event.type == "CONF_CHANGED"
        assert "MaxClientCircuitsPending=48" in [line.text for line in event.lines]
        await conn.reset_conf("MaxClientCircuitsPending", "ContactInfo")
        assert await conn.get_conf("MaxClientCircuitsPending", "ContactInfo") == before
        await sub.aclose()


async def test_signal_and_setevents(real_tor: RunningTor) -> None:
    async with await ControlConnection.connect(real_tor.tcp, timeout=10) as conn:
        await conn.set_events("HS_DESC", "HS_DESC_CONTENT")
        await conn.signal("NEWNYM")
        with pytest.raises(ControlReplyError) as info:
            await conn.signal("NOT_A_SIGNAL")
        assert info.value.code // 100 == 5
        await conn.set_events()


async def test_5xx_reply_is_a_typed_error_and_the_session_survives(real_tor: RunningTor) -> None:
    async with await ControlConnection.connect(real_tor.tcp, timeout=10) as conn:
        with pytest.raises(ControlReplyError) as info:
            await conn.get_info("no/such/key")
        assert info.value.code == 552
        assert "no/such/key" in info.value.tor_message
        with pytest.raises(ControlReplyError) as conf:
            await conn.set_conf({"NoSuchOption": "1"})
        assert conf.value.code == 552
        assert (await conn.get_info("version"))["version"]


async def test_hspost_of_garbage_is_invalid_descriptor(real_tor: RunningTor) -> None:
    # tor checks the address holds a valid ed25519 point (else 512 Malformed onion address).
    public_key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    address = v3_address(public_key)
    async with await ControlConnection.connect(real_tor.tcp, timeout=10) as conn:
        with pytest.raises(ControlReplyError) as info:
            await conn.hs_post("hs-descriptor 3\ngarbage\n", address)
        # tor.md §9.3: the outer document is parsed before anything is uploaded.
        assert info.value.code == 554
        assert info.value.tor_message == "Invalid descriptor"
        assert (await conn.get_info("version"))["version"]


async def test_reconnecting_controller_session_and_events(real_tor: RunningTor) -> None:
    async with ReconnectingController(real_tor.tcp, timeout=10) as ctl:
        sub = await ctl.subscribe("CONF_CHANGED")
        await ctl.wait_connected(timeout=10)
        await ctl.set_conf({"MaxClientCircuitsPending": "40"})
        event = await sub.get(timeout=10)
        assert "MaxClientCircuitsPending=40" in [line.text for line in event.lines]
        await ctl.reset_conf("MaxClientCircuitsPending")
        assert await ctl.get_conf("MaxClientCircuitsPending") == {
            "MaxClientCircuitsPending": ["32"]
        }
        assert ctl.connections == 1
