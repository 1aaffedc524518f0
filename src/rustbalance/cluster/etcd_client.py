"""A small typed asyncio etcd v3 client over ``grpcio``, with TLS client certificates.

Only what the etcd coordination backend needs: read a prefix, put with a lease, the two
transactions of the election (create a key only if absent; check that a key still has the
create revision we gave it), delete, lease grant / keep-alive / revoke, and a watch on a
prefix. Every call has a deadline; every response becomes a frozen dataclass at once (the
protobuf classes of :mod:`rustbalance.cluster.etcd_proto` stay inside this module).

Endpoints: the client talks to one endpoint at a time and moves to the next one when a call
fails for a reason that another member may not have (unreachable, deadline, no leader, member
stopping). The channel of the failed endpoint is closed, which also ends a watch on it (its
owner re-lists and watches again, on the next endpoint): grpc cancels the calls of a closed
channel with :class:`asyncio.CancelledError`, which each call turns into
:class:`EtcdUnavailable` unless its own task is being cancelled. Rotation is keyed by a channel
generation, so several calls failing together move on once, not once each.

TLS: the CA, the client certificate and its key are read by the caller (files 0600) and given
as bytes; gRPC checks the member's certificate against the CA and the endpoint's host, and etcd
takes the user name for its RBAC from the client certificate's CN (``--client-cert-auth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import grpc.aio

from rustbalance.cluster.etcd_proto import (
    COMPARE_CREATE,
    COMPARE_EQUAL,
    EVENT_DELETE,
    METHODS,
    messages,
)
from rustbalance.errors import RustBalanceError

__all__ = [
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdLeaseLost",
    "EtcdPermissionDenied",
    "EtcdUnavailable",
    "KeyValue",
    "Lease",
    "TlsMaterial",
    "WatchBatch",
    "WatchEvent",
    "prefix_range_end",
]

log = logging.getLogger(__name__)

# gRPC keepalive pings find a silent (cut) connection under a long-lived watch. etcd refuses
# pings more often than its --grpc-keepalive-min-time (5 s by default) with GOAWAY, so stay
# above it.
_KEEPALIVE_TIME_MS = 10_000
_KEEPALIVE_TIMEOUT_MS = 5_000
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 0),
    # Fail a call at once while the endpoint cannot be reached, instead of queueing it.
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
)
# Our own bound on a call, beyond grpc's deadline (which a call on a closing channel can miss).
_DEADLINE_GRACE_SECS = 0.5
# What grpc raises for a call on a channel that was closed under it.
_CHANNEL_GONE = (grpc.aio.UsageError, asyncio.InvalidStateError)
# etcd's own messages for failures another member may not have (server/etcdserver/errors.go).
_TRANSIENT_MESSAGES = (
    "etcdserver: request timed out",
    "etcdserver: leader changed",
    "etcdserver: no leader",
    "etcdserver: server stopped",
    "etcdserver: not capable",
    "etcdserver: too many requests",
)


class EtcdError(RustBalanceError):
    """An etcd call failed; the message says how."""


class EtcdUnavailable(EtcdError):
    """No answer in time, or the member cannot serve now (no quorum, stopping): retry."""


class EtcdPermissionDenied(EtcdError):
    """etcd refused the client's identity or its role (certificate CN, RBAC)."""


class EtcdLeaseLost(EtcdError):
    """The lease is gone on the server (expired or revoked): grant a new one."""


