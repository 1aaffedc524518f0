"""A WireGuard interface for the coordination mesh: create, configure, change peers, tear down.

Fixes the WireGuard half of W4, W8 and W13 of the original:

- the private key never appears on a command line or in a log: it goes to ``wg`` on stdin
  (``wg set <if> private-key /dev/stdin``);
- a tunnel IP belongs to one public key for good: adding a peer that claims another peer's
  tunnel IP (or ours) is refused, so no peer can move a ``/32`` to itself;
- peers added at run time are saved (JSON, 0600, atomic) and re-applied by :meth:`up`, so a
  reboot keeps the mesh.

The kernel module is used when ``ip link add <if> type wireguard`` works; otherwise the
userspace implementation runs as a child process (``wireguard-go -f <if>``, kept in the
foreground so it is tracked and stopped by PID). Every command can run inside a network
namespace (``netns``), which the tests use.

Keys are generated here with X25519 from ``cryptography`` (not by parsing ``wg genkey``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import os
import re
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from rustbalance.atomic_file import write_file_atomic
from rustbalance.errors import ConfigError, RustBalanceError
from rustbalance.rules import is_interface_name, parse_endpoint, parse_ip_address

__all__ = [
    "DEFAULT_KEEPALIVE_SECS",
    "WireGuardError",
    "WireGuardInterface",
    "WireGuardMode",
    "WireGuardPeer",
    "generate_private_key",
    "load_or_create_private_key",
    "load_wireguard_peers",
    "public_key_of",
]

log = logging.getLogger(__name__)

DEFAULT_KEEPALIVE_SECS = 25
PEERS_FILE_VERSION = 1
_KEY_LEN = 32
_NETNS = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_COMMAND_TIMEOUT_SECS = 10.0
_APPEAR_TIMEOUT_SECS = 5.0
_STOP_TIMEOUT_SECS = 5.0
_POLL_SECS = 0.05


class WireGuardError(RustBalanceError):
    """The WireGuard interface could not be created, configured or torn down."""


class WireGuardMode(StrEnum):
    KERNEL = "kernel"
    USERSPACE = "userspace"
    EXISTING = "existing"  # an interface we found already configured (e.g. after a restart)


def _check_key(key: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise WireGuardError(f"{what} is not base64") from None
    if len(raw) != _KEY_LEN:
        raise WireGuardError(f"{what} must be 32 bytes")
    return raw


def generate_private_key() -> str:
    """A fresh X25519 private key, base64 (the ``wg`` format)."""
    raw = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return base64.b64encode(raw).decode("ascii")


def public_key_of(private_key: str) -> str:
    """The base64 public key of a base64 X25519 private key."""
    raw = _check_key(private_key, "private key")
    public = X25519PrivateKey.from_private_bytes(raw).public_key()
    return base64.b64encode(
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode("ascii")


def load_or_create_private_key(path: Path) -> str:
    """Read the private key from ``path`` (0600), or create it there; refuses readable files."""
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise WireGuardError(f"{path} must not be readable by others (mode {mode:o})")
        key = path.read_text(encoding="ascii").strip()
        _check_key(key, f"private key in {path}")
        return key
    key = generate_private_key()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file_atomic(path, key + "\n", 0o600)
    return key


@dataclass(frozen=True)
class WireGuardPeer:
    public_key: str
    tunnel_ip: str  # the peer's single address in the tunnel: allowed-ips <ip>/32 (or /128)
    endpoint: str | None = None  # host:port of its WireGuard socket; None = it connects to us
    keepalive: int = DEFAULT_KEEPALIVE_SECS

    def __post_init__(self) -> None:
        _check_key(self.public_key, "peer public key")
        try:
            parse_ip_address(self.tunnel_ip, allow_zone=False)
        except ConfigError:
            raise WireGuardError(f"invalid tunnel IP {self.tunnel_ip!r}") from None
        if self.endpoint is not None:
            try:
                parse_endpoint(self.endpoint)
            except ConfigError as exc:
                raise WireGuardError(f"invalid peer endpoint: {exc}") from None
        if isinstance(self.keepalive, bool) or not 0 <= self.keepalive <= 65535:
            raise WireGuardError("keepalive must be 0-65535 seconds")

    @property
    def allowed_ip(self) -> str:
        ip = ipaddress.ip_address(self.tunnel_ip)
        return f"{ip}/{ip.max_prefixlen}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "public_key": self.public_key,
            "tunnel_ip": self.tunnel_ip,
            "endpoint": self.endpoint,
            "keepalive": self.keepalive,
        }


def load_wireguard_peers(text: str) -> tuple[WireGuardPeer, ...]:
    """Strictly parse a peers file written by :class:`WireGuardInterface`."""
    try:
        doc: Any = json.loads(text)
    except (ValueError, RecursionError):
        raise WireGuardError("peers file is not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"version", "peers"}:
        raise WireGuardError("peers file must have exactly 'version' and 'peers'")
    if doc["version"] != PEERS_FILE_VERSION or isinstance(doc["version"], bool):
        raise WireGuardError(f"unsupported peers file version {doc['version']!r}")
    if not isinstance(doc["peers"], list):
        raise WireGuardError("'peers' must be a list")
    peers: list[WireGuardPeer] = []
    for index, entry in enumerate(doc["peers"]):
        if not isinstance(entry, dict) or set(entry) != {
            "public_key",
            "tunnel_ip",
            "endpoint",
            "keepalive",
        }:
            raise WireGuardError(f"peers[{index}] has the wrong keys")
        key, ip, endpoint, keepalive = (
            entry["public_key"],
            entry["tunnel_ip"],
            entry["endpoint"],
            entry["keepalive"],
        )
        if not (
            isinstance(key, str)
            and isinstance(ip, str)
            and (endpoint is None or isinstance(endpoint, str))
            and isinstance(keepalive, int)
        ):
            raise WireGuardError(f"peers[{index}] has a value of the wrong type")
        peers.append(WireGuardPeer(key, ip, endpoint, keepalive))
    return tuple(peers)


class WireGuardInterface:
    """One WireGuard interface. ``await up()`` ... ``await down()`` (or ``async with``)."""

    def __init__(
        self,
        ifname: str,
        *,
        private_key: str,
        listen_port: int,
        address: str,
        peers: Sequence[WireGuardPeer] = (),
        netns: str | None = None,
        peers_file: Path | None = None,
        prefer_kernel: bool = True,
        wireguard_go: str = "wireguard-go",
        wg: str = "wg",
        ip: str = "ip",
    ) -> None:
        if not is_interface_name(ifname):
            raise WireGuardError(f"invalid interface name {ifname!r}")
        if netns is not None and not _NETNS.fullmatch(netns):
            raise WireGuardError(f"invalid network namespace name {netns!r}")
        if isinstance(listen_port, bool) or not 1 <= listen_port <= 65535:
            raise WireGuardError("listen port must be 1-65535")
        try:
            self.interface_address = ipaddress.ip_interface(address)
        except ValueError:
            raise WireGuardError(f"invalid interface address {address!r}") from None
        self.ifname = ifname
        self._private_key = private_key
        self.public_key = public_key_of(private_key)
        self.listen_port = listen_port
        self.netns = netns
        self.peers_file = peers_file
        self._prefer_kernel = prefer_kernel
        self._wireguard_go = wireguard_go
        self._wg = wg
        self._ip = ip
        self._peers: dict[str, WireGuardPeer] = {}
        for peer in peers:
            self._check_new_peer(peer)
            self._peers[peer.public_key] = peer
        self.mode: WireGuardMode | None = None
        self._process: asyncio.subprocess.Process | None = None

    def __repr__(self) -> str:
        # Never the private key.
        return (
            f"WireGuardInterface({self.ifname!r}, netns={self.netns!r}, mode={self.mode}, "
            f"public_key={self.public_key!r}, peers={len(self._peers)})"
        )

    async def __aenter__(self) -> WireGuardInterface:
        await self.up()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.down()

    @property
    def peers(self) -> tuple[WireGuardPeer, ...]:
        return tuple(self._peers.values())

    @property
    def userspace_pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    async def up(self) -> None:
        """Create (or adopt) the interface, apply key, port, saved + given peers, address, up."""
        self._load_peers_file()
        if await self._link_exists():
            if await self._run_ok(self._wg, "show", self.ifname):
                self.mode = WireGuardMode.EXISTING
            else:
                raise WireGuardError(f"{self.ifname} exists and is not a WireGuard interface")
        elif self._prefer_kernel and await self._run_ok(
            self._ip, "link", "add", "dev", self.ifname, "type", "wireguard"
        ):
            self.mode = WireGuardMode.KERNEL
        else:
            await self._start_userspace()
            self.mode = WireGuardMode.USERSPACE
        try:
            await self._run(
                self._wg,
                "set",
                self.ifname,
                "private-key",
                "/dev/stdin",
                "listen-port",
                str(self.listen_port),
                stdin=self._private_key.encode("ascii") + b"\n",
            )
            for peer in self._peers.values():
                await self._apply_peer(peer)
            await self._run(
                self._ip, "address", "replace", str(self.interface_address), "dev", self.ifname
            )
            await self._run(self._ip, "link", "set", "dev", self.ifname, "up")
        except BaseException:
            await self.down()
            raise
        # The effective set (given + saved) is what a reboot must restore.
        self._save_peers_file()
        log.info(
            "WireGuard %s up (%s, port %d, %s, %d peers)",
            self.ifname,
            self.mode,
            self.listen_port,
            self.interface_address,
            len(self._peers),
        )

    async def down(self) -> None:
        """Stop wireguard-go (by PID) or delete the kernel interface; idempotent."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_SECS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if await self._link_exists():
            await self._run_ok(self._ip, "link", "del", "dev", self.ifname)
        self.mode = None

    async def set_link(self, up: bool) -> None:
        await self._run(self._ip, "link", "set", "dev", self.ifname, "up" if up else "down")

    # -- peers --------------------------------------------------------------------------------

    async def add_peer(self, peer: WireGuardPeer) -> None:
        """Add or update a peer (same public key); refuses to give away a tunnel IP."""
        self._check_new_peer(peer)
        self._peers[peer.public_key] = peer
        if self.mode is not None:
            await self._apply_peer(peer)
        self._save_peers_file()

    async def remove_peer(self, public_key: str) -> None:
        if self._peers.pop(public_key, None) is None:
            return
        if self.mode is not None:
            await self._run(self._wg, "set", self.ifname, "peer", public_key, "remove")
        self._save_peers_file()

    async def latest_handshakes(self) -> dict[str, int]:
        """Unix time of the last handshake per peer public key (0 = never)."""
        out = await self._run(self._wg, "show", self.ifname, "latest-handshakes")
        result: dict[str, int] = {}
        for line in out.decode("ascii", "replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                result[parts[0]] = int(parts[1])
        return result

    def _check_new_peer(self, peer: WireGuardPeer) -> None:
        if peer.public_key == self.public_key:
            raise WireGuardError("a peer cannot have our own public key")
        if ipaddress.ip_address(peer.tunnel_ip) == self.interface_address.ip:
            raise WireGuardError(f"tunnel IP {peer.tunnel_ip} is our own")
        for other in self._peers.values():
            if other.public_key != peer.public_key and ipaddress.ip_address(
                other.tunnel_ip
            ) == ipaddress.ip_address(peer.tunnel_ip):
                # W4: never move a tunnel IP to another key (WireGuard would let the last
                # claimant take the traffic).
                raise WireGuardError(f"tunnel IP {peer.tunnel_ip} already belongs to another peer")

    async def _apply_peer(self, peer: WireGuardPeer) -> None:
        argv = [self._wg, "set", self.ifname, "peer", peer.public_key]
        argv += ["allowed-ips", peer.allowed_ip]
        if peer.endpoint is not None:
            argv += ["endpoint", peer.endpoint]
        argv += ["persistent-keepalive", str(peer.keepalive) if peer.keepalive else "off"]
        await self._run(*argv)

    # -- persistence --------------------------------------------------------------------------

    def _load_peers_file(self) -> None:
        if self.peers_file is None or not self.peers_file.exists():
            return
        for peer in load_wireguard_peers(self.peers_file.read_text(encoding="utf-8")):
            if peer.public_key in self._peers:
                continue  # the caller's configuration wins over the saved copy
            try:
                self._check_new_peer(peer)
            except WireGuardError as exc:
                log.warning("skipping a saved WireGuard peer: %s", exc)
                continue
            self._peers[peer.public_key] = peer

    def _save_peers_file(self) -> None:
        if self.peers_file is None:
            return
        doc = {
            "version": PEERS_FILE_VERSION,
            "peers": [p.to_dict() for p in sorted(self._peers.values(), key=lambda p: p.tunnel_ip)],
        }
        self.peers_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_file_atomic(self.peers_file, json.dumps(doc, indent=2, sort_keys=True) + "\n")

    # -- processes ----------------------------------------------------------------------------

    def _argv(self, argv: Iterable[str]) -> list[str]:
        prefix = [self._ip, "netns", "exec", self.netns] if self.netns is not None else []
        return [*prefix, *argv]

    async def _start_userspace(self) -> None:
        env = dict(os.environ)
        # wireguard-go refuses to run when it believes the kernel module exists; here it
        # does not (or could not be used), so the userspace implementation is what we want.
        env["WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"] = "1"
        # -f keeps it in the foreground: our child, stopped by PID in down().
        self._process = await asyncio.create_subprocess_exec(
            *self._argv([self._wireguard_go, "-f", self.ifname]),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _APPEAR_TIMEOUT_SECS
        while loop.time() < deadline:
            if self._process.returncode is not None:
                code = self._process.returncode
                self._process = None
                raise WireGuardError(f"wireguard-go for {self.ifname} exited with code {code}")
            if await self._link_exists() and await self._run_ok(self._wg, "show", self.ifname):
                return
            await asyncio.sleep(_POLL_SECS)
        await self.down()
        raise WireGuardError(f"wireguard-go did not create {self.ifname} in time")

    async def _link_exists(self) -> bool:
        return await self._run_ok(self._ip, "link", "show", "dev", self.ifname)

    async def _run_ok(self, *argv: str) -> bool:
        try:
            await self._run(*argv)
        except WireGuardError:
            return False
        return True

    async def _run(self, *argv: str, stdin: bytes | None = None) -> bytes:
        full = self._argv(argv)
        # Input goes through a real pipe, filled before the child starts: `wg` opens
        # /dev/stdin by name, which fails (ENXIO) on the socketpair that uvloop's subprocess
        # PIPE is. The input (a key) is far below the pipe buffer, so the write cannot block.
        stdin_fd: int | None = None
        if stdin is not None:
            stdin_fd, write_fd = os.pipe()
            try:
                os.write(write_fd, stdin)
            finally:
                os.close(write_fd)
        try:
            process = await asyncio.create_subprocess_exec(
                *full,
                stdin=stdin_fd if stdin_fd is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            if stdin_fd is not None:
                os.close(stdin_fd)
        try:
            out, err = await asyncio.wait_for(process.communicate(), _COMMAND_TIMEOUT_SECS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise WireGuardError(f"{' '.join(argv[:3])} timed out") from None
        if process.returncode != 0:
            # argv never holds a secret (keys go through stdin), so it may be shown.
            message = err.decode("utf-8", "replace").strip()
            raise WireGuardError(f"{' '.join(argv)} failed: {message}")
        return out
