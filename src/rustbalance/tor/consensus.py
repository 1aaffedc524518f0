"""Microdesc consensus and microdescriptors: relays, SRVs, parameters, the HSDir set.

Pure parsers of untrusted text (what tor returns for ``GETINFO
dir/status-vote/current/consensus-microdesc`` and ``GETINFO md/all``). They raise only
:class:`~rustbalance.errors.ConsensusError`, whose message names the offending line.

Sources: dir-spec §3.4.1 (consensus header and router status entries, microdesc flavour),
§3.3 (microdescriptors), §2.1.1 (``pr`` protocol lists); param-spec; tor
``src/feature/dirparse/ns_parse.c``, ``microdesc_parse.c``,
``src/feature/nodelist/networkstatus.c`` (``networkstatus_get_param``) and
``src/feature/hs/hs_common.c`` (``get_time_period_length``, ``hs_get_hsdir_*``).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import hashlib
import ipaddress
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from rustbalance.crypto.time_period import (
    SHARED_RANDOM_N_PHASES,
    SHARED_RANDOM_N_ROUNDS,
    TimeParams,
)
from rustbalance.errors import ConsensusError

__all__ = [
    "Consensus",
    "HSDirParams",
    "HSDirRelay",
    "Microdescriptor",
    "RouterStatus",
    "get_param",
    "hsdir_params",
    "hsdir_relays",
    "parse_consensus",
    "parse_microdescriptors",
    "time_params",
]

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1

# protover.c MAX_PROTOCOL_VERSION: higher versions make a protocol list invalid.
_MAX_PROTOCOL_VERSION = 63
# protover.h PROTOVER_HSDIR_V3: relays that can store v3 onion-service descriptors.
_PROTOVER_HSDIR_V3 = 2

# hs_common.h HS_TIME_PERIOD_LENGTH_{DEFAULT,MIN,MAX} (minutes) for the "hsdir_interval"
# consensus parameter read by hs_common.c get_time_period_length.
_HSDIR_INTERVAL_PARAM = "hsdir_interval"
_HS_TIME_PERIOD_LENGTH_MIN = 30
_HS_TIME_PERIOD_LENGTH_MAX = 60 * 24 * 10

_NICKNAME_RE = re.compile(r"[A-Za-z0-9]{1,19}")
_PROTO_NAME_RE = re.compile(r"[A-Za-z0-9-]+")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_TIME_RE = re.compile(r"[0-9]{2}:[0-9]{2}:[0-9]{2}")


@dataclass(frozen=True)
class RouterStatus:
    """One router status entry of a microdesc consensus (dir-spec §3.4.1)."""

    nickname: str
    identity: bytes  # 20-byte RSA identity digest (the relay fingerprint)
    address: str
    or_port: int
    dir_port: int
    microdesc_digest: bytes  # SHA-256 of the relay's microdescriptor ("m" line)
    flags: frozenset[str]
    protocols: Mapping[str, frozenset[int]] = field(hash=False)
    ipv6_addresses: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        """The 40-character upper-case hex fingerprint (as used by ``SERVER=``)."""
        return self.identity.hex().upper()

    def supports(self, protocol: str, version: int) -> bool:
        """Whether the ``pr`` line lists ``version`` of ``protocol``."""
        return version in self.protocols.get(protocol, frozenset())


@dataclass(frozen=True)
class Consensus:
    """What the onion-service layer needs from a microdesc consensus."""

    valid_after: int
    fresh_until: int
    valid_until: int
    params: Mapping[str, int] = field(hash=False)
    srv_current: bytes | None
    srv_previous: bytes | None
    relays: tuple[RouterStatus, ...]

    @property
    def voting_interval(self) -> int:
        """Seconds between consensuses (shared_random_client.c ``get_voting_interval``)."""
        return self.fresh_until - self.valid_after


@dataclass(frozen=True)
class Microdescriptor:
    """One microdescriptor (dir-spec §3.3), keyed by the digest the consensus ``m`` lines use."""

    digest: bytes
    ed25519_id: bytes | None
    ntor_onion_key: bytes | None


@dataclass(frozen=True)
class HSDirRelay:
    """A relay that can hold v3 onion-service descriptors (a member of the hash ring)."""

    fingerprint: str  # 40 upper-case hex characters
    nickname: str
    ed25519_id: bytes


@dataclass(frozen=True)
class HSDirParams:
    """Hash-ring sizes from the consensus (param-spec, hs_common.c ``hs_get_hsdir_*``)."""

    n_replicas: int
    spread_store: int
    spread_fetch: int


# --------------------------------------------------------------------------- helpers


def _error(lineno: int, message: str) -> ConsensusError:
    return ConsensusError(f"line {lineno}: {message}")


def _normalise(text: str | bytes, what: str) -> str:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConsensusError(f"{what} is not valid UTF-8") from exc
    # The control port hands out CRLF lines; the documents themselves use LF (dir-spec §1.2).
    return text.replace("\r\n", "\n")


def _decode_base64(value: str, length: int, lineno: int, what: str) -> bytes:
    """Decode base64 with or without padding (tor writes most digests unpadded)."""
    if not _BASE64_RE.fullmatch(value):
        raise _error(lineno, f"{what} is not base64")
    stripped = value.rstrip("=")
    padded = stripped + "=" * (-len(stripped) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _error(lineno, f"{what} is not base64") from exc
    if len(raw) != length:
        raise _error(lineno, f"{what} must be {length} bytes, got {len(raw)}")
    return raw


def _parse_int(value: str, lineno: int, what: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[+-]?[0-9]{1,20}", value):
        raise _error(lineno, f"{what} is not an integer: {value[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise _error(lineno, f"{what} out of range: {number}")
    return number


def _parse_time(args: list[str], lineno: int, keyword: str) -> int:
    # dir-spec §1.3: "YYYY-MM-DD HH:MM:SS" in UTC.
    if len(args) < 2 or not _DATE_RE.fullmatch(args[0]) or not _TIME_RE.fullmatch(args[1]):
        raise _error(lineno, f"{keyword} needs a time 'YYYY-MM-DD HH:MM:SS'")
    try:
        parsed = time.strptime(f"{args[0]} {args[1]}", "%Y-%m-%d %H:%M:%S")
    except ValueError as exc:
        raise _error(lineno, f"{keyword} has an invalid time") from exc
    return calendar.timegm(parsed)


def _lines(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """Yield (line number, keyword, arguments), skipping blank lines and objects."""
    in_object: str | None = None
    object_start = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if in_object is not None:
            if line.startswith("-----END ") and line.endswith("-----"):
                if line[len("-----END ") : -len("-----")] != in_object:
                    raise _error(lineno, f"object {in_object!r} ends with {line[:60]!r}")
                in_object = None
            continue
        if line.startswith("-----BEGIN ") and line.endswith("-----") and len(line) > 16:
            in_object = line[len("-----BEGIN ") : -len("-----")]
            object_start = lineno
            continue
        parts = line.split()
        if not parts:
            continue
        # dir-spec §1.2: the "opt" prefix is historical and ignored.
        if parts[0] == "opt" and len(parts) > 1:
            parts = parts[1:]
        yield lineno, parts[0], parts[1:]
    if in_object is not None:
        raise _error(object_start, f"object {in_object!r} is never closed")


def _parse_protocols(args: list[str], lineno: int) -> dict[str, frozenset[int]]:
    """dir-spec §2.1.1 protocol list: ``Name=1-3,5 Other=2``."""
    protocols: dict[str, set[int]] = {}
    for entry in args:
        name, sep, ranges = entry.partition("=")
        if not sep or not _PROTO_NAME_RE.fullmatch(name):
            raise _error(lineno, f"pr entry {entry[:40]!r} is not Name=versions")
        versions = protocols.setdefault(name, set())
        if not ranges:
            continue
        for part in ranges.split(","):
            low_s, dash, high_s = part.partition("-")
            low = _parse_int(low_s, lineno, f"pr {name} version", 0, _MAX_PROTOCOL_VERSION)
            high = (
                _parse_int(high_s, lineno, f"pr {name} version", 0, _MAX_PROTOCOL_VERSION)
                if dash
                else low
            )
            if high < low:
                raise _error(lineno, f"pr {name} has a reversed range {part!r}")
            versions.update(range(low, high + 1))
    return {name: frozenset(v) for name, v in protocols.items()}


def _parse_srv(args: list[str], lineno: int, keyword: str) -> bytes:
    # dir-spec §3.4.1 "shared-rand-current-value" SP NumReveals SP Value; Value is the base64
    # of 32 bytes, 44 characters with padding (shared_random_client.c sr_parse_srv).
    if len(args) < 2:
        raise _error(lineno, f"{keyword} needs NumReveals and Value")
    _parse_int(args[0], lineno, f"{keyword} NumReveals", 0, 2**64 - 1)
    return _decode_base64(args[1], 32, lineno, f"{keyword} value")


# --------------------------------------------------------------------------- consensus

_ONCE_HEADER = {
    "valid-after",
    "fresh-until",
    "valid-until",
    "params",
    "shared-rand-current-value",
    "shared-rand-previous-value",
    "vote-status",
}


class _EntryBuilder:
    def __init__(self, lineno: int, args: list[str]) -> None:
        # Microdesc flavour: r nickname identity date time IP ORPort DirPort (dir-spec §3.4.1;
        # ns_parse.c accepts extra arguments and ignores them).
        if len(args) < 7:
            raise _error(lineno, "r line needs nickname, identity, time, address and ports")
        nickname, identity_b64, date, clock, address, or_port, dir_port = args[:7]
        if not _NICKNAME_RE.fullmatch(nickname):
            raise _error(lineno, f"r line has an invalid nickname {nickname[:40]!r}")
        self.lineno = lineno
        self.nickname = nickname
        self.identity = _decode_base64(identity_b64, 20, lineno, "r line identity")
        _parse_time([date, clock], lineno, "r line")
        try:
            self.address = str(ipaddress.IPv4Address(address))
        except ValueError as exc:
            raise _error(lineno, f"r line has an invalid IPv4 address {address[:40]!r}") from exc
        self.or_port = _parse_int(or_port, lineno, "r line ORPort", 0, 65535)
        self.dir_port = _parse_int(dir_port, lineno, "r line DirPort", 0, 65535)
        self.digest: bytes | None = None
        self.flags: frozenset[str] = frozenset()
        self.protocols: dict[str, frozenset[int]] = {}
        self.ipv6: list[str] = []
        self.seen: set[str] = set()

    def add(self, lineno: int, keyword: str, args: list[str]) -> None:
        if keyword in ("m", "s", "pr"):
            if keyword in self.seen:
                raise _error(lineno, f"duplicate {keyword} line in entry for {self.nickname}")
            self.seen.add(keyword)
        if keyword == "m":
            if not args:
                raise _error(lineno, "m line needs a digest")
            self.digest = _decode_base64(args[0], 32, lineno, "m line digest")
        elif keyword == "s":
            self.flags = frozenset(args)
        elif keyword == "pr":
            self.protocols = _parse_protocols(args, lineno)
        elif keyword == "a":
            if not args:
                raise _error(lineno, "a line needs an address")
            self.ipv6.append(args[0])
        # v, w, p and unknown keywords are not needed here (dir-spec: ignore unknown lines).

    def build(self) -> RouterStatus:
        if self.digest is None:
            # ns_parse.c: a microdesc-flavour entry without "m" is rejected.
            raise _error(self.lineno, f"entry for {self.nickname} has no m line")
        return RouterStatus(
            nickname=self.nickname,
            identity=self.identity,
            address=self.address,
            or_port=self.or_port,
            dir_port=self.dir_port,
            microdesc_digest=self.digest,
            flags=self.flags,
            protocols=self.protocols,
            ipv6_addresses=tuple(self.ipv6),
        )


def parse_consensus(text: str | bytes) -> Consensus:
    """Parse a microdesc-flavoured consensus (dir-spec §3.4.1). Signatures are not checked:
    the text comes from our own tor, which verified it."""
    text = _normalise(text, "consensus")
    lines = _lines(text)
    first = next(lines, None)
    if first is None:
        raise ConsensusError("consensus is empty")
    lineno, keyword, args = first
    if keyword != "network-status-version" or args[:1] != ["3"]:
        raise _error(lineno, "consensus must start with 'network-status-version 3'")
    if args[1:2] != ["microdesc"]:
        raise _error(lineno, "not a microdesc-flavoured consensus")

    header: dict[str, tuple[int, list[str]]] = {}
    relays: list[RouterStatus] = []
    entry: _EntryBuilder | None = None
    in_footer = False
    for lineno, keyword, args in lines:
        if in_footer:
            continue
        if keyword in ("directory-footer", "directory-signature"):
            in_footer = True
            continue
        if keyword == "r":
            if entry is not None:
                relays.append(entry.build())
            entry = _EntryBuilder(lineno, args)
            continue
        if entry is not None:
            entry.add(lineno, keyword, args)
            continue
        if keyword == "network-status-version":
            raise _error(lineno, "duplicate network-status-version")
        if keyword in _ONCE_HEADER:
            if keyword in header:
                raise _error(lineno, f"duplicate {keyword} line")
            header[keyword] = (lineno, args)
    if entry is not None:
        relays.append(entry.build())

    if "vote-status" in header:
        lineno, args = header["vote-status"]
        if args[:1] != ["consensus"]:
            raise _error(lineno, "vote-status is not 'consensus'")

    def required_time(keyword: str) -> int:
        if keyword not in header:
            raise ConsensusError(f"consensus has no {keyword} line")
        lineno, args = header[keyword]
        return _parse_time(args, lineno, keyword)

    valid_after = required_time("valid-after")
    fresh_until = required_time("fresh-until")
    valid_until = required_time("valid-until")
    if fresh_until <= valid_after:
        lineno = header["fresh-until"][0]
        raise _error(lineno, "fresh-until must be after valid-after")
    if valid_until < fresh_until:
        lineno = header["valid-until"][0]
        raise _error(lineno, "valid-until must not be before fresh-until")

    params: dict[str, int] = {}
    if "params" in header:
        lineno, args = header["params"]
        for item in args:
            # dir-spec §3.4.1: Keyword=Int32; ns_parse.c rejects anything else.
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise _error(lineno, f"params entry {item[:40]!r} is not Keyword=Value")
            params[name] = _parse_int(value, lineno, f"param {name}", _INT32_MIN, _INT32_MAX)

    srv_current = srv_previous = None
    if "shared-rand-current-value" in header:
        lineno, args = header["shared-rand-current-value"]
        srv_current = _parse_srv(args, lineno, "shared-rand-current-value")
    if "shared-rand-previous-value" in header:
        lineno, args = header["shared-rand-previous-value"]
        srv_previous = _parse_srv(args, lineno, "shared-rand-previous-value")

    return Consensus(
        valid_after=valid_after,
        fresh_until=fresh_until,
        valid_until=valid_until,
        params=params,
        srv_current=srv_current,
        srv_previous=srv_previous,
        relays=tuple(relays),
    )


def get_param(consensus: Consensus, name: str, default: int, minimum: int, maximum: int) -> int:
    """A consensus parameter, clamped like networkstatus.c ``networkstatus_get_param``
    (absent: ``default``; below ``minimum`` or above ``maximum``: the bound)."""
    value = consensus.params.get(name, default)
    return max(minimum, min(maximum, value))


def hsdir_params(consensus: Consensus) -> HSDirParams:
    """Hash-ring parameters with tor's defaults and ranges (param-spec; hs_common.c
    ``hs_get_hsdir_n_replicas`` [1,16] default 2, ``hs_get_hsdir_spread_store`` [1,128]
    default 4, ``hs_get_hsdir_spread_fetch`` [1,128] default 3)."""
    return HSDirParams(
        n_replicas=get_param(consensus, "hsdir_n_replicas", 2, 1, 16),
        spread_store=get_param(consensus, "hsdir_spread_store", 4, 1, 128),
        spread_fetch=get_param(consensus, "hsdir_spread_fetch", 3, 1, 128),
    )


def time_params(consensus: Consensus) -> TimeParams:
    """The network's time-period parameters, derived from the consensus as tor does.

    hs_common.c ``get_time_period_length``: the ``hsdir_interval`` parameter (minutes, clamped
    to [30, 14400]) on a normal network; with ``TestingTorNetwork``, one SR protocol run
    (24 voting intervals). We cannot see tor's TestingTorNetwork option, so without the
    parameter we use 24 voting intervals, which is 1440 on the live network (3600 s voting)
    and tor's value on every test network. Rotation offset: one SR phase, 12 voting intervals
    (``sr_state_get_phase_duration``).
    """
    interval = consensus.voting_interval
    if _HSDIR_INTERVAL_PARAM in consensus.params:
        period_length = get_param(
            consensus,
            _HSDIR_INTERVAL_PARAM,
            1440,
            _HS_TIME_PERIOD_LENGTH_MIN,
            _HS_TIME_PERIOD_LENGTH_MAX,
        )
    else:
        period_length = SHARED_RANDOM_N_ROUNDS * SHARED_RANDOM_N_PHASES * interval // 60
    if period_length < 1:
        raise ConsensusError(
            f"voting interval of {interval} s is too short for a time period of whole minutes"
        )
    return TimeParams(
        period_length_minutes=period_length,
        rotation_offset_minutes=SHARED_RANDOM_N_ROUNDS * interval // 60,
        voting_interval_seconds=interval,
    )


# --------------------------------------------------------------------------- microdescriptors


def _split_microdescriptors(text: str) -> list[tuple[int, str]]:
    """Split into (first line number, body) per microdescriptor.

    microdesc_parse.c ``find_start_of_next_microdesc`` / ``microdesc_extract_body``: a body
    starts at its "onion-key" line and runs up to the next line that starts with "@" (an
    annotation such as ``@last-listed``) or "onion-key", or to the end; annotations are not
    part of the body and so not of the digest.
    """
    bodies: list[tuple[int, str]] = []
    current: list[str] | None = None
    start_line = 0
    lines = text.split("\n")
    # A trailing "" after the final newline is not a line.
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, line in enumerate(lines, start=1):
        if line.startswith("@"):
            if current is not None:
                bodies.append((start_line, "\n".join(current) + "\n"))
                current = None
            continue
        if line.startswith("onion-key"):
            if current is not None:
                bodies.append((start_line, "\n".join(current) + "\n"))
            current = [line]
            start_line = lineno
            continue
        if current is None:
            if line.strip():
                raise _error(lineno, "text before the first onion-key line")
            continue
        current.append(line)
    if current is not None:
        # Every microdescriptor body ends with a newline (dir-spec §1.2); one lost at the very
        # end of a control-port data block is restored so the digest still matches.
        bodies.append((start_line, "\n".join(current) + "\n"))
    return bodies


def _parse_microdescriptor(start_line: int, body: str) -> Microdescriptor:
    try:
        raw = body.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _error(start_line, "microdescriptor is not encodable text") from exc
    # dir-spec §3.3 / microdesc_parse.c: the digest is SHA-256 over the body.
    digest = hashlib.sha256(raw).digest()
    ed25519_id: bytes | None = None
    ntor_key: bytes | None = None
    for offset, keyword, args in _lines(body):
        lineno = start_line + offset - 1
        if keyword == "onion-key" and offset != 1:
            raise _error(lineno, "second onion-key line in one microdescriptor")
        if keyword == "ntor-onion-key":
            if ntor_key is not None:
                raise _error(lineno, "duplicate ntor-onion-key line")
            if not args:
                raise _error(lineno, "ntor-onion-key needs a key")
            ntor_key = _decode_base64(args[0], 32, lineno, "ntor-onion-key")
        elif keyword == "id":
            # dir-spec §3.3: "id" SP id-type SP id; microdesc_parse.c rejects a second
            # ed25519 id and ignores other id types.
            if len(args) < 2:
                raise _error(lineno, "id line needs a type and a value")
            if args[0] == "ed25519":
                if ed25519_id is not None:
                    raise _error(lineno, "extra ed25519 id in microdescriptor")
                ed25519_id = _decode_base64(args[1], 32, lineno, "ed25519 id")
    return Microdescriptor(digest=digest, ed25519_id=ed25519_id, ntor_onion_key=ntor_key)


def parse_microdescriptors(text: str | bytes) -> dict[bytes, Microdescriptor]:
    """Parse concatenated microdescriptors (``GETINFO md/all``, ``cached-microdescs``), with or
    without ``@`` annotations, keyed by their SHA-256 digest (the consensus ``m`` value)."""
    text = _normalise(text, "microdescriptors")
    result: dict[bytes, Microdescriptor] = {}
    for start_line, body in _split_microdescriptors(text):
        md = _parse_microdescriptor(start_line, body)
        result[md.digest] = md
    return result


def hsdir_relays(
    consensus: Consensus, microdescriptors: Mapping[bytes, Microdescriptor]
) -> list[HSDirRelay]:
    """The members of the v3 HSDir hash ring, in consensus order.

    hs_common.c ``hs_get_responsible_hsdirs`` takes every routerstatus with the ``HSDir`` flag
    whose node supports ``HSDir=2`` (nodelist.c ``node_supports_v3_hsdir``) and has a
    descriptor with an ed25519 identity (``node_has_hsdir_index``, ``node_get_ed25519_id``).
    """
    result: list[HSDirRelay] = []
    for relay in consensus.relays:
        if "HSDir" not in relay.flags or not relay.supports("HSDir", _PROTOVER_HSDIR_V3):
            continue
        md = microdescriptors.get(relay.microdesc_digest)
        if md is None or md.ed25519_id is None or md.ed25519_id == bytes(32):
            continue
        result.append(HSDirRelay(relay.fingerprint, relay.nickname, md.ed25519_id))
    return result
