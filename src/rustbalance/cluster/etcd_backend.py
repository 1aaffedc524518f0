"""The etcd coordination backend: the asyncio shell around :mod:`~rustbalance.cluster.etcd_state`.

:class:`EtcdBackend` offers the node the same surface as the embedded coordinator's adapter
(``node/coordination.py``'s ``Coordination`` protocol): :meth:`facts`, :meth:`status`,
:meth:`report_intro_points`, :meth:`report_publish`, :meth:`set_eligible`,
:meth:`clear_changed` / :meth:`wait_changed`, :meth:`run` (the supervised task) and
:meth:`leave` (SIGTERM), plus the fencing check :meth:`may_publish` that the publisher awaits
immediately before every upload.

:meth:`run` holds three tasks in one TaskGroup, each bounded by the client's call deadline:

- the **lease keeper** grants this node's lease and keeps it alive every ``TTL / 3`` (a failed
  keep-alive is retried at once on the next member); when etcd says the lease is gone it grants
  a new one, and everything on the old lease is written again;
- the **watcher** lists the prefix, then watches it from the next revision: every change of any
  node's record or candidacy arrives as an event (no polling); a broken stream or a compacted
  revision means listing again;
- the **writer** performs what :meth:`EtcdMembership.decide` asks for, one step at a time: our
  member record (when it changed, or on a new lease), our candidacy (create-if-absent), a stale
  candidacy of an earlier lease, a resignation.

Every result goes back into the pure core and :meth:`_evaluate` fires :attr:`changed` when what
the node should do changed (publisher or not, peers, their intro points). The lease keeper
also wakes at the lease's local deadline, so a cut-off publisher reports the step-down at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from rustbalance.cluster.etcd_client import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdLeaseLost,
    EtcdPermissionDenied,
    TlsMaterial,
)
from rustbalance.cluster.etcd_state import (
    EtcdDecision,
    EtcdKeys,
    EtcdMembership,
    LeaseTimings,
    encode_record,
)
from rustbalance.config.schema import Config, EtcdConfig
from rustbalance.errors import ConfigError

__all__ = [
    "EtcdBackend",
    "EtcdCounters",
    "EtcdFacts",
    "EtcdStatus",
    "load_tls",
    "tls_problems",
]

log = logging.getLogger(__name__)

PointT = TypeVar("PointT")

_MAX_PEM_BYTES = 64 * 1024
# After a failed call, before the next attempt (the client has moved to the next member).
_RETRY_SECS = 0.2
_MAX_RETRY_SECS = 2.0
_WRITE_PAUSE_SECS = 0.05
# A kind of call that keeps failing is logged again after this long.
_ERROR_LOG_REPEAT_SECS = 60.0


def _read_pem(path: Path, what: str, *, private: bool) -> bytes:
    """Read a PEM file without following a symlink; a private key must be 0600 (or stricter)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"etcd {what} {path}: cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if private and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"etcd {what} {path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read "
                f"it; run: chmod 600 {path}"
            )
        data = os.read(fd, _MAX_PEM_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_PEM_BYTES:
        raise ConfigError(f"etcd {what} {path}: longer than {_MAX_PEM_BYTES} bytes")
    if b"-----BEGIN " not in data:
        raise ConfigError(f"etcd {what} {path}: not a PEM file")
    return data


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode(errors="replace")


def _check_certificates(path: Path, data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError):
        raise ConfigError(f"etcd {what} {path}: not a PEM certificate") from None


def _check_pair(cert_path: Path, cert: bytes, key_path: Path, key: bytes) -> None:
    """The key must be an unencrypted private key whose public half is the certificate's
    (else the TLS handshake fails later with a vaguer error). Never quotes the key."""
    certificate = _check_certificates(cert_path, cert, "client certificate")
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"etcd client key {key_path}: not an unencrypted PEM private key"
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, public) != certificate.public_key().public_bytes(
        der, public
    ):
        raise ConfigError(
            f"etcd client key {key_path}: does not belong to the certificate {cert_path} "
            f"(CN {_common_name(certificate)})"
        )


def _read_tls(settings: EtcdConfig, problems: list[str]) -> TlsMaterial | None:
    if settings.ca_path is None or settings.cert_path is None or settings.key_path is None:
        problems.append("etcd: ca_path, cert_path and key_path are required")
        return None
    read: dict[str, bytes] = {}
    files = (
        ("ca", settings.ca_path, "CA", False),
        ("cert", settings.cert_path, "client certificate", False),
        ("key", settings.key_path, "client key", True),
    )
    for name, path, what, private in files:
        try:
            read[name] = _read_pem(path, what, private=private)
            if name == "ca":
                _check_certificates(path, read[name], what)
        except ConfigError as exc:
            problems.append(str(exc))
    if "cert" in read and "key" in read:
        try:
            _check_pair(settings.cert_path, read["cert"], settings.key_path, read["key"])
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        return None
    return TlsMaterial(ca=read["ca"], cert=read["cert"], key=read["key"])


