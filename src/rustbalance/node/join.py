"""Joining a cluster over the master onion (system.md §11.1, §13.2 item 2.4, W3, W4, W9).

A new node knows the master ``.onion``, the join secret and the cluster token (from its join
token). It POSTs ``/.rb/<join_secret>`` through Tor to the master address; whichever node's
proxy receives the request answers it itself (the proxy's interceptor hook), the target never
sees it. The answer gives the joiner a tunnel address and the cluster's peers.

Why it looks like this:

- **No oracle.** Every authentication failure (wrong secret, wrong cluster token, stale or
  future ``request_time``, rate limit) is the same 404 with the same body: a prober learns
  nothing, not even whether the path exists. Only a caller who already has the join secret can
  see a 400 (malformed body) or a 409 (node id / WireGuard key conflict).
- **Constant-time comparisons** of the secret and the token (``hmac.compare_digest``).
- **Rate limit** (item 2.4): at most ``max_joins`` admissions per ``window_secs`` per responding
  node; a repeat from the same node (same node id and WireGuard key) gets the same answer and
  does not count, so a joiner retrying after a lost reply is not punished.
- **Tunnel addresses** (W9) are assigned by the responder from a configurable network
  (``10.99.0.0/24`` by default), never one in use by itself, a known peer or an earlier join.
  The choice is random among the free ones (injected ``randbelow``): two responders answering
  joins in the same instant are then unlikely to pick the same address.

Pure core: :class:`JoinResponder` (``now`` passed in, randomness injected). Asyncio shells:
:func:`make_join_interceptor` (responder side) and :func:`join_via_onion` (joiner side).
Nothing here logs a secret; error messages never contain the request path (it holds the secret).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import h11
from python_socks import ProxyError as SocksProxyError
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy as SocksProxy

from rustbalance.crypto.onion_address import ONION_SUFFIX, decode_onion_address
from rustbalance.errors import ConfigError, InvalidKeyError, RustBalanceError
from rustbalance.proxy.http import InterceptedRequest, InterceptedResponse
from rustbalance.rules import NODE_ID_RULE, is_node_id, parse_endpoint, parse_tunnel_network

__all__ = [
    "DEFAULT_TUNNEL_NETWORK",
    "JOIN_PATH_PREFIX",
    "MAX_BODY_BYTES",
    "MIN_SECRET_CHARS",
    "JoinAnswer",
    "JoinDecision",
    "JoinError",
    "JoinInterceptor",
    "JoinRequest",
    "JoinResponder",
    "PeerInfo",
    "check_secret_strength",
    "join_via_onion",
    "make_join_interceptor",
    "parse_join_answer",
    "parse_join_request",
]

log = logging.getLogger("rustbalance.join")

JOIN_PATH_PREFIX = "/.rb/"
PROTOCOL_VERSION = 1
MAX_BODY_BYTES = 8192
# An answer lists every peer (at most the tunnel network's size); 256 KiB is ample.
MAX_ANSWER_BYTES = 256 * 1024
DEFAULT_TUNNEL_NETWORK = "10.99.0.0/24"
DEFAULT_MAX_JOINS = 5
DEFAULT_WINDOW_SECS = 300.0
MAX_REQUEST_AGE_SECS = 300
MAX_REQUEST_AHEAD_SECS = 60

_JSON_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))
# One body for every authentication failure: identical bytes, so nothing distinguishes them.
_NOT_FOUND = b'{"error":"not found"}'


class JoinError(RustBalanceError):
    """A join failed; the message never contains the join secret or the cluster token."""


MIN_SECRET_CHARS = 32


def check_secret_strength(name: str, value: object) -> None:
    """W3: an empty or short join secret or cluster token would let anyone join."""
    if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
        raise JoinError(f"{name} must be at least {MIN_SECRET_CHARS} characters (128 random bits)")


class _BadRequest(JoinError):
    """A malformed value (the responder answers 400); the message is safe to send back."""


@dataclass(frozen=True)
class PeerInfo:
    """What a node needs to reach a peer: coordination address, WireGuard key and endpoint."""

    node_id: str
    coordination: str  # host:port of the peer's coordination listener (its tunnel address)
    wg_public_key: str  # standard base64 of the 32-byte key, as `wg` prints it
    wg_endpoint: str  # public host:port of the peer's WireGuard
    tunnel_address: str  # the peer's address inside the tunnel network

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        object.__setattr__(self, "coordination", _check_endpoint(self.coordination, "coordination"))
        object.__setattr__(self, "wg_public_key", _check_wg_key(self.wg_public_key))
        object.__setattr__(self, "wg_endpoint", _check_endpoint(self.wg_endpoint, "wg_endpoint"))
        try:
            address = ipaddress.IPv4Address(self.tunnel_address)
        except (ValueError, TypeError):
            raise _BadRequest("tunnel_address must be an IPv4 address") from None
        object.__setattr__(self, "tunnel_address", str(address))

    def to_dict(self) -> dict[str, str]:
        return {
            "node_id": self.node_id,
            "coordination": self.coordination,
            "wg_public_key": self.wg_public_key,
            "wg_endpoint": self.wg_endpoint,
            "tunnel_address": self.tunnel_address,
        }

    @classmethod
    def from_dict(cls, obj: object) -> PeerInfo:
        fields = ("node_id", "coordination", "wg_public_key", "wg_endpoint", "tunnel_address")
        if not isinstance(obj, dict) or set(obj) != set(fields):
            raise _BadRequest(f"a peer is an object with exactly the keys {', '.join(fields)}")
        if not all(isinstance(obj[name], str) for name in fields):
            raise _BadRequest("peer fields must be strings")
        return cls(*(obj[name] for name in fields))


@dataclass(frozen=True, repr=False)
class JoinRequest:
    """The body a joiner POSTs. ``cluster_token`` stays out of ``repr``."""

    node_id: str
    cluster_token: str
    wg_public_key: str
    wg_endpoint: str
    coordination_port: int
    request_time: int

    def __post_init__(self) -> None:
        _check_node_id(self.node_id)
        if not isinstance(self.cluster_token, str) or not 1 <= len(self.cluster_token) <= 256:
            raise _BadRequest("cluster_token must be a string of 1-256 characters")
        object.__setattr__(self, "wg_public_key", _check_wg_key(self.wg_public_key))
        object.__setattr__(self, "wg_endpoint", _check_endpoint(self.wg_endpoint, "wg_endpoint"))
        if type(self.coordination_port) is not int or not 1 <= self.coordination_port <= 65535:
            raise _BadRequest("coordination_port must be an integer 1-65535")
        if type(self.request_time) is not int or not 0 <= self.request_time < 2**63:
            raise _BadRequest("request_time must be a non-negative integer (unix time)")

    def __repr__(self) -> str:
        return (
            f"JoinRequest(node_id={self.node_id!r}, wg_endpoint={self.wg_endpoint!r}, "
            f"coordination_port={self.coordination_port}, request_time={self.request_time}, "
            "cluster_token=<redacted>)"
        )

    def to_json(self) -> bytes:
        obj = {
            "v": PROTOCOL_VERSION,
            "node_id": self.node_id,
            "cluster_token": self.cluster_token,
            "wg_public_key": self.wg_public_key,
            "wg_endpoint": self.wg_endpoint,
            "coordination_port": self.coordination_port,
            "request_time": self.request_time,
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True)
class JoinAnswer:
    """The 200 answer: the joiner's tunnel address and the peers it should add."""

    responder_node_id: str
    tunnel_address: str
    tunnel_network: str
    peers: tuple[PeerInfo, ...]

    def to_json(self) -> bytes:
        obj = {
            "v": PROTOCOL_VERSION,
            "responder_node_id": self.responder_node_id,
            "tunnel_address": self.tunnel_address,
            "tunnel_network": self.tunnel_network,
            "peers": [peer.to_dict() for peer in self.peers],
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True)
class JoinDecision:
    """What the responder answers. ``admitted`` is the new peer to add (None on a repeat or
    any failure): the shell hands it to the daemon's callback."""

    status: int
    body: bytes
    admitted: PeerInfo | None = None

    def to_response(self) -> InterceptedResponse:
        return InterceptedResponse(self.status, _JSON_HEADERS, self.body)


