"""Joins and WireGuard in the running daemon (issue 6 "Operations"; system.md §11.1, W3, W4, W9).

:class:`Mesh` is what the daemon hooks in (``node/daemon.py`` calls it at four points):

1. :meth:`Mesh.start`, early in start-up (before the coordinator binds, since
   ``coordination.listen`` may be the tunnel address): reads the saved mesh peers
   (``wireguard.peers_path``), brings the WireGuard interface up with them when
   ``[wireguard] enabled``, hands their coordination addresses to the coordinator, and, when
   ``[join] enabled``, builds the :class:`~rustbalance.node.join.JoinResponder` from the config
   (join secret and cluster token read from their 0600 files, never logged);
2. :meth:`Mesh.interceptor` goes into the :class:`~rustbalance.proxy.server.ReverseProxy`, so a
   ``POST /.rb/<join secret>`` that reaches this node through the master onion is answered by
   the proxy itself;
3. :meth:`Mesh.add_peer` (the interceptor's callback for an admitted joiner): the joiner goes
   into WireGuard, the saved mesh peers and the coordinator's peer table (saved with the learned
   peers), so a restart keeps the mesh; when any step fails the join answer is a 500 and the
   responder forgets the admission, so the joiner's retry is a fresh join;
4. :meth:`Mesh.close` at exit: the interface goes down (kernel link deleted, or ``wireguard-go``
   stopped by PID). :meth:`Mesh.watch_wireguard` is a supervised task that brings the interface
   back if it disappears (``wireguard-go`` died, an operator deleted the link).

The mesh peers file is the pure part: :func:`load_mesh_peers` / :func:`mesh_peers_json`
(strict JSON, one :class:`~rustbalance.node.join.PeerInfo` per node). ``rustbalance join`` writes
the same file from the join answer, so the joiner's first ``run`` already knows the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rustbalance.atomic_file import write_file_atomic
from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.messages import CoordinationError
from rustbalance.cluster.wireguard import (
    WireGuardError,
    WireGuardInterface,
    WireGuardMode,
    WireGuardPeer,
    load_or_create_private_key,
    public_key_of,
)
from rustbalance.config import Config
from rustbalance.errors import RustBalanceError
from rustbalance.node.join import JoinError, JoinResponder, PeerInfo, make_join_interceptor
from rustbalance.proxy.http import Interceptor

__all__ = [
    "MESH_PEERS_VERSION",
    "Mesh",
    "MeshError",
    "load_mesh_peers",
    "mesh_peers_json",
    "mesh_wants_cluster",
    "read_mesh_peers",
    "read_private_secret",
    "save_mesh_peers",
]

log = logging.getLogger(__name__)

MESH_PEERS_VERSION = 1
# The tunnel network is at most a /20 (4094 hosts): a larger file is not ours.
_MAX_PEERS_FILE_BYTES = 4 * 1024 * 1024
_MAX_SECRET_BYTES = 4096
# How often the supervised watcher checks that the WireGuard interface still exists.
WIREGUARD_WATCH_SECS = 15.0


class MeshError(RustBalanceError):
    """Joins or WireGuard cannot start; ``config_problem`` = a config/file mistake (exit 2)."""

    def __init__(self, message: str, *, config_problem: bool = False) -> None:
        super().__init__(message)
        self.config_problem = config_problem


# --- the mesh peers file (pure) -------------------------------------------------------------


def load_mesh_peers(text: str) -> tuple[PeerInfo, ...]:
    """Strictly parse a mesh peers file; MeshError names the first problem."""
    try:
        doc: Any = json.loads(text)
    except (ValueError, RecursionError):
        raise MeshError("mesh peers file is not valid JSON", config_problem=True) from None
    if not isinstance(doc, dict) or set(doc) != {"version", "peers"}:
        raise MeshError(
            "mesh peers file must be an object with exactly 'version' and 'peers'",
            config_problem=True,
        )
    version = doc["version"]
    if isinstance(version, bool) or version != MESH_PEERS_VERSION:
        raise MeshError(f"mesh peers file: unsupported version {version!r}", config_problem=True)
    entries = doc["peers"]
    if not isinstance(entries, list):
        raise MeshError("mesh peers file: 'peers' must be a list", config_problem=True)
    peers: list[PeerInfo] = []
    for index, entry in enumerate(entries):
        try:
            peer = PeerInfo.from_dict(entry)
        except JoinError as exc:
            raise MeshError(
                f"mesh peers file: peers[{index}]: {exc}", config_problem=True
            ) from None
        if any(p.node_id == peer.node_id for p in peers):
            raise MeshError(
                f"mesh peers file: node {peer.node_id!r} is listed twice", config_problem=True
            )
        peers.append(peer)
    return tuple(peers)


def mesh_peers_json(peers: Sequence[PeerInfo]) -> str:
    """The file text for ``peers`` (sorted by node id, so rewrites are stable)."""
    doc = {
        "version": MESH_PEERS_VERSION,
        "peers": [p.to_dict() for p in sorted(peers, key=lambda p: p.node_id)],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def read_mesh_peers(path: Path) -> tuple[PeerInfo, ...]:
    """The saved mesh peers; none when the file does not exist yet."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_PEERS_FILE_BYTES + 1)
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise MeshError(
            f"{path}: cannot read: {exc.strerror or exc}", config_problem=True
        ) from None
    if len(data) > _MAX_PEERS_FILE_BYTES:
        raise MeshError(f"{path}: too large for a mesh peers file", config_problem=True)
    try:
        return load_mesh_peers(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise MeshError(f"{path}: not UTF-8", config_problem=True) from None
    except MeshError as exc:
        raise MeshError(f"{path}: {exc}", config_problem=True) from None


def save_mesh_peers(path: Path, peers: Sequence[PeerInfo]) -> None:
    """Write the mesh peers atomically, 0600 in a 0700 folder (it names the cluster's nodes)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file_atomic(path, mesh_peers_json(peers), 0o600)


def read_private_secret(path: Path, what: str) -> str:
    """A secret file (join secret, cluster token): refuses files others can read or symlinks;
    strips surrounding whitespace (files end in a newline). The secret is never in a message."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise MeshError(
            f"{what} {path}: cannot read: {exc.strerror or exc}", config_problem=True
        ) from None
    try:
        info = os.fstat(fd)
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MeshError(
                f"{what} {path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read it; "
                f"run: chmod 600 {path}",
                config_problem=True,
            )
        data = os.read(fd, _MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_SECRET_BYTES:
        raise MeshError(
            f"{what} {path}: longer than {_MAX_SECRET_BYTES} bytes", config_problem=True
        )
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise MeshError(f"{what} {path}: not UTF-8 text", config_problem=True) from None


def mesh_wants_cluster(config: Config) -> bool:
    """Run the coordinator: a node that answers joins is a cluster member from the start (a
    joiner may appear any time), and so is a node whose mesh peers file lists peers."""
    if config.join.enabled:
        return True
    path = config.wireguard.peers_path
    if config.coordination.cluster_token_path is None or path is None:
        return False
    try:
        return bool(read_mesh_peers(path))
    except MeshError:
        return False  # reported (exit 2) when the daemon starts the mesh


# --- the daemon's shell ---------------------------------------------------------------------


class Mesh:
    """The ``[join]`` and ``[wireguard]`` parts of one running daemon (see the module doc)."""

    def __init__(self, config: Config, *, netns: str | None = None) -> None:
        self.config = config
        self.netns = netns
        self.peers: tuple[PeerInfo, ...] = ()
        self.interface: WireGuardInterface | None = None
        self.responder: JoinResponder | None = None
        self.coordinator: Coordinator[Any] | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return (
            f"Mesh(peers={len(self.peers)}, wireguard={self.interface!r}, "
            f"joins={'on' if self.responder is not None else 'off'})"
        )

    @property
    def active(self) -> bool:
        return self.config.wireguard.enabled or self.config.join.enabled

    async def start(self, coordinator: Coordinator[Any] | None) -> None:
        """Saved peers, WireGuard up, coordinator seeded, responder built."""
        wg = self.config.wireguard
        self.coordinator = coordinator
        if wg.peers_path is not None:
            self.peers = await asyncio.to_thread(read_mesh_peers, wg.peers_path)
        if not self.active:
            return
        private_key = self._private_key()
        if wg.enabled:
            await self._interface_up(private_key)
        if coordinator is not None:
            for peer in self.peers:
                self._add_coordination_peer(peer)
        if self.config.join.enabled:
            self.responder = self._responder(private_key)
            log.info(
                "Answering joins over the master onion (tunnel network %s, %d known peers)",
                self.config.join.tunnel_network,
                len(self.peers),
            )

    def _private_key(self) -> str:
        path = self.config.wireguard.private_key_path
        if path is None:  # the parser requires it whenever the mesh is active
            raise MeshError("wireguard.private_key_path is not set", config_problem=True)
        try:
            return load_or_create_private_key(path)
        except (WireGuardError, OSError, UnicodeDecodeError) as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise MeshError(f"wireguard.private_key_path: {message}", config_problem=True) from None

    async def _interface_up(self, private_key: str) -> None:
        wg = self.config.wireguard
        assert wg.address is not None  # the parser requires it when enabled
        peers: list[WireGuardPeer] = []
        for peer in self.peers:
            try:
                peers.append(
                    WireGuardPeer(peer.wg_public_key, peer.tunnel_address, peer.wg_endpoint)
                )
            except WireGuardError as exc:
                log.warning("Skipping saved mesh peer %s: %s", peer.node_id, exc)
        try:
            interface = WireGuardInterface(
                wg.interface,
                private_key=private_key,
                listen_port=wg.listen_port,
                address=str(wg.address),
                peers=peers,
                netns=self.netns,
                prefer_kernel=wg.mode != "userspace",
            )
        except WireGuardError as exc:
            raise MeshError(f"wireguard: {exc}", config_problem=True) from None
        try:
            await interface.up()
        except (WireGuardError, OSError) as exc:
            raise MeshError(
                f"wireguard: cannot bring up {wg.interface}: {exc} (needs CAP_NET_ADMIN, and "
                "the kernel module or wireguard-go)"
            ) from None
        self.interface = interface
        if wg.mode == "kernel" and interface.mode is WireGuardMode.USERSPACE:
            await self.close()
            raise MeshError(
                "wireguard.mode = 'kernel' but the kernel module is not available "
                "(use 'auto' or 'userspace' for wireguard-go)"
            )
        log.info(
            "WireGuard %s up (%s), address %s, %d peers",
            wg.interface,
            interface.mode,
            wg.address,
            len(interface.peers),
        )

    def _responder(self, private_key: str) -> JoinResponder:
        cfg = self.config
        join, wg = cfg.join, cfg.wireguard
        if join.secret_path is None or cfg.coordination.cluster_token_path is None:
            raise MeshError("join needs join.secret_path and a cluster token", config_problem=True)
        assert wg.address is not None and wg.endpoint is not None  # parser: join needs them
        secret = read_private_secret(join.secret_path, "join secret")
        token = read_private_secret(cfg.coordination.cluster_token_path, "cluster token")
        coordination = cfg.coordination.advertise or cfg.coordination.listen
        try:
            self_info = PeerInfo(
                node_id=cfg.node.id,
                coordination=str(coordination),
                wg_public_key=public_key_of(private_key),
                wg_endpoint=str(wg.endpoint),
                tunnel_address=str(wg.address.ip),
            )
            return JoinResponder(
                join_secret=secret,
                cluster_token=token,
                self_info=self_info,
                tunnel_network=str(join.tunnel_network or wg.address.network),
                known_peers=lambda: self.peers,
            )
        except JoinError as exc:
            # JoinError messages never contain the secret or the token.
            raise MeshError(f"join: {exc}", config_problem=True) from None

    def status(self) -> dict[str, Any]:
        """The ``mesh`` part of the status document (no secrets: ids, addresses, counts)."""
        wg = self.config.wireguard
        interface = self.interface
        return {
            "joins_enabled": self.responder is not None,
            "joins_admitted": len(self.responder.admitted) if self.responder is not None else 0,
            "tunnel_address": str(wg.address.ip) if wg.address is not None else None,
            "wireguard": (
                {"interface": interface.ifname, "mode": str(interface.mode)}
                if interface is not None
                else None
            ),
            "peers": sorted(peer.node_id for peer in self.peers),
        }

    def interceptor(self) -> Interceptor | None:
        """The proxy hook answering ``/.rb/...``; None when joins are off."""
        if self.responder is None:
            return None
        return make_join_interceptor(self.responder, add_peer=self.add_peer)

    def _add_coordination_peer(self, peer: PeerInfo) -> None:
        if self.coordinator is None:
            return
        try:
            self.coordinator.add_peer(peer.node_id, peer.coordination)
        except CoordinationError as exc:
            log.warning("Cannot add %s to the coordination peers: %s", peer.node_id, exc)

    async def add_peer(self, peer: PeerInfo) -> None:
        """An admitted joiner: WireGuard, the saved mesh peers, the coordinator. Raises on
        failure (the interceptor then answers 500 and releases the admission)."""
        async with self._lock:
            if self.interface is not None:
                await self.interface.add_peer(
                    WireGuardPeer(peer.wg_public_key, peer.tunnel_address, peer.wg_endpoint)
                )
            peers = (*(p for p in self.peers if p.node_id != peer.node_id), peer)
            path = self.config.wireguard.peers_path
            if path is not None:
                await asyncio.to_thread(save_mesh_peers, path, peers)
            self.peers = peers
            if self.coordinator is not None:
                # Raises CoordinationError for an unusable address: the join is undone.
                self.coordinator.add_peer(peer.node_id, peer.coordination)
        log.info(
            "Joined node %s added to the mesh (tunnel %s, coordination %s)",
            peer.node_id,
            peer.tunnel_address,
            peer.coordination,
        )

    async def watch_wireguard(self) -> None:
        """Supervised task: bring the interface back when it disappeared."""
        interface = self.interface
        if interface is None:
            return
        while True:
            await asyncio.sleep(WIREGUARD_WATCH_SECS)
            if await self._link_present(interface):
                continue
            log.warning("WireGuard %s disappeared: bringing it up again", interface.ifname)
            await interface.down()
            await interface.up()
            log.info(
                "WireGuard %s recovered with %d peer(s)", interface.ifname, len(interface.peers)
            )

    async def _link_present(self, interface: WireGuardInterface) -> bool:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns is not None else []
        process = await asyncio.create_subprocess_exec(
            *prefix,
            "ip",
            "link",
            "show",
            "dev",
            interface.ifname,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            code = await asyncio.wait_for(process.wait(), 10.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return True  # unknown: do not tear down a working interface on a slow `ip`
        return code == 0

    async def close(self) -> None:
        """Take the interface down (idempotent)."""
        interface, self.interface = self.interface, None
        if interface is not None:
            await interface.down()
            log.info("WireGuard %s down", interface.ifname)