def tls_problems(settings: EtcdConfig) -> list[str]:
    """Every problem of the three TLS files, one message each (``rustbalance config check``)."""
    problems: list[str] = []
    _read_tls(settings, problems)
    return problems


def load_tls(settings: EtcdConfig) -> TlsMaterial:
    """The CA, client certificate and key named by ``[etcd]``: PEM files, the key 0600 (no
    symlink followed) and the certificate's own; ConfigError naming the first bad file."""
    problems: list[str] = []
    material = _read_tls(settings, problems)
    if material is None:
        raise ConfigError(problems[0])
    return material


@dataclass(frozen=True)
class EtcdFacts(Generic[PointT]):
    """What the cluster-mode state machine and the publisher observe (as ``CoordinationFacts``).

    ``holds_lease`` is the whole answer: the node never publishes alone (the daemon's
    ``ModePolicy.lease_only``). Being alone is etcd's call (the only node registered holds
    the election), and a node cut off from etcd hears no peer either.
    """

    is_multi: bool
    holds_lease: bool
    peer_intro_points: Mapping[str, tuple[PointT, ...]]


@dataclass(frozen=True)
class EtcdStatus:
    """The ``cluster`` part of ``status`` and the metrics, shaped like the embedded one's."""

    term: int  # create revision of the publisher's candidacy (grows with every new publisher)
    election_role: str  # "publisher" or "standby"
    publisher: str | None
    counters: Mapping[str, int]
    rejected: Mapping[str, int]
    peer_intro_points: Mapping[str, int]
    live_peers: tuple[str, ...]
    known_peers: tuple[str, ...]
    endpoint: str
    connected: bool  # our lease is valid: etcd answered within the TTL
    registered: bool  # and our member record is written on it (others see us)
    last_error: str | None