# --- parsing (pure) -------------------------------------------------------------------------


def parse_join_request(body: bytes) -> JoinRequest:
    """Strictly parse a request body; raises JoinError for anything but a valid request."""
    try:
        return _parse_request(body)
    except _BadRequest as exc:
        raise JoinError(f"bad join request: {exc}") from None


def parse_join_answer(body: bytes) -> JoinAnswer:
    """Strictly parse a 200 answer; raises JoinError (the answer came from the network)."""
    try:
        obj = _load_object(body)
        keys = {"v", "responder_node_id", "tunnel_address", "tunnel_network", "peers"}
        if set(obj) != keys:
            raise _BadRequest("answer must have exactly the keys " + ", ".join(sorted(keys)))
        if obj["v"] != PROTOCOL_VERSION or type(obj["v"]) is not int:
            raise _BadRequest("unsupported answer version")
        responder = obj["responder_node_id"]
        if not isinstance(responder, str):
            raise _BadRequest("responder_node_id must be a string")
        _check_node_id(responder)
        network = _check_network(obj["tunnel_network"])
        address = obj["tunnel_address"]
        if not isinstance(address, str):
            raise _BadRequest("tunnel_address must be a string")
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            raise _BadRequest("tunnel_address is not an IPv4 address") from None
        if ip not in network or ip in (network.network_address, network.broadcast_address):
            raise _BadRequest("tunnel_address is not a host of tunnel_network")
        raw_peers = obj["peers"]
        if not isinstance(raw_peers, list) or len(raw_peers) > network.num_addresses:
            raise _BadRequest("peers must be a list no longer than the tunnel network")
        peers = tuple(PeerInfo.from_dict(peer) for peer in raw_peers)
        if len({p.node_id for p in peers}) != len(peers):
            raise _BadRequest("peers lists a node twice")
        return JoinAnswer(responder, str(ip), str(network), peers)
    except _BadRequest as exc:
        raise JoinError(f"bad join answer: {exc}") from None


