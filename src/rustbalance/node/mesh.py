"""Joins and WireGuard in the running daemon (issue 6 "Operations", issue 16; system.md §11.1).

:class:`Mesh` is what the daemon hooks in (``node/daemon.py`` calls it at four points):

1. :meth:`Mesh.start`, early in start-up (before the coordinator binds, since
   ``coordination.listen`` may be the tunnel address): brings the WireGuard interface up, when
   ``[wireguard] enabled``, with one peer per admitted member of the cluster (the coordinator's
   membership: master-signed records carry each node's WireGuard key, endpoint and tunnel
   address), and, when ``[join] enabled`` (a node that holds the master key), builds the
   :class:`~rustbalance.node.join.JoinResponder`;
2. :meth:`Mesh.interceptor` goes into the :class:`~rustbalance.proxy.server.ReverseProxy` on
   every node, joins on or off: a request for any spelling of ``/.rb/...`` that reaches this
   node through the master onion is answered by the proxy itself, never by the target;
3. :meth:`Mesh.admit` (the interceptor's callback for an admitted joiner): its signed record
   goes into the coordinator's membership (saved before the joiner gets its answer, and sent
   to every member at once) and its WireGuard peer into the interface; when that fails the
   join answer is a 500 and nothing was admitted, so the joiner's retry is a fresh join;
4. :meth:`Mesh.close` at exit: the interface goes down (kernel link deleted, or
   ``wireguard-go`` stopped by PID).

:meth:`Mesh.watch_wireguard` is a supervised task: it makes the interface's peers follow the
membership whenever it changes (:meth:`members_changed`, the coordinator's callback: a node
admitted anywhere in the cluster is added on every node, a revoked one removed), and brings
the interface back if it disappears (``wireguard-go`` died, an operator deleted the link).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

from rustbalance.cluster.authority import AdmissionRecord, Statement
from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.wireguard import (
    WireGuardError,
    WireGuardInterface,
    WireGuardMode,
    WireGuardPeer,
    load_or_create_private_key,
)
from rustbalance.config import Config
from rustbalance.crypto.keys import IdentityKey
from rustbalance.errors import RustBalanceError
from rustbalance.node.join import JoinError, JoinInterceptor, JoinResponder
from rustbalance.proxy.http import Interceptor

__all__ = ["WIREGUARD_WATCH_SECS", "Mesh", "MeshError", "mesh_wants_cluster", "wireguard_peers"]

log = logging.getLogger(__name__)

# How often the supervised watcher checks that the WireGuard interface still exists (it also
# wakes up at once when the membership changes).
WIREGUARD_WATCH_SECS = 15.0


class MeshError(RustBalanceError):
    """Joins or WireGuard cannot start; ``config_problem`` = a config/file mistake (exit 2)."""

    def __init__(self, message: str, *, config_problem: bool = False) -> None:
        super().__init__(message)
        self.config_problem = config_problem


def mesh_wants_cluster(config: Config) -> bool:
    """Run the coordinator: a node that answers joins is a cluster member from the start (a
    joiner may appear any time)."""
    return config.join.enabled


def wireguard_peers(
    members: list[AdmissionRecord],
    own_id: str,
    network: ipaddress.IPv4Network | None,
) -> dict[str, WireGuardPeer]:
    """The interface's peers for ``members`` (pure), by public key: every other member with a
    WireGuard identity whose tunnel address is a host of ``network`` (when known)."""
    peers: dict[str, WireGuardPeer] = {}
    for record in members:
        wg = record.wireguard
        if record.node_id == own_id or wg is None:
            continue
        address = ipaddress.IPv4Address(wg.tunnel_address)
        if network is not None and (
            address not in network
            or address in (network.network_address, network.broadcast_address)
        ):
            log.warning(
                "Not adding %s to WireGuard: tunnel address %s is outside %s",
                record.node_id,
                address,
                network,
            )
            continue
        try:
            peer = WireGuardPeer(wg.public_key_b64, wg.tunnel_address, wg.endpoint)
        except WireGuardError as exc:
            log.warning("Not adding %s to WireGuard: %s", record.node_id, exc)
            continue
        peers[peer.public_key] = peer
    return peers


class Mesh:
    """The ``[join]`` and ``[wireguard]`` parts of one running daemon (see the module doc)."""

    def __init__(
        self,
        config: Config,
        *,
        master_key: IdentityKey | None = None,
        netns: str | None = None,
    ) -> None:
        self.config = config
        self.master_key = master_key
        self.netns = netns
        self.interface: WireGuardInterface | None = None
        self.responder: JoinResponder | None = None
        self.coordinator: Coordinator[Any] | None = None
        self._lock = asyncio.Lock()
        self._members_changed = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"Mesh(wireguard={self.interface!r}, "
            f"joins={'on' if self.responder is not None else 'off'})"
        )

    @property
    def active(self) -> bool:
        return self.config.wireguard.enabled or self.config.join.enabled

    @property
    def network(self) -> ipaddress.IPv4Network | None:
        if self.config.join.tunnel_network is not None:
            return self.config.join.tunnel_network
        address = self.config.wireguard.address
        return address.network if address is not None else None

    async def start(self, coordinator: Coordinator[Any] | None) -> None:
        """WireGuard up with the members, responder built; the peers follow the coordinator's
        membership from now on (:meth:`members_changed`)."""
        self.coordinator = coordinator
        if coordinator is not None:
            coordinator.on_members = self.members_changed
        if not self.active:
            return
        if self.config.wireguard.enabled:
            await self._interface_up(self._private_key())
        if self.config.join.enabled:
            self.responder = self._responder()
            log.info(
                "Answering joins over the master onion (tunnel network %s, %d members)",
                self.network,
                len(coordinator.membership.members()) if coordinator is not None else 0,
            )

    def _private_key(self) -> str:
        path = self.config.wireguard.private_key_path
        if path is None:  # the parser requires it whenever the interface is managed
            raise MeshError("wireguard.private_key_path is not set", config_problem=True)
        try:
            return load_or_create_private_key(path)
        except (WireGuardError, OSError, UnicodeDecodeError) as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise MeshError(f"wireguard.private_key_path: {message}", config_problem=True) from None

    def _wanted_peers(self) -> dict[str, WireGuardPeer]:
        coordinator = self.coordinator
        if coordinator is None:
            return {}
        members = coordinator.membership.members()
        return wireguard_peers(members, self.config.node.id, self.network)

    async def _interface_up(self, private_key: str) -> None:
        wg = self.config.wireguard
        assert wg.address is not None  # the parser requires it when enabled
        try:
            interface = WireGuardInterface(
                wg.interface,
                private_key=private_key,
                listen_port=wg.listen_port,
                address=str(wg.address),
                peers=list(self._wanted_peers().values()),
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

    def _responder(self) -> JoinResponder:
        coordinator = self.coordinator
        key = self.master_key
        if key is None or coordinator is None:  # the parser and the daemon guarantee both
            raise MeshError("join needs the master key and the coordinator", config_problem=True)
        try:
            return JoinResponder(
                node_id=self.config.node.id,
                master_public=key.public_key,
                sign=key.sign,
                membership=lambda: coordinator.membership,
                tunnel_network=str(self.network),
            )
        except JoinError as exc:
            raise MeshError(f"join: {exc}", config_problem=True) from None

    def status(self) -> dict[str, Any]:
        """The ``mesh`` part of the status document (no secrets: ids, addresses, counts)."""
        wg = self.config.wireguard
        interface = self.interface
        coordinator = self.coordinator
        members = coordinator.membership.members() if coordinator is not None else []
        return {
            "joins_enabled": self.responder is not None,
            "joins_admitted": self.responder.admitted if self.responder is not None else 0,
            "tunnel_address": str(wg.address.ip) if wg.address is not None else None,
            "wireguard": (
                {
                    "interface": interface.ifname,
                    "mode": str(interface.mode),
                    "peers": len(interface.peers),
                }
                if interface is not None
                else None
            ),
            "peers": sorted(
                r.node_id
                for r in members
                if r.node_id != self.config.node.id and r.wireguard is not None
            ),
        }

    def interceptor(self) -> Interceptor:
        """The proxy hook answering every ``/.rb`` path (404 on a node that does not admit)."""
        return JoinInterceptor(self.responder, admit=self.admit)

    async def admit(self, statement: Statement) -> None:
        """An admitted joiner: the membership (saved, sent to every member), then WireGuard.
        Raises on failure (the interceptor then answers 500 and nothing was admitted)."""
        coordinator = self.coordinator
        if coordinator is None:
            raise MeshError("no coordinator to admit into")
        async with self._lock:
            coordinator.admit(statement)  # CoordinationError if the membership refuses it
            await coordinator.save_members()
            await self._sync_peers()
        content = statement.content
        if isinstance(content, AdmissionRecord):
            log.info(
                "Admitted node %s (key %s, coordination %s)",
                content.node_id,
                content.fingerprint,
                content.coordination,
            )

    def members_changed(self) -> None:
        """The coordinator's callback: the WireGuard peers follow at the watcher's next wake."""
        self._members_changed.set()

    async def _sync_peers(self) -> None:
        """Make the interface's peers the members' (add, update, remove)."""
        interface = self.interface
        if interface is None:
            return
        wanted = self._wanted_peers()
        current = {peer.public_key: peer for peer in interface.peers}
        for key in current.keys() - wanted.keys():
            await interface.remove_peer(key)
            log.info("WireGuard peer %s removed (no longer a member)", key)
        for key, peer in wanted.items():
            if current.get(key) != peer:
                if key in current:
                    await interface.remove_peer(key)
                try:
                    await interface.add_peer(peer)
                except WireGuardError as exc:
                    log.warning("Cannot add WireGuard peer for %s: %s", peer.tunnel_ip, exc)
                    continue
                log.info("WireGuard peer %s added (tunnel %s)", key, peer.tunnel_ip)

    async def watch_wireguard(self) -> None:
        """Supervised task: follow the membership, bring the interface back when it is gone."""
        interface = self.interface
        if interface is None:
            return
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._members_changed.wait(), WIREGUARD_WATCH_SECS)
            if self._members_changed.is_set():
                self._members_changed.clear()
                async with self._lock:
                    await self._sync_peers()
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
