"""Joining a cluster over the master onion (system.md §11.1, W3, W4, W9; issue 16).

A new node holds a join token (:mod:`rustbalance.deploy.join_token`): the master address, a
*join grant* signed with the master key (:class:`~rustbalance.cluster.authority.JoinGrant`:
expiry, number of uses, whether the token carries the master key) and the grant's secret. It
POSTs ``/.rb/join`` through Tor to the master address; whichever node's proxy receives the
request answers it itself (the proxy's interceptor hook), the target never sees it. A node that
holds the master key (``[join] enabled``) checks the grant and admits the joiner by signing its
admission record; every other node answers 404, and the joiner simply tries again on a fresh
circuit (tor picks another intro point, so another node).

Why it looks like this:

- **The responder enforces the grant.** Expiry (its own clock), the join policy ("rotate the
  join secret" voids older grants) and the use count (counted over the whole membership:
  every admission record names its grant, and counts are kept until the grant expires) are all
  checked before anything is answered; a repeat from a node already admitted with the grant is
  answered again and uses nothing.
- **No oracle.** Every refusal before the grant and its secret check out (no grant, forged,
  wrong secret, expired, used up, voided, stale ``request_time``, rate limit, a node that
  does not admit) is the same 404 with the same body. Only a holder of a valid grant can see a
  400 (malformed request) or a 409 (node id / key conflict).
- **Nothing before admission.** The answer - the joiner's signed record and every statement of
  the membership, with the members' WireGuard endpoints - exists only for an admitted joiner.
- **Bounded.** Admissions are bounded by the grants (each one at most its use count), by
  ``max_joins`` per ``window_secs`` on each responder, by the membership's size and by the
  tunnel network; none of these can be used up by anyone without a valid grant. A revoked
  node's tunnel address is free again.
- **The joiner checks the answer**: every statement against the master key, its own record
  against its request, every tunnel address inside the tunnel network (once each).
- **Every node answers ``/.rb``**, joins on or off: the request target is normalised first
  (absolute form, percent-encoding, backslashes, repeated slashes, dot segments, ``;params``,
  case), so no spelling of the path reaches the target with a grant secret in it.

Pure core: :func:`join_route`, :class:`JoinResponder` (``now`` passed in, randomness
injected). Asyncio shells: :class:`JoinInterceptor` (responder side) and :func:`join_via_onion`
(joiner side). Nothing here logs a secret.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import h11
from python_socks import ProxyError as SocksProxyError
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy as SocksProxy

from rustbalance.cluster.authority import (
    AdmissionRecord,
    JoinGrant,
    Signer,
    Statement,
    WireGuardIdentity,
    decode_statement,
    grant_secret_hash,
)
from rustbalance.cluster.identity import NodeKey, check_node_public_key, verify_signature
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.wire import CoordinationError, check_node_id, check_peer_address
from rustbalance.crypto.onion_address import ONION_SUFFIX, decode_onion_address
from rustbalance.errors import ConfigError, InvalidKeyError, RustBalanceError
from rustbalance.proxy.http import InterceptedRequest, InterceptedResponse
from rustbalance.rules import parse_tunnel_network

__all__ = [
    "DEFAULT_JOIN_ATTEMPTS",
    "DEFAULT_TUNNEL_NETWORK",
    "JOIN_PATH",
    "MAX_BODY_BYTES",
    "JoinAnswer",
    "JoinDecision",
    "JoinError",
    "JoinInterceptor",
    "JoinRequest",
    "JoinResponder",
    "join_route",
    "join_via_onion",
    "parse_join_answer",
    "parse_join_request",
]

log = logging.getLogger("rustbalance.join")

JOIN_PATH = "/.rb/join"
_RB_SEGMENT = ".rb"
PROTOCOL_VERSION = 2
MAX_BODY_BYTES = 8192
# An answer holds every statement of the membership (at most ~1 KiB each); 1 MiB is ample.
MAX_ANSWER_BYTES = 1024 * 1024
DEFAULT_TUNNEL_NETWORK = "10.99.0.0/24"
DEFAULT_MAX_JOINS = 5
DEFAULT_WINDOW_SECS = 300.0
MAX_REQUEST_AGE_SECS = 300
MAX_REQUEST_AHEAD_SECS = 60
# With n nodes of which k admit, each attempt reaches an admitting node with probability of
# about k/n (tor picks a random intro point of the merged descriptor): 12 attempts miss one
# key holder among three nodes with probability (2/3)^12 < 1 %.
DEFAULT_JOIN_ATTEMPTS = 12
DEFAULT_JOIN_INTERVAL_SECS = 5.0
_REQUEST_DOMAIN = b"rustbalance join request v2\x00"
_SECRET_BYTES = 32
# Decoding %25 (an encoded "%") again is what double-decoding servers do; three rounds undo
# any encoding a path could survive, and bound the work.
_DECODE_ROUNDS = 3

_JSON_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))
# One body for every refusal before the grant checks out: identical bytes, nothing to tell apart.
_NOT_FOUND = b'{"error":"not found"}'


class JoinError(RustBalanceError):
    """A join failed; the message never contains a secret."""


class _BadRequest(JoinError):
    """A malformed value (the responder answers 400); the message is safe to send back."""


# --- the request target ---------------------------------------------------------------------


def join_route(target: str) -> str | None:
    """The normalised path of a request target whose first segment is ``.rb``, else None.

    What any target server might make of the target is undone first: the scheme and authority
    of the absolute form, query and fragment, percent-encoding (repeatedly: ``%252e`` is a dot
    to a double-decoding server), backslashes (a slash to some servers), empty and ``.``
    segments, ``..`` (removes the segment before it), ``;params`` on a segment, letter case,
    and trailing dots and spaces of a segment (Windows ignores them).
    """
    text = target
    lowered = text.lower()
    scheme_end = lowered.find("://")
    if scheme_end > 0 and lowered[:scheme_end].isalpha():
        rest = text[scheme_end + 3 :]
        slash = rest.find("/")
        text = rest[slash:] if slash >= 0 else "/"
    for mark in ("?", "#"):
        text = text.split(mark, 1)[0]
    for _ in range(_DECODE_ROUNDS):
        decoded = urllib.parse.unquote(text, errors="replace")
        if decoded == text:
            break
        text = decoded
    segments: list[str] = []
    for raw in text.replace("\\", "/").split("/"):
        segment = raw.split(";", 1)[0].rstrip(". ") if raw not in (".", "..") else raw
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment.lower())
    if not segments or segments[0] != _RB_SEGMENT:
        return None
    return "/" + "/".join(segments)


def _may_be_ours(target: bytes) -> bool:
    """The proxy's cheap pre-filter: no false negatives (:func:`join_route` decides). Without a
    '%' or a backslash, a target can only normalise to ``.rb`` if it spells ``.rb`` itself."""
    return b"%" in target or b"\\" in target or b".rb" in target.lower()


# --- the request and the answer (pure) ------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, name: str, size: int | None = None) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * MAX_BODY_BYTES:
        raise _BadRequest(f"{name} must be base64")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _BadRequest(f"{name} is not base64") from None
    if _b64(raw) != value or (size is not None and len(raw) != size):
        raise _BadRequest(f"{name} is not canonical base64" + (f" of {size} bytes" if size else ""))
    return raw


@dataclass(frozen=True, repr=False)
class JoinRequest:
    """What a joiner POSTs (signed with its new node key). The grant secret stays out of
    ``repr``."""

    node_id: str
    node_key: bytes
    wg_public_key: bytes
    wg_endpoint: str
    coordination_port: int
    priority: int
    request_time: int
    grant: bytes  # the master-signed JoinGrant statement, as in the token
    grant_secret: bytes

    def __post_init__(self) -> None:
        try:
            check_node_id(self.node_id)
            check_node_public_key(self.node_key)
            if check_peer_address(self.wg_endpoint) != self.wg_endpoint:
                raise _BadRequest("wg_endpoint is not in canonical form")
        except (CoordinationError, InvalidKeyError) as exc:
            raise _BadRequest(str(exc)) from None
        if not isinstance(self.wg_public_key, bytes) or len(self.wg_public_key) != 32:
            raise _BadRequest("wg_public_key must be 32 bytes")
        if self.wg_public_key == bytes(32):
            raise _BadRequest("the all-zero WireGuard key is not a key")
        for name, value, limit in (
            ("coordination_port", self.coordination_port, 65535),
            ("priority", self.priority, 2**32 - 1),
            ("request_time", self.request_time, 2**53),
        ):
            if type(value) is not int or not (1 if name == "coordination_port" else 0) <= value:
                raise _BadRequest(f"{name} out of range")
            if value > limit:
                raise _BadRequest(f"{name} out of range")
        if not isinstance(self.grant, bytes) or not 0 < len(self.grant) <= 1024:
            raise _BadRequest("grant must be 1-1024 bytes")
        if not isinstance(self.grant_secret, bytes) or len(self.grant_secret) != _SECRET_BYTES:
            raise _BadRequest("grant_secret must be 32 bytes")

    def __repr__(self) -> str:
        return (
            f"JoinRequest(node_id={self.node_id!r}, wg_endpoint={self.wg_endpoint!r}, "
            f"coordination_port={self.coordination_port}, request_time={self.request_time}, "
            "grant_secret=<redacted>)"
        )

    def _fields(self) -> dict[str, object]:
        return {
            "v": PROTOCOL_VERSION,
            "node_id": self.node_id,
            "node_key": _b64(self.node_key),
            "wg_public_key": _b64(self.wg_public_key),
            "wg_endpoint": self.wg_endpoint,
            "coordination_port": self.coordination_port,
            "priority": self.priority,
            "request_time": self.request_time,
            "grant": _b64(self.grant),
            "grant_secret": _b64(self.grant_secret),
        }

    def signed_message(self) -> bytes:
        canonical = json.dumps(self._fields(), sort_keys=True, separators=(",", ":"))
        return _REQUEST_DOMAIN + canonical.encode("ascii")

    def to_json(self, node_key: NodeKey) -> bytes:
        """The body: the fields and the node key's signature over them (proof of possession)."""
        if node_key.public != self.node_key:
            raise JoinError("the request must be signed with its own node key")
        obj = {**self._fields(), "signature": _b64(node_key.sign(self.signed_message()))}
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