def _parse_request(body: bytes) -> JoinRequest:
    obj = _load_object(body)
    keys = {
        "v",
        "node_id",
        "cluster_token",
        "wg_public_key",
        "wg_endpoint",
        "coordination_port",
        "request_time",
    }
    missing = keys - obj.keys()
    if missing:
        raise _BadRequest(f"missing field {sorted(missing)[0]}")
    unknown = obj.keys() - keys
    if unknown:
        raise _BadRequest(f"unknown field {sorted(unknown)[0]!r}")
    if obj["v"] != PROTOCOL_VERSION or type(obj["v"]) is not int:
        raise _BadRequest("unsupported request version")
    for name in ("node_id", "cluster_token", "wg_public_key", "wg_endpoint"):
        if not isinstance(obj[name], str):
            raise _BadRequest(f"{name} must be a string")
    return JoinRequest(
        obj["node_id"],
        obj["cluster_token"],
        obj["wg_public_key"],
        obj["wg_endpoint"],
        obj["coordination_port"],
        obj["request_time"],
    )


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


def _check_node_id(node_id: object) -> None:
    if not is_node_id(node_id):
        raise _BadRequest(f"node_id must be {NODE_ID_RULE}")


def _check_wg_key(key: object) -> str:
    # WireGuard keys are standard base64 of 32 bytes (44 characters with one '=').
    if not isinstance(key, str) or len(key) != 44:
        raise _BadRequest("WireGuard public key must be 44 characters of base64")
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise _BadRequest("WireGuard public key is not base64") from None
    if len(raw) != 32 or base64.b64encode(raw).decode("ascii") != key:
        raise _BadRequest("WireGuard public key is not canonical base64 of 32 bytes")
    return key


def _check_endpoint(text: object, name: str) -> str:
    if not isinstance(text, str) or not 0 < len(text) <= 300:
        raise _BadRequest(f"{name} must be HOST:PORT")
    try:
        return str(parse_endpoint(text))
    except ConfigError as exc:
        raise _BadRequest(f"{name}: {exc}") from None