@dataclass
class EtcdCounters:
    lease_grants: int = 0
    leases_lost: int = 0
    keepalives: int = 0
    keepalive_failures: int = 0
    watch_restarts: int = 0
    watch_events: int = 0
    records_written: int = 0
    campaigns: int = 0
    resignations: int = 0
    fencing_passed: int = 0
    fencing_refused: int = 0  # the txn ran and said we no longer hold the candidacy
    fencing_failed: int = 0  # no answer (cut off, no quorum): not allowed to publish
    role_changes: int = 0
    write_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class EtcdBackend(Generic[PointT]):
    """One node's membership in an etcd-coordinated cluster; see the module docstring."""

    def __init__(
        self,
        *,
        node_id: str,
        priority: int,
        publisher_eligible: bool,
        client: EtcdClient,
        keys: EtcdKeys,
        timings: LeaseTimings,
        encode_intro_point: Callable[[PointT], bytes],
        decode_intro_point: Callable[[bytes], PointT],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.priority = priority
        self._configured_eligible = publisher_eligible
        self._eligible = publisher_eligible
        self.client = client
        self.keys = keys
        self.timings = timings
        self._encode = encode_intro_point
        self._monotonic = monotonic
        self.membership: EtcdMembership[PointT] = EtcdMembership(
            keys, node_id, timings, decode_intro_point
        )
        self.counters = EtcdCounters()
        self.changed = asyncio.Event()
        # kind of call -> (its last error, when that kind was last logged)
        self._errors: dict[str, tuple[str, float]] = {}
        self._work = asyncio.Event()
        self._lease_event = asyncio.Event()  # wakes the lease keeper (a lease was lost)
        self._own_points: tuple[bytes, ...] = ()
        self._last_publish: int | None = None
        self._leaving = False
        self._last: tuple[bool, str | None, object] | None = None
        self._update_record()

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        encode_intro_point: Callable[[PointT], bytes],
        decode_intro_point: Callable[[bytes], PointT],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> EtcdBackend[PointT]:
        """Build from ``[node]`` and ``[etcd]``; ConfigError for an unreadable or exposed file."""
        settings = config.etcd
        timings = LeaseTimings(settings.lease_ttl_secs)
        client = EtcdClient(
            [str(e) for e in settings.endpoints], load_tls(settings), timeout=timings.rpc_timeout
        )
        return cls(
            node_id=config.node.id,
            priority=config.node.priority,
            publisher_eligible=config.node.publisher_eligible,
            client=client,
            keys=EtcdKeys(settings.prefix),
            timings=timings,
            encode_intro_point=encode_intro_point,
            decode_intro_point=decode_intro_point,
            monotonic=monotonic,
        )

    def __repr__(self) -> str:
        return f"EtcdBackend({self.node_id!r}, {self.client.endpoints!r})"

    # -- what the node reads ----------------------------------------------------------------

    def decision(self) -> EtcdDecision:
        return self.membership.decide(self._monotonic(), self._eligible)

    @property
    def is_publisher(self) -> bool:
        return self.decision().holds_lease

    def facts(self) -> EtcdFacts[PointT]:
        peers = self.membership.live_peers()
        return EtcdFacts(
            is_multi=bool(peers),
            holds_lease=self.decision().holds_lease,
            peer_intro_points={
                node_id: r.intro_points for node_id, r in sorted(peers.items()) if r.intro_points
            },
        )

    def peer_intro_points(self) -> dict[str, tuple[PointT, ...]]:
        return dict(self.facts().peer_intro_points)

    def status(self) -> EtcdStatus:
        decision = self.decision()
        membership = self.membership
        peers = membership.live_peers()
        publisher = decision.publisher
        term = 0
        if publisher is not None and publisher in membership.candidates:
            term = membership.candidates[publisher].create_revision
        return EtcdStatus(
            term=term,
            election_role="publisher" if decision.holds_lease else "standby",
            publisher=publisher,
            counters={**self.counters.as_dict(), "endpoint_rotations": self.client.rotations},
            rejected=dict(membership.rejected),
            peer_intro_points={node_id: len(r.intro_points) for node_id, r in peers.items()},
            live_peers=tuple(sorted(peers)),
            known_peers=tuple(sorted(peers)),
            endpoint=self.client.endpoint,
            connected=decision.lease_valid,
            registered=decision.lease_valid and membership.written_record is not None,
            last_error=self.last_error,
        )

    # -- what the node tells us ---------------------------------------------------------------

    def report_intro_points(self, points: Iterable[PointT]) -> None:
        encoded = tuple(self._encode(p) for p in points)
        if encoded != self._own_points:
            self._own_points = encoded
            self._update_record()

    def report_publish(self, unix_time: int) -> None:
        self._last_publish = unix_time
        self._update_record()

    def set_eligible(self, eligible: bool) -> None:
        eligible = eligible and self._configured_eligible
        if eligible != self._eligible:
            self._eligible = eligible
            self._update_record()

    def clear_changed(self) -> None:
        self.changed.clear()

    async def wait_changed(self, timeout: float) -> None:  # noqa: ASYNC109
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)

    def _update_record(self) -> None:
        self.membership.desired_record = encode_record(
            self.node_id, self.priority, self._eligible, self._last_publish, self._own_points
        )
        self._evaluate()

    # -- the fencing check --------------------------------------------------------------------

    async def may_publish(self) -> bool:
        """True only if etcd confirms, now, that our candidacy is still the one we created and
        it is the oldest (we are the publisher) and our lease is valid. Called by the publisher
        immediately before every upload; any doubt (no answer, no quorum) is a no."""
        decision = self.decision()
        revision = self.membership.campaign_revision
        if not decision.holds_lease or revision is None:
            self.counters.fencing_refused += 1
            return False
        try:
            held = await self.client.still_created_at(self.keys.election(self.node_id), revision)
        except EtcdError as exc:
            self.counters.fencing_failed += 1
            log.warning("etcd: cannot confirm the publisher lease, not publishing: %s", exc)
            return False
        if not held:
            self.counters.fencing_refused += 1
            log.warning("etcd: our candidacy is gone or replaced: not the publisher any more")
            return False
        if not self.decision().holds_lease:  # the lease ran out while we asked
            self.counters.fencing_failed += 1
            return False
        self.counters.fencing_passed += 1
        return True

    # -- the tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        """The supervised task: lease keeper, watcher and writer until cancelled. It may be
        started again after a failure (the supervisor restarts it): the client stays open
        until :meth:`leave`, and the lease and view carry over."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._guarded("lease", self._keep_lease), name="etcd-lease")
            group.create_task(self._guarded("watch", self._watch), name="etcd-watch")
            group.create_task(self._guarded("write", self._write), name="etcd-write")

    async def _guarded(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        """Run one of :meth:`run`'s tasks; one that ends before :meth:`leave`, or is cancelled
        by anything but its group, fails the whole run (the supervisor logs and restarts it)
        instead of leaving the node with a dead watcher or lease keeper: a TaskGroup drops a
        child that was cancelled from within without a word."""
        try:
            await step()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._leaving or task is None or task.cancelling():
                raise
            raise RuntimeError(f"etcd {name} task was cancelled from within") from None
        if not self._leaving:
            raise RuntimeError(f"etcd {name} task ended")

    async def leave(self) -> None:
        """SIGTERM: revoke the lease, which deletes our record and candidacy at once, so the
        next candidate takes over without waiting for the TTL; then close the client. Bounded
        by the call deadline. The node publishes nothing from here on (no lease)."""
        self._leaving = True
        self._work.set()  # the writer sees _leaving and ends
        self._lease_event.set()  # so does the lease keeper
        lease = self.membership.lease_id
        was_publisher = self.decision().holds_lease
        self.membership.lease_lost()
        self._evaluate()
        try:
            if lease is None:
                return
            try:
                await self.client.revoke(lease)
            except EtcdError as exc:
                log.warning(
                    "etcd: could not revoke our lease (it expires within %d s): %s",
                    self.timings.ttl,
                    exc,
                )
                return
            log.info(
                "etcd: lease revoked%s", " (publisher lease released)" if was_publisher else ""
            )
        finally:
            await self.client.close()

    async def _keep_lease(self) -> None:
        failures = 0
        while not self._leaving:
            membership = self.membership
            if membership.lease_id is None:
                sent = self._monotonic()
                try:
                    lease = await self.client.grant(self.timings.ttl)
                except EtcdError as exc:
                    failures += 1
                    self._failed("lease", "lease grant", exc)
                    await asyncio.sleep(_backoff(failures))
                    continue
                if self._leaving:
                    with contextlib.suppress(EtcdError):
                        await self.client.revoke(lease.id)
                    return
                failures = 0
                self.counters.lease_grants += 1
                membership.lease_granted(lease.id, lease.ttl, sent)
                log.info("etcd: lease %x granted (TTL %d s)", lease.id, lease.ttl)
                self._ok("lease")
                self._evaluate()
                continue
            lease_id = membership.lease_id
            await self._sleep_until_due(failures)
            if self._leaving or membership.lease_id != lease_id:
                continue
            sent = self._monotonic()
            try:
                granted = await self.client.keep_alive(lease_id)
            except EtcdLeaseLost as exc:
                self.counters.leases_lost += 1
                log.warning("etcd: %s; starting over with a new lease", exc)
                if membership.lease_id == lease_id:
                    membership.lease_lost()
                self._evaluate()
                continue
            except EtcdError as exc:
                failures += 1
                self.counters.keepalive_failures += 1
                self._failed("lease", "keep-alive", exc)
                self._evaluate()  # the local deadline may have passed: step down now
                continue
            failures = 0
            self.counters.keepalives += 1
            membership.lease_renewed(granted, sent)
            self._ok("lease")
            self._evaluate()

    async def _sleep_until_due(self, failures: int) -> None:
        """Until the next keep-alive is due (at once after a failure, with a short backoff),
        waking at the lease's local deadline to report a step-down without delay."""
        now = self._monotonic()
        delay = _backoff(failures) if failures else self.timings.keepalive_interval
        deadline = self.membership.lease_deadline
        if now < deadline < now + delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lease_event.wait(), deadline - now)
            self._lease_event.clear()
            self._evaluate()
            delay = max(0.0, delay - (self._monotonic() - now))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lease_event.wait(), delay)
        self._lease_event.clear()

    async def _watch(self) -> None:
        failures = 0
        prefix = self.keys.prefix_bytes
        while not self._leaving:
            try:
                revision, kvs = await self.client.get_prefix(prefix)
                self.membership.reset(revision, kvs)
                self._ok("watch")
                self._evaluate(force=True)
                failures = 0
                async for batch in self.client.watch_prefix(prefix, revision + 1):
                    self.counters.watch_events += len(batch.events)
                    self.membership.apply(batch)
                    self._evaluate()
                    failures = 0
            except EtcdCompacted as exc:
                log.info("etcd: %s; listing again", exc)
            except EtcdError as exc:
                failures += 1
                self.counters.watch_restarts += 1
                self._failed("watch", "watch", exc)
                await asyncio.sleep(_backoff(failures))

    async def _write(self) -> None:
        failures = 0
        while True:
            await self._work.wait()
            self._work.clear()
            if self._leaving:
                return
            membership = self.membership
            decision = self.decision()
            lease = membership.lease_id
            if lease is None or not decision.lease_valid:
                continue
            try:
                if decision.clear_stale:
                    await self.client.delete(self.keys.election(self.node_id))
                    membership.stale_cleared()
                    log.info("etcd: removed our candidacy left on an earlier lease")
                elif decision.resign:
                    await self.client.delete(self.keys.election(self.node_id))
                    membership.resigned()
                    self.counters.resignations += 1
                    log.info("etcd: not eligible any more: candidacy withdrawn")
                if decision.register and membership.desired_record is not None:
                    value = membership.desired_record
                    revision = await self.client.put(self.keys.node(self.node_id), value, lease)
                    membership.record_written(value, revision)
                    self.counters.records_written += 1
                decision = self.decision()
                if decision.campaign and membership.lease_id == lease:
                    created = await self.client.create(
                        self.keys.election(self.node_id), self.node_id.encode(), lease
                    )
                    membership.campaigned(created)
                    self.counters.campaigns += 1
                    if created is not None:
                        log.info("etcd: candidacy created at revision %d", created)
            except EtcdLeaseLost as exc:
                self.counters.leases_lost += 1
                log.warning("etcd: %s; starting over with a new lease", exc)
                if membership.lease_id == lease:
                    membership.lease_lost()
                self._lease_event.set()
            except EtcdError as exc:
                failures += 1
                self.counters.write_failures += 1
                self._failed("write", "write", exc)
                await asyncio.sleep(_backoff(failures))
            else:
                failures = 0
                self._ok("write")
            self._evaluate()
            if self._work.is_set():
                # More to write at once (e.g. a campaign after registering, or a create that
                # found an older candidacy the watch has not shown yet): a short pause keeps a
                # step that cannot progress yet from hammering etcd.
                await asyncio.sleep(_WRITE_PAUSE_SECS)

    # -- change detection ---------------------------------------------------------------------

    def _evaluate(self, *, force: bool = False) -> None:
        """Fire :attr:`changed` when the role, the publisher or the peers changed; hand work to
        the writer when the decision asks for a write."""
        decision = self.decision()
        peers = self.membership.live_peers()
        snapshot = (
            decision.holds_lease,
            decision.publisher,
            tuple(sorted((n, r.intro_points) for n, r in peers.items())),
        )
        previous = self._last
        if previous is None or snapshot != previous:
            if previous is not None and previous[0] != snapshot[0]:
                self.counters.role_changes += 1
                log.info(
                    "etcd: %s (publisher: %s)",
                    "we hold the publisher lease" if decision.holds_lease else "standby",
                    decision.publisher or "none",
                )
            self._last = snapshot
            self.changed.set()
        if (
            force
            or decision.register
            or decision.campaign
            or decision.clear_stale
            or (decision.resign)
        ):
            self._work.set()

    def _failed(self, kind: str, what: str, exc: EtcdError) -> None:
        """A call of ``kind`` (lease, watch, write) failed: :attr:`last_error` says so at once;
        the log says so once per kind until it works again (or a minute passed), not at
        every retry, also while several kinds fail in turn."""
        if self._leaving:
            return  # the client is closing: the calls it cut short are no news
        message = f"{what}: {exc}"
        if isinstance(exc, EtcdPermissionDenied):
            message += (
                f" (the client certificate's CN must be an etcd user whose role may read "
                f"{self.keys.prefix} and write {self.keys.prefix}nodes/{self.node_id} and "
                f"{self.keys.prefix}election/{self.node_id}; docs/etcd.md)"
            )
        now = self._monotonic()
        previous = self._errors.pop(kind, None)
        logged_at = previous[1] if previous is not None else -math.inf
        if now - logged_at >= _ERROR_LOG_REPEAT_SECS:
            level = logging.ERROR if isinstance(exc, EtcdPermissionDenied) else logging.WARNING
            log.log(level, "etcd: %s", message)
            logged_at = now
        self._errors[kind] = (message, logged_at)  # last in = the latest error

    def _ok(self, kind: str) -> None:
        if self._errors.pop(kind, None) is not None:
            log.info("etcd: %s works again (%s)", kind, self.client.endpoint)

    @property
    def last_error(self) -> str | None:
        """The latest error of a kind of call that has not worked since (None: all work)."""
        if not self._errors:
            return None
        return next(reversed(self._errors.values()))[0]


def _backoff(failures: int) -> float:
    return float(min(_MAX_RETRY_SECS, _RETRY_SECS * 2.0 ** max(0, failures - 1)))