_REQUEST_KEYS = {
    "v",
    "node_id",
    "node_key",
    "wg_public_key",
    "wg_endpoint",
    "coordination_port",
    "priority",
    "request_time",
    "grant",
    "grant_secret",
    "signature",
}


def parse_join_request(body: bytes) -> tuple[JoinRequest, bytes]:
    """Strictly parse a request body into (request, signature); JoinError for anything else.
    The signature is *not* checked here (:meth:`JoinResponder.handle` does)."""
    try:
        return _parse_request(_load_object(body))
    except _BadRequest as exc:
        raise JoinError(f"bad join request: {exc}") from None


def _parse_request(obj: dict[str, Any]) -> tuple[JoinRequest, bytes]:
    missing = _REQUEST_KEYS - obj.keys()
    if missing:
        raise _BadRequest(f"missing field {sorted(missing)[0]}")
    unknown = obj.keys() - _REQUEST_KEYS
    if unknown:
        raise _BadRequest(f"unknown field {sorted(unknown)[0]!r}")
    if obj["v"] != PROTOCOL_VERSION or type(obj["v"]) is not int:
        raise _BadRequest("unsupported request version")
    for name in ("node_id", "wg_endpoint"):
        if not isinstance(obj[name], str):
            raise _BadRequest(f"{name} must be a string")
    request = JoinRequest(
        obj["node_id"],
        _unb64(obj["node_key"], "node_key", 32),
        _unb64(obj["wg_public_key"], "wg_public_key", 32),
        obj["wg_endpoint"],
        obj["coordination_port"],
        obj["priority"],
        obj["request_time"],
        _unb64(obj["grant"], "grant"),
        _unb64(obj["grant_secret"], "grant_secret", _SECRET_BYTES),
    )
    return request, _unb64(obj["signature"], "signature", 64)


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _BadRequest("body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _BadRequest("body is not a JSON object")
    return obj


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate key")
        result[key] = value
    return result


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_network(text: object) -> ipaddress.IPv4Network:
    if not isinstance(text, str):
        raise _BadRequest("tunnel network must be a string")
    try:
        return parse_tunnel_network(text)
    except ConfigError as exc:
        raise _BadRequest(f"tunnel network {exc}") from None


def _in_network(address: str, network: ipaddress.IPv4Network) -> bool:
    ip = ipaddress.IPv4Address(address)
    return ip in network and ip not in (network.network_address, network.broadcast_address)


@dataclass(frozen=True)
class JoinAnswer:
    """A verified 200 answer: the joiner's record and the membership it joined."""

    responder_node_id: str
    tunnel_network: str
    record: Statement
    membership: Membership

    @property
    def admission(self) -> AdmissionRecord:
        content = self.record.content
        assert isinstance(content, AdmissionRecord)
        return content

    @property
    def tunnel_address(self) -> str:
        wg = self.admission.wireguard
        assert wg is not None  # parse_join_answer requires it
        return wg.tunnel_address

    def peers(self) -> list[AdmissionRecord]:
        """The other members (what the joiner's config seeds coordination with)."""
        return [r for r in self.membership.members() if r.node_id != self.admission.node_id]


def _answer_json(responder: str, network: str, record: Statement, membership: Membership) -> bytes:
    obj = {
        "v": PROTOCOL_VERSION,
        "responder_node_id": responder,
        "tunnel_network": network,
        "record": _b64(record.data),
        "statements": [_b64(s.data) for s in membership.statements()],
    }
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def parse_join_answer(
    body: bytes, master_public: bytes, request: JoinRequest, now_ms: int
) -> JoinAnswer:
    """Strictly parse and check a 200 answer; raises JoinError (it came from the network).

    Every statement must verify against the master key; the joiner's record must be the one
    it asked for (node id, node key, WireGuard key and endpoint); every member's tunnel address
    must be a host of the tunnel network, each used once.
    """
    try:
        obj = _load_object(body)
        keys = {"v", "responder_node_id", "tunnel_network", "record", "statements"}
        if set(obj) != keys:
            raise _BadRequest("answer must have exactly the keys " + ", ".join(sorted(keys)))
        if obj["v"] != PROTOCOL_VERSION or type(obj["v"]) is not int:
            raise _BadRequest("unsupported answer version")
        responder = obj["responder_node_id"]
        if not isinstance(responder, str):
            raise _BadRequest("responder_node_id must be a string")
        check_node_id(responder)
        network = _check_network(obj["tunnel_network"])
        statements = obj["statements"]
        if not isinstance(statements, list) or len(statements) > network.num_addresses * 4:
            raise _BadRequest("statements must be a list (bounded by the tunnel network)")
        record = decode_statement(_unb64(obj["record"], "record"), master_public)
        own = record.content
        if not isinstance(own, AdmissionRecord):
            raise _BadRequest("record is not an admission record")
        if (own.node_id, own.node_key) != (request.node_id, request.node_key):
            raise _BadRequest("record is not this node's")
        wg = own.wireguard
        if wg is None or (wg.public_key, wg.endpoint) != (
            request.wg_public_key,
            request.wg_endpoint,
        ):
            raise _BadRequest("record does not hold this node's WireGuard key and endpoint")
        membership = Membership(master_public)
        for index, entry in enumerate(statements):
            try:
                membership.apply_bytes(_unb64(entry, f"statements[{index}]"), now_ms)
            except CoordinationError as exc:
                raise _BadRequest(f"statements[{index}]: {exc}") from None
        membership.apply(record, now_ms)
        if membership.member(own.node_id) != own:
            raise _BadRequest("the membership does not hold this node's record")
        seen: set[str] = set()
        for member in membership.members():
            if member.wireguard is None:
                continue
            tunnel = member.wireguard.tunnel_address
            if not _in_network(tunnel, network):
                raise _BadRequest(
                    f"{member.node_id}: tunnel address {tunnel} is not a host of {network}"
                )
            if tunnel in seen:
                raise _BadRequest(f"tunnel address {tunnel} is used twice")
            seen.add(tunnel)
        return JoinAnswer(responder, str(network), record, membership)
    except (_BadRequest, CoordinationError) as exc:
        raise JoinError(f"bad join answer: {exc}") from None


def _header(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


# --- the responder (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class JoinDecision:
    """What the responder answers. ``admitted`` is the joiner's signed record when this answer
    admits it (None on a repeat or any failure): the shell hands it to the daemon."""

    status: int
    body: bytes
    admitted: Statement | None = None

    def to_response(self) -> InterceptedResponse:
        return InterceptedResponse(self.status, _JSON_HEADERS, self.body)


class JoinResponder:
    """Answers join requests (pure: ``now`` is passed in, randomness injected).

    ``membership()`` is the node's current membership (read, never changed here: the shell
    applies an admission through the daemon); ``sign`` signs with the master key; ``node_id``
    and ``tunnel_address`` describe this node. Call :meth:`handle` with the whole request;
    :meth:`body_length` tells a shell how many body bytes to read first (None: do not read,
    the answer does not depend on it).
    """

    def __init__(
        self,
        *,
        node_id: str,
        master_public: bytes,
        sign: Signer,
        membership: Callable[[], Membership],
        tunnel_network: str = DEFAULT_TUNNEL_NETWORK,
        randbelow: Callable[[int], int] = secrets.randbelow,
        max_joins: int = DEFAULT_MAX_JOINS,
        window_secs: float = DEFAULT_WINDOW_SECS,
    ) -> None:
        if max_joins < 1 or not window_secs > 0:
            raise JoinError("max_joins must be >= 1 and window_secs > 0")
        try:
            self.network = _check_network(tunnel_network)
        except _BadRequest as exc:
            raise JoinError(str(exc)) from None
        self.node_id = check_node_id(node_id)
        self.master_public = master_public
        self._sign = sign
        self._membership = membership
        self._randbelow = randbelow
        self.max_joins = max_joins
        self.window_secs = window_secs
        self.admitted = 0
        # Admission times inside the window; bounded by max_joins (older ones are pruned).
        self._recent: deque[float] = deque()

    def __repr__(self) -> str:
        return f"JoinResponder(node={self.node_id!r}, admitted={self.admitted})"

    def body_length(self, method: str, path: str, headers: Sequence[tuple[str, str]]) -> int | None:
        """The Content-Length to read, or None when :meth:`handle` rejects without the body."""
        if method != "POST" or path != JOIN_PATH:
            return None
        return _content_length(headers)

    def handle(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        now: float,
    ) -> JoinDecision:
        """Answer one request for a normalised ``/.rb`` path; never raises for any input."""
        if method != "POST" or path != JOIN_PATH:
            return _not_found()
        length = _content_length(headers)
        if length is None or len(body) != length:
            return _not_found()
        # 1. The grant and its secret, before anything else: without them, only ever 404.
        grant = self._grant(body, now)
        if grant is None:
            return _not_found()
        # 2. The request itself (its sender holds a valid grant: details are fine now).
        try:
            request, signature = _parse_request(_load_object(body))
        except _BadRequest as exc:
            return _bad_request(str(exc))
        if not verify_signature(request.node_key, request.signed_message(), signature):
            return _bad_request("the request is not signed with its node key")
        # 3. Freshness: a captured request cannot be replayed later.
        age = now - request.request_time
        if age > MAX_REQUEST_AGE_SECS or -age > MAX_REQUEST_AHEAD_SECS:
            return _not_found()
        membership = self._membership()
        if not membership.grant_usable(grant, request.node_id, int(now)):
            log.info("Refused a join with a grant that is used up or voided")
            return _not_found()
        # 4. A repeat from a node admitted with the same keys gets the same kind of answer.
        existing = membership.member(request.node_id)
        if existing is not None:
            wg = existing.wireguard
            if (
                existing.node_key == request.node_key
                and wg is not None
                and wg.public_key == request.wg_public_key
            ):
                statement = membership.statement_of(request.node_id)
                assert statement is not None
                return JoinDecision(
                    200, _answer_json(self.node_id, str(self.network), statement, membership)
                )
            return _conflict("node id already admitted with other keys")
        conflict = self._conflict(request, membership)
        if conflict is not None:
            return _conflict(conflict)
        # 5. Rate limit (item 2.4): silent, like every other refusal.
        while self._recent and now - self._recent[0] >= self.window_secs:
            self._recent.popleft()
        if len(self._recent) >= self.max_joins:
            log.warning(
                "Join rate limit reached (%d in %gs): refusing", self.max_joins, self.window_secs
            )
            return _not_found()
        # 6. Room in the membership and a free tunnel address.
        if len(membership.members()) >= membership.max_members:
            return JoinDecision(503, b'{"error":"the cluster is full"}')
        address = self._free_address(membership)
        if address is None:
            return JoinDecision(503, b'{"error":"no free tunnel address"}')
        record = AdmissionRecord(
            node_id=request.node_id,
            node_key=request.node_key,
            issued_at_ms=int(now * 1000),
            priority=request.priority,
            publisher_eligible=grant.with_master_key,
            holds_master_key=grant.with_master_key,
            coordination=f"{address}:{request.coordination_port}",
            wireguard=WireGuardIdentity(request.wg_public_key, request.wg_endpoint, address),
            grant_id=grant.grant_id,
            grant_expires_at=grant.expires_at,
            issuer=self.node_id,
        )
        statement = Statement.sign(record, self._sign)
        projected = _with(membership, statement, int(now * 1000))
        self._recent.append(now)
        self.admitted += 1
        log.info("Node %s admitted with tunnel address %s", request.node_id, address)
        return JoinDecision(
            200,
            _answer_json(self.node_id, str(self.network), statement, projected),
            admitted=statement,
        )

    def _grant(self, body: bytes, now: float) -> JoinGrant | None:
        """The request's grant if it verifies, its secret matches and it has not expired."""
        try:
            obj = _load_object(body)
            grant_statement = decode_statement(
                _unb64(obj.get("grant"), "grant"), self.master_public
            )
            secret = _unb64(obj.get("grant_secret"), "grant_secret", _SECRET_BYTES)
        except (_BadRequest, CoordinationError):
            return None
        grant = grant_statement.content
        if not isinstance(grant, JoinGrant):
            return None
        if not hmac.compare_digest(grant_secret_hash(secret), grant.secret_hash):
            return None
        if now >= grant.expires_at:
            log.info("Refused a join with an expired grant")
            return None
        return grant

    def _conflict(self, request: JoinRequest, membership: Membership) -> str | None:
        if membership.is_revoked(request.node_key):
            return "this node key was revoked; make a new one"
        for member in membership.members():
            if member.node_key == request.node_key:
                return "node key already used by another node"
            wg = member.wireguard
            if wg is not None and wg.public_key == request.wg_public_key:
                return "WireGuard key already used by another node"
        return None

    def _free_address(self, membership: Membership) -> str | None:
        used = {
            ipaddress.IPv4Address(r.wireguard.tunnel_address)
            for r in membership.members()
            if r.wireguard is not None
        }
        used.update(
            ipaddress.IPv4Address(r.wireguard.tunnel_address)
            for r in membership.shadowed()
            if r.wireguard is not None
        )
        free = [host for host in self.network.hosts() if host not in used]
        if not free:
            return None
        index = self._randbelow(len(free))
        if not 0 <= index < len(free):
            raise JoinError("randbelow returned an index out of range")
        return str(free[index])


def _with(membership: Membership, statement: Statement, now_ms: int) -> Membership:
    """A copy of ``membership`` with ``statement`` applied (the answer shows the joiner in it)."""
    copy = Membership(
        membership.master_public,
        max_members=membership.max_members,
    )
    for held in membership.statements():
        copy.apply(held, now_ms)
    copy.apply(statement, now_ms)
    return copy


def _content_length(headers: Sequence[tuple[str, str]]) -> int | None:
    values = _header(headers, "content-length")
    if len(values) != 1 or _header(headers, "transfer-encoding"):
        return None
    text = values[0].strip()
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    length = int(text)
    return length if 1 <= length <= MAX_BODY_BYTES else None


def _not_found() -> JoinDecision:
    return JoinDecision(404, _NOT_FOUND)


def _bad_request(message: str) -> JoinDecision:
    return JoinDecision(400, json.dumps({"error": message}).encode("ascii"))


def _conflict(message: str) -> JoinDecision:
    return JoinDecision(409, json.dumps({"error": message}).encode("ascii"))


# --- responder shell ------------------------------------------------------------------------

Admit = Callable[[Statement], Awaitable[None]]


class JoinInterceptor:
    """The proxy interceptor: answers every ``/.rb`` path itself, passes every other one on.

    ``responder`` is None on a node that does not admit (joins off, or no master key): every
    ``/.rb`` request then gets the 404 an unauthenticated request gets anywhere. ``admit`` is
    the daemon's callback for a newly admitted node (membership, coordination, WireGuard);
    when it fails the joiner gets a 500 and nothing was admitted, so it can retry. Requests are
    answered one at a time, so two joiners never get the same tunnel address.
    """

    def __init__(
        self,
        responder: JoinResponder | None,
        *,
        admit: Admit | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._responder = responder
        self._admit = admit
        self._clock = clock
        self._lock = asyncio.Lock()

    @staticmethod
    def wants(target: bytes) -> bool:
        """The proxy's cheap pre-filter on the raw request target (see :func:`_may_be_ours`);
        a false positive costs one coroutine switch, a false negative is impossible."""
        return _may_be_ours(target)

    async def __call__(self, request: InterceptedRequest) -> InterceptedResponse | None:
        path = join_route(request.path)
        if path is None:
            return None
        responder = self._responder
        if responder is None:
            return _not_found().to_response()
        length = responder.body_length(request.method, path, request.headers)
        body = b"" if length is None else await request.read_body(length)
        async with self._lock:
            decision = responder.handle(request.method, path, request.headers, body, self._clock())
            if decision.admitted is not None and self._admit is not None:
                try:
                    await self._admit(decision.admitted)
                except Exception as exc:  # the daemon's failure must not leave a half-admission
                    log.error("Could not admit the joined node: %s", type(exc).__name__)
                    return InterceptedResponse(500, _JSON_HEADERS, b'{"error":"internal error"}')
        return decision.to_response()


# --- joiner side ----------------------------------------------------------------------------


class _Retryable(JoinError):
    """A failure that another attempt may not repeat (network, 404 = maybe another node, 5xx)."""


Sleep = Callable[[float], Awaitable[None]]


async def join_via_onion(
    socks: tuple[str, int],
    master_address: str,
    request: JoinRequest,
    node_key: NodeKey,
    attempts: int = DEFAULT_JOIN_ATTEMPTS,
    interval: float = DEFAULT_JOIN_INTERVAL_SECS,
    sleep: Sleep = asyncio.sleep,
    *,
    clock: Callable[[], float] = time.time,
    attempt_timeout: float = 120.0,
    port: int = 80,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> JoinAnswer:
    """POST the join request to ``master_address`` through Tor's SOCKS port; return the answer.

    Each attempt uses fresh random SOCKS credentials, so with tor's default
    ``IsolateSOCKSAuth`` it gets its own circuit and intro point (a retry reaches another node
    and does not reuse a broken path); the onion name is resolved by tor (remote DNS).
    ``request_time`` is refreshed (and the request signed again) per attempt. 404 (a node that
    does not admit, an expired or used-up grant, clock, rate limit), 5xx and network errors are
    retried ``attempts`` times, ``interval`` seconds apart; 400 and 409 are final.
    """
    if attempts < 1:
        raise JoinError("attempts must be at least 1")
    host = _onion_host(master_address)
    master_public = decode_onion_address(host)
    last = "no attempt made"
    for attempt in range(1, attempts + 1):
        fresh = _refreshed(request, int(clock()))
        try:
            async with asyncio.timeout(attempt_timeout):
                body = await _attempt(socks, host, port, fresh.to_json(node_key), randbytes)
            return parse_join_answer(body, master_public, fresh, int(clock() * 1000))
        except _Retryable as exc:
            last = str(exc)
        except TimeoutError:
            last = f"no answer within {attempt_timeout:g} s"
        except (OSError, SocksProxyError) as exc:
            last = f"connection failed: {type(exc).__name__}: {exc}"
        log.warning("Join attempt %d/%d failed: %s", attempt, attempts, last)
        if attempt < attempts:
            await sleep(interval)
    raise JoinError(f"join failed after {attempts} attempts: {last}")


def _refreshed(request: JoinRequest, now: int) -> JoinRequest:
    return JoinRequest(
        request.node_id,
        request.node_key,
        request.wg_public_key,
        request.wg_endpoint,
        request.coordination_port,
        request.priority,
        now,
        request.grant,
        request.grant_secret,
    )


def _onion_host(address: str) -> str:
    host = address.strip().lower()
    if not host.endswith(ONION_SUFFIX):
        host += ONION_SUFFIX
    try:
        decode_onion_address(host)
    except InvalidKeyError as exc:
        raise JoinError(f"master address: {exc}") from None
    return host


async def _attempt(
    socks: tuple[str, int],
    host: str,
    port: int,
    body: bytes,
    randbytes: Callable[[int], bytes],
) -> bytes:
    proxy = SocksProxy(
        ProxyType.SOCKS5,
        socks[0],
        socks[1],
        username=randbytes(16).hex(),
        password=randbytes(16).hex(),
        rdns=True,
    )
    sock = await proxy.connect(host, port)
    try:
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        return await _exchange(reader, writer, host, body)
    finally:
        writer.close()
        # The peer may already have dropped the connection; nothing is left to clean up then.
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, body: bytes
) -> bytes:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
    head = h11.Request(
        method="POST",
        target=JOIN_PATH,
        headers=[
            ("Host", host),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ],
    )
    writer.write(
        (conn.send(head) or b"")
        + (conn.send(h11.Data(data=body)) or b"")
        + (conn.send(h11.EndOfMessage()) or b"")
    )
    await writer.drain()
    status = 0
    chunks: list[bytes] = []
    size = 0
    # Bounded: every iteration either consumes input (bounded by MAX_ANSWER_BYTES plus the
    # header limit) or ends the loop; the caller's timeout bounds the waiting.
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            raise _Retryable("malformed HTTP answer") from None
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_ANSWER_BYTES:
                raise _Retryable("answer too large")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if status == 200:
        return b"".join(chunks)
    if status == 404:
        raise _Retryable(
            "refused (404): this node does not admit joins (another attempt reaches another "
            "node), or the join token expired, was used up or revoked, or the clocks are too "
            "far apart, or the responder's join rate limit"
        )
    if status in (400, 409):
        detail = _error_detail(b"".join(chunks))
        raise JoinError(f"join rejected ({status}): {detail}")
    raise _Retryable(f"unexpected HTTP status {status}")


def _error_detail(body: bytes) -> str:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "no details"
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, str) and error.isprintable():
        return error[:200]
    return "no details"