def _check_network(text: object) -> ipaddress.IPv4Network:
    if not isinstance(text, str):
        raise _BadRequest("tunnel network must be a string")
    try:
        return parse_tunnel_network(text)
    except ConfigError as exc:
        raise _BadRequest(f"tunnel network {exc}") from None


def _header(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


# --- the responder (pure) -------------------------------------------------------------------


@dataclass
class _Admission:
    peer: PeerInfo
    body: bytes


class JoinResponder:
    """Answers join requests (pure: ``now`` is passed in, randomness injected).

    ``self_info`` describes this node as peers should see it. ``known_peers`` returns the
    cluster's other peers as the daemon knows them (their tunnel addresses are never handed
    out). Call :meth:`handle` with the whole request; :meth:`body_length` tells a shell how
    many body bytes to read first (None: do not read, the answer does not depend on it).
    """

    def __init__(
        self,
        *,
        join_secret: str,
        cluster_token: str,
        self_info: PeerInfo,
        tunnel_network: str = DEFAULT_TUNNEL_NETWORK,
        known_peers: Callable[[], Sequence[PeerInfo]] = lambda: (),
        randbelow: Callable[[int], int] = secrets.randbelow,
        max_joins: int = DEFAULT_MAX_JOINS,
        window_secs: float = DEFAULT_WINDOW_SECS,
    ) -> None:
        for name, value in (("join_secret", join_secret), ("cluster_token", cluster_token)):
            check_secret_strength(name, value)
        if max_joins < 1 or not window_secs > 0:
            raise JoinError("max_joins must be >= 1 and window_secs > 0")
        try:
            self.network = _check_network(tunnel_network)
        except _BadRequest as exc:
            raise JoinError(str(exc)) from None
        if ipaddress.IPv4Address(self_info.tunnel_address) not in self.network:
            raise JoinError("this node's tunnel address is outside the tunnel network")
        self._secret = join_secret.encode("utf-8")
        self._token = cluster_token.encode("utf-8")
        self.self_info = self_info
        self._known_peers = known_peers
        self._randbelow = randbelow
        self.max_joins = max_joins
        self.window_secs = window_secs
        self._admitted: dict[str, _Admission] = {}
        # Admission times inside the window; bounded by max_joins (older ones are pruned).
        self._recent: deque[float] = deque()

    def __repr__(self) -> str:
        return f"JoinResponder(node={self.self_info.node_id!r}, joins={len(self._admitted)})"

    @property
    def admitted(self) -> tuple[PeerInfo, ...]:
        return tuple(a.peer for a in self._admitted.values())

    def body_length(self, method: str, path: str, headers: Sequence[tuple[str, str]]) -> int | None:
        """The Content-Length to read, or None when :meth:`handle` rejects without the body."""
        if method != "POST" or not self._secret_ok(path):
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
        """Answer one request for a path under ``/.rb/``; never raises for any input."""
        # 1. The secret (in the path) before anything else: without it, only ever 404.
        if method != "POST" or not self._secret_ok(path):
            return _not_found()
        # 2. Framing: the proxy has already enforced Content-Length framing, so the length
        # header alone decides; chunked bodies (no Content-Length) are refused.
        length = _content_length(headers)
        if length is None or len(body) != length:
            return _bad_request("Invalid content length")
        # 3. Body.
        try:
            request = _parse_request(body)
        except _BadRequest as exc:
            return _bad_request(str(exc))
        # 4. Cluster token, constant time; a wrong one looks exactly like a wrong path.
        token = request.cluster_token.encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(token, self._token):
            return _not_found()
        # 5. Freshness: a captured request cannot be replayed later (and the 404 is silent).
        age = now - request.request_time
        if age > MAX_REQUEST_AGE_SECS or -age > MAX_REQUEST_AHEAD_SECS:
            return _not_found()
        # 6. A repeat from the same node is answered as before and is not counted.
        previous = self._admitted.get(request.node_id)
        if previous is not None:
            if hmac.compare_digest(previous.peer.wg_public_key, request.wg_public_key):
                return JoinDecision(200, previous.body)
            return _conflict("node id already joined with a different WireGuard key")
        conflict = self._conflict_with_others(request)
        if conflict is not None:
            return _conflict(conflict)
        # 7. Rate limit (item 2.4): silent, like every other refusal.
        while self._recent and now - self._recent[0] >= self.window_secs:
            self._recent.popleft()
        if len(self._recent) >= self.max_joins:
            log.warning(
                "Join rate limit reached (%d in %gs): refusing", self.max_joins, self.window_secs
            )
            return _not_found()
        # 8. A tunnel address nobody uses.
        address = self._free_address(request.node_id)
        if address is None:
            return JoinDecision(503, b'{"error":"no free tunnel address"}')
        peer = PeerInfo(
            node_id=request.node_id,
            coordination=f"{address}:{request.coordination_port}",
            wg_public_key=request.wg_public_key,
            wg_endpoint=request.wg_endpoint,
            tunnel_address=address,
        )
        answer = JoinAnswer(
            self.self_info.node_id, address, str(self.network), self._peer_list(peer.node_id)
        )
        body_out = answer.to_json()
        self._admitted[peer.node_id] = _Admission(peer, body_out)
        self._recent.append(now)
        log.info("Node %s joined with tunnel address %s", peer.node_id, address)
        return JoinDecision(200, body_out, admitted=peer)

    def release(self, node_id: str) -> None:
        """Forget an admission (the daemon could not add the peer): its address is free again
        and a retry is a fresh join. The rate-limit slot stays used, on purpose."""
        self._admitted.pop(node_id, None)

    # -- internals ---------------------------------------------------------------------------

    def _secret_ok(self, path: str) -> bool:
        if not path.startswith(JOIN_PATH_PREFIX):
            return False
        candidate = path[len(JOIN_PATH_PREFIX) :].encode("utf-8", "surrogatepass")
        return hmac.compare_digest(candidate, self._secret)

    def _others(self, exclude: str) -> list[PeerInfo]:
        peers: dict[str, PeerInfo] = {}
        for peer in self._known_peers():
            peers.setdefault(peer.node_id, peer)
        for admission in self._admitted.values():
            peers.setdefault(admission.peer.node_id, admission.peer)
        peers.pop(self.self_info.node_id, None)
        peers.pop(exclude, None)
        return list(peers.values())

    def _conflict_with_others(self, request: JoinRequest) -> str | None:
        if request.node_id == self.self_info.node_id:
            return "node id is the responder's own"
        if request.wg_public_key == self.self_info.wg_public_key:
            return "WireGuard key is the responder's own"
        for peer in [*self._known_peers(), *(a.peer for a in self._admitted.values())]:
            if peer.node_id == request.node_id and peer.wg_public_key != request.wg_public_key:
                return "node id already in the cluster with a different WireGuard key"
            if peer.node_id != request.node_id and peer.wg_public_key == request.wg_public_key:
                return "WireGuard key already used by another node"
        return None

    def _free_address(self, node_id: str) -> str | None:
        # A node the cluster already knows under the same key keeps its address (W4: never
        # reassign; here the address simply stays with its owner).
        used: set[ipaddress.IPv4Address] = {ipaddress.IPv4Address(self.self_info.tunnel_address)}
        for peer in self._known_peers():
            if peer.node_id == node_id:
                return peer.tunnel_address
            used.add(ipaddress.IPv4Address(peer.tunnel_address))
        used.update(ipaddress.IPv4Address(a.peer.tunnel_address) for a in self._admitted.values())
        free = [host for host in self.network.hosts() if host not in used]
        if not free:
            return None
        index = self._randbelow(len(free))
        if not 0 <= index < len(free):
            raise JoinError("randbelow returned an index out of range")
        return str(free[index])

    def _peer_list(self, joiner: str) -> tuple[PeerInfo, ...]:
        return (self.self_info, *self._others(joiner))


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

AddPeer = Callable[[PeerInfo], Awaitable[None]]


class JoinInterceptor:
    """The proxy interceptor: answers ``/.rb/...`` itself, passes every other path on.

    ``add_peer`` is the daemon's callback for a newly admitted peer (add it to WireGuard and
    the coordination peer table). When it fails the admission is released and the joiner
    gets a 500, so it can retry.
    """

    def __init__(
        self,
        responder: JoinResponder,
        *,
        add_peer: AddPeer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._responder = responder
        self._add_peer = add_peer
        self._clock = clock

    @staticmethod
    def wants(target: bytes) -> bool:
        """The proxy's cheap pre-filter on the raw request target (origin or absolute form):
        only a target that may name ``/.rb`` leaves the proxy's callback fast path. A false
        positive costs one coroutine switch; a false negative is impossible, since every
        path :meth:`__call__` answers contains ``/.rb``."""
        return b"/.rb" in target

    async def __call__(self, request: InterceptedRequest) -> InterceptedResponse | None:
        # Everything under /.rb is ours: the target must never see a join secret in a path.
        if request.path != "/.rb" and not request.path.startswith(JOIN_PATH_PREFIX):
            return None
        responder = self._responder
        length = responder.body_length(request.method, request.path, request.headers)
        body = b"" if length is None else await request.read_body(length)
        decision = responder.handle(
            request.method, request.path, request.headers, body, self._clock()
        )
        if decision.admitted is not None and self._add_peer is not None:
            try:
                await self._add_peer(decision.admitted)
            except Exception as exc:  # the daemon's failure must not leave a half-added peer
                name = decision.admitted.node_id
                log.error("Could not add joined node %s: %s", name, type(exc).__name__)
                responder.release(decision.admitted.node_id)
                return InterceptedResponse(500, _JSON_HEADERS, b'{"error":"internal error"}')
        return decision.to_response()


def make_join_interceptor(
    responder: JoinResponder,
    *,
    add_peer: AddPeer | None = None,
    clock: Callable[[], float] = time.time,
) -> JoinInterceptor:
    """The proxy interceptor for ``responder`` (see :class:`JoinInterceptor`)."""
    return JoinInterceptor(responder, add_peer=add_peer, clock=clock)


# --- joiner side ----------------------------------------------------------------------------


class _Retryable(JoinError):
    """A failure that another attempt may not repeat (network, 404 = maybe rate limited, 5xx)."""


Sleep = Callable[[float], Awaitable[None]]


async def join_via_onion(
    socks: tuple[str, int],
    master_address: str,
    join_secret: str,
    request: JoinRequest,
    attempts: int = 5,
    interval: float = 15.0,
    sleep: Sleep = asyncio.sleep,
    *,
    clock: Callable[[], float] = time.time,
    attempt_timeout: float = 120.0,
    port: int = 80,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> JoinAnswer:
    """POST the join request to ``master_address`` through Tor's SOCKS port; return the answer.

    Each attempt uses fresh random SOCKS credentials, so with tor's default
    ``IsolateSOCKSAuth`` it gets its own circuit (a retry does not reuse a broken path); the
    onion name is resolved by tor (remote DNS). ``request_time`` is refreshed per attempt.
    404 (wrong secret/token, clock, or the responder's rate limit), 5xx and network errors
    are retried ``attempts`` times, ``interval`` seconds apart; 400 and 409 are final.
    """
    if attempts < 1:
        raise JoinError("attempts must be at least 1")
    host = _onion_host(master_address)
    last = "no attempt made"
    for attempt in range(1, attempts + 1):
        fresh = dataclasses.replace(request, request_time=int(clock()))
        try:
            async with asyncio.timeout(attempt_timeout):
                return await _attempt(socks, host, port, join_secret, fresh, randbytes)
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
    join_secret: str,
    request: JoinRequest,
    randbytes: Callable[[int], bytes],
) -> JoinAnswer:
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
        return await _exchange(reader, writer, host, join_secret, request)
    finally:
        writer.close()
        # The peer may already have dropped the connection; nothing is left to clean up then.
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    join_secret: str,
    request: JoinRequest,
) -> JoinAnswer:
    body = request.to_json()
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
    head = h11.Request(
        method="POST",
        target=JOIN_PATH_PREFIX + join_secret,
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
        return parse_join_answer(b"".join(chunks))
    if status == 404:
        raise _Retryable(
            "refused (404): wrong join secret or cluster token, clocks too far apart, "
            "or the responder's join rate limit"
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