class EtcdCompacted(EtcdError):
    """A watch asked for a revision etcd has compacted away: list again."""


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of the CA, this node's client certificate (chain) and its private key."""

    ca: bytes
    cert: bytes
    key: bytes

    def __repr__(self) -> str:  # never show the key
        return "TlsMaterial(<ca>, <cert>, <key>)"


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: the store revision it brings us to, and its events in order."""

    revision: int
    events: tuple[WatchEvent, ...]


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with ``prefix``" (the prefix plus one)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def _kv(message: Any) -> KeyValue:
    return KeyValue(
        key=bytes(message.key),
        value=bytes(message.value),
        create_revision=int(message.create_revision),
        mod_revision=int(message.mod_revision),
        lease=int(message.lease),
    )


def _identity(data: bytes) -> bytes:
    return data


def _cut_short(what: str) -> EtcdUnavailable | None:
    """A call ended by :class:`asyncio.CancelledError` that was not aimed at our task: grpc
    cancels the calls of a channel being closed (the client moved to another member). That is
    an unavailable endpoint to the caller, never a cancellation of its task (a TaskGroup would
    drop such a task silently). None: the task itself is being cancelled, let it go."""
    task = asyncio.current_task()
    if task is None or task.cancelling():
        return None
    return EtcdUnavailable(f"{what}: the call was cut short (the channel closed)")


def _translate(exc: grpc.aio.AioRpcError, what: str) -> EtcdError:
    code = exc.code()
    detail = exc.details() or ""
    text = f"{what}: {code.name.lower()}: {detail}"
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return EtcdPermissionDenied(text)
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in detail:
        return EtcdLeaseLost(text)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) or any(m in detail for m in _TRANSIENT_MESSAGES):
        return EtcdUnavailable(text)
    if "user name not found" in detail or "permission denied" in detail:
        return EtcdPermissionDenied(text)
    return EtcdError(text)


class EtcdClient:
    """See the module docstring. ``timeout`` bounds every unary call (seconds)."""

    def __init__(self, endpoints: Sequence[str], tls: TlsMaterial, *, timeout: float) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoints")
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
        )
        self._index = 0
        self._generation = 0
        self._channel: grpc.aio.Channel | None = None
        self._closed = False
        self.rotations = 0

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._index]

    def _current(self) -> tuple[grpc.aio.Channel, int]:
        if self._closed:
            raise EtcdError("client closed")
        if self._channel is None:
            self._channel = grpc.aio.secure_channel(
                self.endpoint, self._credentials, options=_CHANNEL_OPTIONS
            )
        return self._channel, self._generation

    def _failed(self, generation: int, error: EtcdError) -> None:
        """A call on channel ``generation`` failed: move to the next endpoint (once)."""
        if not isinstance(error, EtcdUnavailable) or generation != self._generation:
            return
        old = self._channel
        self._channel = None
        self._generation += 1
        self._index = (self._index + 1) % len(self.endpoints)
        self.rotations += 1
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.close(grace=None))
            task.add_done_callback(_ignore_result)
        log.debug("etcd: %s; next endpoint %s", error, self.endpoint)

    async def _unary(self, method: str, request: Any, response_type: Any) -> Any:
        channel, generation = self._current()
        call = channel.unary_unary(
            METHODS[method],
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        try:
            # grpc's own deadline, and ours on top: a call on a channel being closed can wait
            # for ever (seen under load after an endpoint rotation).
            async with asyncio.timeout(self.timeout + _DEADLINE_GRACE_SECS):
                raw = await call(request.SerializeToString(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            error = _translate(exc, f"{method} on {self.endpoint}")
            self._failed(generation, error)
            raise error from None
        except TimeoutError:
            error = EtcdUnavailable(f"{method} on {self.endpoint}: no answer in time")
            self._failed(generation, error)
            raise error from None
        except _CHANNEL_GONE:
            raise EtcdUnavailable(f"{method}: the channel closed under the call") from None
        except asyncio.CancelledError:
            if (cut := _cut_short(method)) is None:
                raise
            raise cut from None
        response = response_type()
        try:
            response.ParseFromString(raw)
        except Exception as exc:  # protobuf's DecodeError; never let it escape untyped
            raise EtcdError(f"{method}: undecodable response: {exc}") from None
        return response

    async def close(self) -> None:
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(grace=None)

    # -- KV -----------------------------------------------------------------------------

    async def get_prefix(self, prefix: bytes) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` (linearizable) and the store revision of that view."""
        m = messages()
        request = m.RangeRequest(key=prefix, range_end=prefix_range_end(prefix))
        response = await self._unary("Range", request, m.RangeResponse)
        return int(response.header.revision), [_kv(kv) for kv in response.kvs]

    async def put(self, key: bytes, value: bytes, lease: int) -> int:
        """Write ``key`` attached to ``lease``; returns the revision of the write."""
        m = messages()
        response = await self._unary(
            "Put", m.PutRequest(key=key, value=value, lease=lease), m.PutResponse
        )
        return int(response.header.revision)

    async def delete(self, key: bytes) -> int:
        m = messages()
        response = await self._unary(
            "DeleteRange", m.DeleteRangeRequest(key=key), m.DeleteRangeResponse
        )
        return int(response.header.revision)

    async def create(self, key: bytes, value: bytes, lease: int) -> int | None:
        """Put ``key`` only if it does not exist (``create_revision == 0``), in one txn.

        Returns the new key's create revision, or None when the key already existed.
        """
        m = messages()
        compare = m.Compare(result=COMPARE_EQUAL, target=COMPARE_CREATE, key=key, create_revision=0)
        put = m.RequestOp(request_put=m.PutRequest(key=key, value=value, lease=lease))
        request = m.TxnRequest(compare=[compare], success=[put])
        response = await self._unary("Txn", request, m.TxnResponse)
        if not response.succeeded:
            return None
        return int(response.header.revision)

    async def still_created_at(self, key: bytes, create_revision: int) -> bool:
        """One linearizable txn: does ``key`` exist with exactly this create revision?

        The fencing check of the publisher: a key re-created by someone else, or gone with an
        expired lease, has another create revision (or 0).
        """
        m = messages()
        compare = m.Compare(
            result=COMPARE_EQUAL,
            target=COMPARE_CREATE,
            key=key,
            create_revision=create_revision,
        )
        response = await self._unary("Txn", m.TxnRequest(compare=[compare]), m.TxnResponse)
        return bool(response.succeeded)

    # -- leases ---------------------------------------------------------------------------

    async def grant(self, ttl: int) -> Lease:
        m = messages()
        response = await self._unary(
            "LeaseGrant", m.LeaseGrantRequest(TTL=ttl), m.LeaseGrantResponse
        )
        if response.error:
            raise EtcdError(f"LeaseGrant: {response.error}")
        return Lease(int(response.ID), int(response.TTL))

    async def revoke(self, lease_id: int) -> None:
        m = messages()
        await self._unary("LeaseRevoke", m.LeaseRevokeRequest(ID=lease_id), m.LeaseRevokeResponse)

    async def keep_alive(self, lease_id: int) -> int:
        """One keep-alive round trip; returns the TTL etcd granted again.

        Raises :class:`EtcdLeaseLost` when etcd answers TTL <= 0 (the lease expired or was
        revoked), :class:`EtcdUnavailable` when no answer came within the timeout.
        """
        m = messages()
        channel, generation = self._current()
        call = channel.stream_stream(
            METHODS["LeaseKeepAlive"],
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        request = m.LeaseKeepAliveRequest(ID=lease_id).SerializeToString()
        stream = call(timeout=self.timeout)
        try:
            # Bounded by us too: a write on a channel being closed can wait for ever (seen
            # under load: the lease keeper hung, and the node's lease ran out).
            async with asyncio.timeout(self.timeout + _DEADLINE_GRACE_SECS):
                await stream.write(request)
                raw = await stream.read()
        except grpc.aio.AioRpcError as exc:
            error = _translate(exc, f"LeaseKeepAlive on {self.endpoint}")
            self._failed(generation, error)
            raise error from None
        except TimeoutError:
            error = EtcdUnavailable(f"LeaseKeepAlive on {self.endpoint}: no answer in time")
            self._failed(generation, error)
            raise error from None
        except _CHANNEL_GONE:
            raise EtcdUnavailable("LeaseKeepAlive: the channel closed under the call") from None
        except asyncio.CancelledError:
            if (cut := _cut_short("LeaseKeepAlive")) is None:
                raise
            raise cut from None
        finally:
            stream.cancel()
        if raw is grpc.aio.EOF:
            error = EtcdUnavailable(f"LeaseKeepAlive on {self.endpoint}: stream ended")
            self._failed(generation, error)
            raise error
        response = m.LeaseKeepAliveResponse()
        try:
            response.ParseFromString(raw)
        except Exception as exc:
            raise EtcdError(f"LeaseKeepAlive: undecodable response: {exc}") from None
        if response.TTL <= 0:
            raise EtcdLeaseLost(f"lease {lease_id:x} expired or was revoked")
        return int(response.TTL)

    # -- watch ----------------------------------------------------------------------------

    async def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Every change under ``prefix`` from ``start_revision`` on, batch by batch.

        Ends by raising: :class:`EtcdCompacted` when the revision is gone (list again),
        :class:`EtcdUnavailable` when the stream broke (the endpoint rotates), another
        :class:`EtcdError` when etcd cancelled the watch.
        """
        m = messages()
        channel, generation = self._current()
        call = channel.stream_stream(
            METHODS["Watch"],
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        create = m.WatchRequest(
            create_request=m.WatchCreateRequest(
                key=prefix,
                range_end=prefix_range_end(prefix),
                start_revision=start_revision,
                progress_notify=True,
            )
        )
        stream = call()
        try:
            await asyncio.wait_for(stream.write(create.SerializeToString()), self.timeout)
            created = False
            while True:
                if created:
                    raw = await stream.read()
                else:
                    # The "created" answer comes at once from a healthy member.
                    raw = await asyncio.wait_for(stream.read(), self.timeout)
                if raw is grpc.aio.EOF:
                    raise EtcdUnavailable(f"Watch on {self.endpoint}: stream ended")
                response = m.WatchResponse()
                try:
                    response.ParseFromString(raw)
                except Exception as exc:
                    raise EtcdError(f"Watch: undecodable response: {exc}") from None
                if response.created:
                    created = True
                if response.compact_revision:
                    raise EtcdCompacted(
                        f"Watch: revision {start_revision} compacted "
                        f"(oldest {response.compact_revision})"
                    )
                if response.canceled:
                    reason = response.cancel_reason or "cancelled by etcd"
                    error = _translate_reason(reason)
                    raise error
                events = tuple(
                    WatchEvent("delete" if e.type == EVENT_DELETE else "put", _kv(e.kv))
                    for e in response.events
                )
                yield WatchBatch(int(response.header.revision), events)
        except TimeoutError:
            error = EtcdUnavailable(f"Watch on {self.endpoint}: no answer in {self.timeout:g} s")
            self._failed(generation, error)
            raise error from None
        except grpc.aio.AioRpcError as exc:
            error = _translate(exc, f"Watch on {self.endpoint}")
            self._failed(generation, error)
            raise error from None
        except EtcdUnavailable as error:
            self._failed(generation, error)
            raise
        except _CHANNEL_GONE:
            raise EtcdUnavailable("Watch: the channel closed under the call") from None
        except asyncio.CancelledError:
            if (cut := _cut_short("Watch")) is None:
                raise
            raise cut from None
        finally:
            stream.cancel()


def _translate_reason(reason: str) -> EtcdError:
    if "permission denied" in reason:
        return EtcdPermissionDenied(f"Watch: {reason}")
    return EtcdError(f"Watch cancelled: {reason}")


def _ignore_result(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(BaseException):
        task.result()
