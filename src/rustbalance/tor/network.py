"""The network view and the publish/fetch primitives, over one control connection.

What lives here is the asyncio glue between tor's control port and the pure layers:

* :func:`read_network_view`: the microdesc consensus and the microdescriptors (for the relays'
  ed25519 ids), turned into time parameters, SRVs and the HSDir ring (tor.md sections 3-4).
* :func:`upload_descriptor`: ``+HSPOST`` of one descriptor to an explicit list of HSDirs, and
  the per-HSDir outcome from ``HS_DESC UPLOADED/FAILED`` events (tor.md section 9.3: the
  ``250 OK`` only means the outer document parsed).
* :func:`upload_per_hsdir`: "this descriptor to this HSDir only", for distinct descriptors
  per HSDir (docs/distinct-descriptors.md): one ``+HSPOST SERVER=`` per distinct text, every
  HSDir's verdict.
* :func:`fetch_descriptor`: ``HSFETCH`` and the verified, decrypted descriptor from
  ``HS_DESC_CONTENT``, or a typed :class:`FetchError`.
* :func:`fetch_per_hsdir`: ``HSFETCH SERVER=...`` and what *each* named HSDir serves
  (fetch-back verification per HSDir).
* :func:`read_own_descriptor`: a hosted service's first descriptor (``hs/service/desc/id``).
* :func:`publish_master`: build both master descriptors ([FIRSTDESCUPLOAD] and
  [SECONDDESCUPLOAD]) and upload each to its own responsible HSDirs; in two steps,
  :func:`plan_master_descriptors` (build, sign, name the HSDirs) and :func:`upload_planned`
  (upload one, log and report the outcome), so a caller can upload through its own
  :data:`Upload` (the node daemon's tor network interface).

Decisions are made by the pure modules (``crypto``, ``descriptor``, ``tor.consensus``,
``tor.hashring``); this module only moves bytes and waits, always with a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from rustbalance.crypto.blinding import BlindedKey, blind_identity, blind_public_key
from rustbalance.crypto.keys import IdentityKey
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.crypto.revision import OPE_INPUT_MAX, revision_counter
from rustbalance.crypto.time_period import (
    DescriptorTarget,
    TimeParams,
    client_fetch_target,
    descriptor_targets,
    time_period_num,
)
from rustbalance.descriptor.builder import PowParams, build_descriptor
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.parser import DecodedDescriptor, decode_descriptor
from rustbalance.errors import ControlError, DescriptorError
from rustbalance.tor.consensus import (
    Consensus,
    HSDirParams,
    HSDirRelay,
    hsdir_params,
    hsdir_relays,
    parse_consensus,
    parse_microdescriptors,
    time_params,
)
from rustbalance.tor.control import ControlTimeoutError, Subscription
from rustbalance.tor.control_protocol import (
    ControlProtocolError,
    ControlReplyError,
    Event,
    HsDescContentEvent,
    HsDescEvent,
)
from rustbalance.tor.hashring import responsible_hsdirs

__all__ = [
    "Controller",
    "FetchError",
    "HsDirFetch",
    "HsDirUpload",
    "NetworkView",
    "PeriodPublish",
    "PlannedDescriptor",
    "Upload",
    "control_upload",
    "fetch_descriptor",
    "fetch_per_hsdir",
    "plan_master_descriptors",
    "publish_master",
    "read_network_view",
    "read_own_descriptor",
    "upload_descriptor",
    "upload_per_hsdir",
    "upload_planned",
]

log = logging.getLogger(__name__)

Randbytes = Callable[[int], bytes]
PeriodLabel = Literal["current", "next"]


class Controller(Protocol):
    """What this module needs of a control session (ControlConnection or
    ReconnectingController both fit)."""

    async def get_info(self, *keys: str) -> dict[str, str]: ...

    async def subscribe(self, *event_types: str, maxsize: int = 1024) -> Subscription: ...

    async def hs_fetch(self, address: str, servers: Iterable[str] = ()) -> None: ...

    async def hs_post(
        self, descriptor_text: str, address: str, servers: Iterable[str] = ()
    ) -> None: ...


class FetchError(ControlError):
    """A descriptor fetch failed. ``reason`` is tor's (``NOT_FOUND``, ``QUERY_REJECTED``...),
    or ``TIMEOUT`` or ``BAD_DESCRIPTOR``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _bare(address: str) -> str:
    """``<56 chars>`` from ``<56 chars>[.onion]``; validates the address on the way."""
    decode_onion_address(address)
    text = address.strip().lower()
    return text[: -len(".onion")] if text.endswith(".onion") else text


# --------------------------------------------------------------------------- network view


@dataclass(frozen=True)
class NetworkView:
    """What the live consensus says that publishing and fetching depend on."""

    consensus: Consensus
    time_params: TimeParams
    hsdir_params: HSDirParams
    hsdirs: tuple[HSDirRelay, ...]

    @property
    def valid_after(self) -> int:
        return self.consensus.valid_after

    @property
    def period_length(self) -> int:
        return self.time_params.period_length_minutes

    def descriptor_targets(self) -> tuple[DescriptorTarget, DescriptorTarget]:
        """(first, second) = tor's ``desc_current`` and ``desc_next`` (tor.md section 3.2).
        Time comes from the consensus valid-after, as tor does, never the local clock."""
        c = self.consensus
        return descriptor_targets(c.valid_after, self.time_params, c.srv_current, c.srv_previous)

    def current_time_period(self) -> int:
        return time_period_num(self.consensus.valid_after, self.time_params)

    def candidate_time_periods(self) -> tuple[int, ...]:
        """Periods a descriptor we fetch may belong to (both of a service's descriptors and a
        neighbour on either side, for clocks and consensuses that differ a little)."""
        tp = self.current_time_period()
        return (tp - 1, tp, tp + 1)

    def store_hsdirs(self, blinded_key: bytes, target: DescriptorTarget) -> list[HSDirRelay]:
        """The HSDirs a descriptor for ``target`` must be uploaded to ([WHERE-HSDESC])."""
        return responsible_hsdirs(
            blinded_key,
            target.time_period,
            self.period_length,
            target.srv,
            self.hsdirs,
            self.hsdir_params.n_replicas,
            self.hsdir_params.spread_store,
        )

    def target_fetch_hsdirs(self, blinded_key: bytes, target: DescriptorTarget) -> list[HSDirRelay]:
        """The HSDirs clients ask for ``target``'s descriptor once its period is the current
        one: the same ring as :meth:`store_hsdirs` (tor ``nodelist.c``
        ``node_set_hsdir_index`` copies the fetch index into the store index of the matching
        descriptor), with ``hsdir_spread_fetch`` per replica instead of
        ``hsdir_spread_store``. A prefix-closed subset of the store list when fetch <= store
        (docs/distinct-descriptors.md)."""
        return responsible_hsdirs(
            blinded_key,
            target.time_period,
            self.period_length,
            target.srv,
            self.hsdirs,
            self.hsdir_params.n_replicas,
            self.hsdir_params.spread_fetch,
        )

    def fetch_hsdirs(self, address: str) -> list[HSDirRelay]:
        """The HSDirs a client asks for ``address`` now (hsdir_spread_fetch per replica)."""
        c = self.consensus
        tp, srv = client_fetch_target(
            c.valid_after, self.time_params, c.srv_current, c.srv_previous
        )
        blinded = blind_public_key(decode_onion_address(address), tp, self.period_length)
        return responsible_hsdirs(
            blinded,
            tp,
            self.period_length,
            srv,
            self.hsdirs,
            self.hsdir_params.n_replicas,
            self.hsdir_params.spread_fetch,
        )


def network_view_from_documents(consensus_text: str, microdescriptors_text: str) -> NetworkView:
    """Pure: build a :class:`NetworkView` from the two documents tor hands out."""
    consensus = parse_consensus(consensus_text)
    mds = parse_microdescriptors(microdescriptors_text)
    return NetworkView(
        consensus=consensus,
        time_params=time_params(consensus),
        hsdir_params=hsdir_params(consensus),
        hsdirs=tuple(hsdir_relays(consensus, mds)),
    )


async def read_network_view(ctrl: Controller) -> NetworkView:
    """Read the consensus and microdescriptors through ``ctrl`` (tor >= 0.4.3.1-alpha)."""
    consensus_key = "dir/status-vote/current/consensus-microdesc"
    consensus_text = (await ctrl.get_info(consensus_key))[consensus_key]
    md_text = (await ctrl.get_info("md/all"))["md/all"]
    return network_view_from_documents(consensus_text, md_text)


async def _events_until(sub: Subscription, timeout: float) -> AsyncIterator[Event]:  # noqa: ASYNC109
    """The subscription's events until ``timeout`` seconds from now have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (remaining := deadline - loop.time()) > 0:
        try:
            yield await sub.get(remaining)
        except ControlTimeoutError:
            return


# --------------------------------------------------------------------------- upload


@dataclass(frozen=True)
class HsDirUpload:
    """The outcome of one upload at one HSDir."""

    fingerprint: str
    nickname: str
    ok: bool
    reason: str | None = None  # tor's REASON= (e.g. UPLOAD_REJECTED), or TIMEOUT

    def to_dict(self) -> dict[str, object]:
        return {
            "hsdir": self.fingerprint,
            "nickname": self.nickname,
            "ok": self.ok,
            "reason": self.reason,
        }


async def upload_descriptor(
    ctrl: Controller,
    descriptor: str,
    address: str,
    hsdirs: Sequence[HSDirRelay],
    *,
    timeout: float = 60.0,  # noqa: ASYNC109
) -> list[HsDirUpload]:
    """``+HSPOST SERVER=<fp>... HSADDRESS=<addr>`` of one descriptor to every HSDir in
    ``hsdirs``, and every HSDir's verdict (see :func:`upload_per_hsdir`)."""
    if not hsdirs:
        raise ControlError("no HSDirs to upload to")
    return await upload_per_hsdir(
        ctrl, address, [(relay, descriptor) for relay in hsdirs], timeout=timeout
    )


async def upload_per_hsdir(
    ctrl: Controller,
    address: str,
    uploads: Sequence[tuple[HSDirRelay, str]],
    *,
    timeout: float = 60.0,  # noqa: ASYNC109
) -> list[HsDirUpload]:
    """Upload each descriptor to its own HSDir only, and wait for every HSDir's verdict.

    One ``+HSPOST SERVER=<fp>... HSADDRESS=<addr>`` per distinct descriptor text, naming the
    HSDirs that get that text (so a single descriptor for all HSDirs is one HSPOST, as
    before). Each HSDir may appear once: the ``HS_DESC UPLOADED/FAILED`` events name the
    HSDir and the address, not the upload, so two uploads of one address to one HSDir could
    not be told apart. For the same reason uploads of the same address must not overlap, so
    callers serialise them (one descriptor target after the other).

    HSDirs that never answer within ``timeout`` are reported with reason ``TIMEOUT``; the
    HSDirs of an HSPOST tor refuses (``552`` for an HSDir no longer in its consensus, ``554``
    for a descriptor it cannot parse) with ``REFUSED <code>``, unless every HSPOST was
    refused: then tor's :class:`ControlReplyError` is raised. An
    ``HS_DESC UPLOAD`` event for an HSDir means tor's own service is uploading there too (its
    native publishing, tor.md section 9.3: our HSPOST uploads come without one); that HSDir's
    next verdict is tor's, so we skip one verdict. Results come in the order of ``uploads``.
    """
    if not uploads:
        raise ControlError("no HSDirs to upload to")
    bare = _bare(address)
    pending: dict[str, HSDirRelay] = {}
    by_text: dict[str, list[str]] = {}
    for relay, text in uploads:
        fp = relay.fingerprint.upper()
        if fp in pending:
            raise ControlError(f"HSDir {fp} is named twice in one upload round")
        pending[fp] = relay
        by_text.setdefault(text, []).append(fp)
    order = list(pending)
    results: dict[str, HsDirUpload] = {}
    native_in_flight: dict[str, int] = {}
    refused: ControlReplyError | None = None
    sub = await ctrl.subscribe("HS_DESC")
    try:
        for text, fingerprints in by_text.items():
            try:
                await ctrl.hs_post(text, bare, fingerprints)
            except ControlReplyError as exc:
                # e.g. 552 for an HSDir that left tor's consensus since our view: the other
                # texts still go out; these HSDirs get the refusal as their verdict.
                refused = exc
                for fp in fingerprints:
                    relay = pending.pop(fp)
                    results[fp] = HsDirUpload(fp, relay.nickname, False, f"REFUSED {exc.code}")
        if refused is not None and len(results) == len(order):
            raise refused  # nothing went out: the caller sees tor's reply, as before
        async for raw in _events_until(sub, timeout):
            try:
                event = HsDescEvent.from_event(raw)
            except ControlProtocolError as exc:
                log.warning("ignoring malformed HS_DESC event: %s", exc)
                continue
            fp = (event.hsdir_fingerprint or "").upper()
            if event.address.lower() != bare or fp not in pending:
                continue
            if event.action == "UPLOAD":
                native_in_flight[fp] = native_in_flight.get(fp, 0) + 1
                continue
            if event.action not in ("UPLOADED", "FAILED"):
                continue
            if native_in_flight.get(fp, 0) > 0:
                native_in_flight[fp] -= 1
                continue
            relay = pending.pop(fp)
            results[fp] = HsDirUpload(
                fp, relay.nickname, event.action == "UPLOADED", event.reason or None
            )
            if not pending:
                break  # every HSDir answered: do not wait for the deadline
    finally:
        await sub.aclose()
    for fp, relay in pending.items():
        results[fp] = HsDirUpload(fp, relay.nickname, False, "TIMEOUT")
    return [results[fp] for fp in order]


# --------------------------------------------------------------------------- fetch


def decode_for_view(
    text: str,
    address: str,
    view: NetworkView,
    *,
    now: int | None = None,
    client_auth_key: bytes | None = None,
) -> DecodedDescriptor:
    """Verify and decrypt a descriptor of ``address`` against the periods ``view`` allows."""
    return decode_descriptor(
        text,
        address,
        now=int(time.time()) if now is None else now,
        period_length=view.period_length,
        time_periods=view.candidate_time_periods(),
        client_auth_key=client_auth_key,
    )


async def fetch_descriptor(
    ctrl: Controller,
    address: str,
    view: NetworkView,
    *,
    servers: Iterable[str] = (),
    timeout: float = 60.0,  # noqa: ASYNC109
    client_auth_key: bytes | None = None,
) -> DecodedDescriptor:
    """``HSFETCH`` ``address`` and return its verified, decrypted descriptor.

    Without ``servers`` we name the HSDirs a client would ask now (``hsdir_spread_fetch`` per
    replica) ourselves: left to pick, tor skips any HSDir it asked for this address in the last
    15 minutes (``hs_client.c`` requery period), so repeated fetches (verification after every
    upload) would soon fail with no HSDir left to ask.

    Raises :class:`FetchError` with tor's reason when every HSDir asked failed, ``TIMEOUT``
    when nothing conclusive arrived in time, ``BAD_DESCRIPTOR`` when what arrived does not
    verify (tor only emits a body after its own checks; we check again, tor.md section 6.6).
    """
    bare = _bare(address)
    chosen = list(servers) or [relay.fingerprint for relay in view.fetch_hsdirs(bare)]
    outstanding: set[str] = set()
    reasons: list[str] = []
    sub = await ctrl.subscribe("HS_DESC", "HS_DESC_CONTENT")
    try:
        await ctrl.hs_fetch(bare, chosen)
        async for raw in _events_until(sub, timeout):
            try:
                if raw.type == "HS_DESC_CONTENT":
                    content = HsDescContentEvent.from_event(raw)
                    if content.address.lower() != bare or not content.descriptor.strip():
                        continue
                    try:
                        return decode_for_view(
                            content.descriptor, bare, view, client_auth_key=client_auth_key
                        )
                    except DescriptorError as exc:
                        raise FetchError(
                            "BAD_DESCRIPTOR", f"descriptor of {bare}.onion does not verify: {exc}"
                        ) from exc
                event = HsDescEvent.from_event(raw)
            except ControlProtocolError as exc:
                log.warning("ignoring malformed %s event: %s", raw.type, exc)
                continue
            if event.address.lower() != bare:
                continue
            if event.action == "REQUESTED":
                outstanding.add(event.hsdir)
            elif event.action == "FAILED":
                outstanding.discard(event.hsdir)
                reasons.append(event.reason or "UNKNOWN")
                if not outstanding:
                    break
            elif event.action == "RECEIVED":
                outstanding.discard(event.hsdir)
    finally:
        await sub.aclose()
    if reasons:
        reason = reasons[-1]
        raise FetchError(reason, f"fetching {bare}.onion failed: {', '.join(reasons)}")
    raise FetchError("TIMEOUT", f"no descriptor for {bare}.onion within {timeout:g} s")


@dataclass(frozen=True)
class HsDirFetch:
    """What one HSDir served: the verified descriptor, or why there is none (tor's REASON=,
    e.g. ``NOT_FOUND``; ``BAD_DESCRIPTOR`` when it does not verify for us; ``TIMEOUT``)."""

    fingerprint: str
    nickname: str
    descriptor: DecodedDescriptor | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.descriptor is not None


async def fetch_per_hsdir(
    ctrl: Controller,
    address: str,
    view: NetworkView,
    hsdirs: Sequence[HSDirRelay],
    *,
    timeout: float = 60.0,  # noqa: ASYNC109
    client_auth_key: bytes | None = None,
) -> list[HsDirFetch]:
    """``HSFETCH <addr> SERVER=<fp>...`` and the verified descriptor *each* HSDir serves.

    tor sends one request per named HSDir, bypassing its own HSDir choice and its 15-minute
    requery rule (``hs_client.c`` ``hs_client_launch_v3_desc_fetch``), always for the blinded
    key of the *current* time period (``directory_launch_v3_desc_fetch``): only the
    descriptor clients use now can be fetched back. Each ``HS_DESC_CONTENT`` event names its
    HSDir, and tor emits the body even when its own cache keeps a newer descriptor
    (``client_dir_fetch_200`` passes the fetched body), so every HSDir's own answer is seen.
    Results come in the order of ``hsdirs``.
    """
    if not hsdirs:
        raise ControlError("no HSDirs to fetch from")
    bare = _bare(address)
    pending: dict[str, HSDirRelay] = {}
    for relay in hsdirs:
        fp = relay.fingerprint.upper()
        if fp in pending:
            raise ControlError(f"HSDir {fp} is named twice in one fetch")
        pending[fp] = relay
    order = list(pending)
    results: dict[str, HsDirFetch] = {}

    def settle(fp: str, descriptor: DecodedDescriptor | None, reason: str | None) -> None:
        relay = pending.pop(fp)
        results[fp] = HsDirFetch(fp, relay.nickname, descriptor, reason)

    sub = await ctrl.subscribe("HS_DESC", "HS_DESC_CONTENT")
    try:
        await ctrl.hs_fetch(bare, order)
        async for raw in _events_until(sub, timeout):
            try:
                if raw.type == "HS_DESC_CONTENT":
                    content = HsDescContentEvent.from_event(raw)
                    fp = (content.hsdir_fingerprint or "").upper()
                    body = content.descriptor
                    if content.address.lower() != bare or fp not in pending or not body.strip():
                        continue  # a failure's empty body: its HS_DESC FAILED decides
                    try:
                        decoded = decode_for_view(body, bare, view, client_auth_key=client_auth_key)
                    except DescriptorError as exc:
                        log.warning(
                            "HSDir %s serves a descriptor that does not verify: %s", fp, exc
                        )
                        settle(fp, None, "BAD_DESCRIPTOR")
                    else:
                        settle(fp, decoded, None)
                else:
                    event = HsDescEvent.from_event(raw)
                    fp = (event.hsdir_fingerprint or "").upper()
                    if event.address.lower() != bare or fp not in pending:
                        continue
                    if event.action == "FAILED":
                        settle(fp, None, event.reason or "UNKNOWN")
            except ControlProtocolError as exc:
                log.warning("ignoring malformed %s event: %s", raw.type, exc)
                continue
            if not pending:
                break
    finally:
        await sub.aclose()
    for fp, relay in pending.items():
        results[fp] = HsDirFetch(fp, relay.nickname, None, "TIMEOUT")
    return [results[fp] for fp in order]


async def read_own_descriptor(
    ctrl: Controller, address: str, view: NetworkView
) -> DecodedDescriptor:
    """The first descriptor (``desc_current``) of a service this tor hosts, verified.

    ``551`` (no descriptor built yet) surfaces as :class:`ControlReplyError`.
    """
    bare = _bare(address)
    key = f"hs/service/desc/id/{bare}"
    text = (await ctrl.get_info(key))[key]
    return decode_for_view(text, bare, view)


# --------------------------------------------------------------------------- publish


@dataclass(frozen=True)
class PeriodPublish:
    """One of the two master descriptors: what was built and where it went."""

    label: PeriodLabel
    time_period: int
    revision_counter: int
    intro_points: int
    hsdirs: tuple[HsDirUpload, ...] = ()
    error: str | None = None
    descriptor: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        """At least one responsible HSDir accepted the descriptor."""
        return self.error is None and any(result.ok for result in self.hsdirs)


@dataclass
class RevisionClock:
    """Keeps revision counters strictly increasing per blinded key: an HSDir rejects a
    descriptor whose counter is not greater than the one it holds (tor.md section 7), and
    two publishes within one second would otherwise compute the same OPE value."""

    last_input: dict[bytes, int] = field(default_factory=dict)
    # Per blinded key, a counter the next one must exceed: another publisher's descriptor on
    # the HSDirs (an earlier Onionbalance, a tor that hosted the key), which an HSDir only
    # replaces with a strictly greater counter (hs_cache.c cache_store_v3_as_dir).
    floors: dict[bytes, int] = field(default_factory=dict)

    def seconds(self, blinded_key: bytes, now: int) -> int:
        value = max(now, self.last_input.get(blinded_key, now - 1) + 1)
        self.last_input[blinded_key] = value
        return value

    def exceed(self, blinded_key: bytes, counter: int) -> None:
        """Make the next counter of ``blinded_key`` greater than ``counter``."""
        self.floors[blinded_key] = max(counter, self.floors.get(blinded_key, counter))

    def counter(self, blinded: BlindedKey, srv_run_start: int, now: int) -> int:
        """The next revision counter of ``blinded``: tor's (seconds since the SRV run start,
        rend-spec-v3 appendix F), strictly increasing, and above any floor (:meth:`exceed`):
        then the first second whose counter is above it (the OPE is monotonic: a binary
        search), within tor's OPE input range (crypto/revision.py)."""
        key = blinded.public_key
        seconds = self.seconds(key, now)
        value = revision_counter(blinded, srv_run_start, seconds)
        floor = self.floors.get(key)
        if floor is None or value > floor:
            return value
        low, high = seconds, srv_run_start + OPE_INPUT_MAX - 1  # counter(low) <= floor
        if revision_counter(blinded, srv_run_start, high) <= floor:
            return value  # no counter of this run is above it: the HSDirs keep theirs
        while high - low > 1:
            middle = (low + high) // 2
            if revision_counter(blinded, srv_run_start, middle) > floor:
                high = middle
            else:
                low = middle
        self.last_input[key] = high
        del self.floors[key]
        return revision_counter(blinded, srv_run_start, high)


@dataclass(frozen=True)
class PlannedDescriptor:
    """One master descriptor ready to upload: its period, its signed text and the HSDirs it
    goes to (rend-spec-v3 [WHERE-HSDESC]); ``error`` says why it could not be built.

    Today a plan holds one per period, the first and the second descriptor ([FIRSTDESCUPLOAD],
    [SECONDDESCUPLOAD]); it may hold several per period (one per responsible HSDir), each
    uploaded and reported on its own."""

    label: PeriodLabel
    time_period: int
    revision_counter: int
    intro_points: int
    address: str
    hsdirs: tuple[HSDirRelay, ...] = ()
    text: str = field(default="", repr=False)
    error: str | None = None


# Uploads one planned descriptor to its HSDirs within ``timeout`` seconds.
Upload = Callable[[PlannedDescriptor, float], Awaitable[list[HsDirUpload]]]


def plan_master_descriptors(
    identity: IdentityKey,
    intro_points: Sequence[IntroPoint],
    view: NetworkView,
    *,
    now: int,
    randbytes: Randbytes = secrets.token_bytes,
    revision_clock: RevisionClock | None = None,
    flow_control: str | None = None,
    pow_params: PowParams | None = None,
    client_auth_keys: Sequence[bytes] = (),
    lifetime_minutes: int = 180,
    periods: Collection[PeriodLabel] = ("current", "next"),
) -> list[PlannedDescriptor]:
    """Build and sign the first ("current") and second ("next") master descriptors and name
    each one's responsible HSDirs. One that cannot be built is planned with its ``error``, so
    a failure of one never discards the other. ``periods`` names the ones to plan (both by
    default; a lone node carrying ``pow-params`` plans only the first: docs/pow.md)."""
    clock = revision_clock or RevisionClock()
    address = identity.onion_address
    planned: list[PlannedDescriptor] = []
    labels: tuple[PeriodLabel, PeriodLabel] = ("current", "next")
    for label, target in zip(labels, view.descriptor_targets(), strict=True):
        if label not in periods:
            continue
        blinded = blind_identity(identity, target.time_period, view.period_length)
        counter = 0
        try:
            counter = clock.counter(blinded, target.srv_run_start, now)
            text = build_descriptor(
                identity_public_key=identity.public_key,
                blinded=blinded,
                intro_points=intro_points,
                revision_counter=counter,
                now=now,
                randbytes=randbytes,
                lifetime_minutes=lifetime_minutes,
                client_auth_keys=client_auth_keys,
                flow_control=flow_control,
                pow_params=pow_params,
            )
            hsdirs = tuple(view.store_hsdirs(blinded.public_key, target))
            error: str | None = None
        except DescriptorError as exc:
            text, hsdirs, error = "", (), str(exc)
        planned.append(
            PlannedDescriptor(
                label, target.time_period, counter, len(intro_points), address, hsdirs, text, error
            )
        )
    return planned


async def upload_planned(
    upload: Upload,
    planned: PlannedDescriptor,
    *,
    timeout: float = 60.0,  # noqa: ASYNC109
) -> PeriodPublish:
    """Upload one planned descriptor with ``upload``; the outcome, never an exception for a
    failed upload (it is logged and reported in :attr:`PeriodPublish.error`)."""
    label = planned.label
    failed = PeriodPublish(
        label, planned.time_period, planned.revision_counter, planned.intro_points
    )
    if planned.error is not None:
        log.warning("publishing the %s descriptor failed: %s", label, planned.error)
        return dataclasses.replace(failed, error=planned.error)
    try:
        uploads = await upload(planned, timeout)
    except (ControlError, DescriptorError) as exc:
        log.warning("publishing the %s descriptor failed: %s", label, exc)
        return dataclasses.replace(failed, error=str(exc))
    accepted = sum(1 for result in uploads if result.ok)
    log.info(
        "Published %s descriptor (period %d, revision %d, %d intro points) to %d of %d HSDirs",
        label,
        planned.time_period,
        planned.revision_counter,
        planned.intro_points,
        accepted,
        len(uploads),
    )
    return dataclasses.replace(failed, hsdirs=tuple(uploads), descriptor=planned.text)


def control_upload(ctrl: Controller) -> Upload:
    """The :data:`Upload` that HSPOSTs through ``ctrl`` (:func:`upload_descriptor`)."""

    async def upload(planned: PlannedDescriptor, timeout: float) -> list[HsDirUpload]:  # noqa: ASYNC109
        return await upload_descriptor(
            ctrl, planned.text, planned.address, planned.hsdirs, timeout=timeout
        )

    return upload


async def publish_master(
    ctrl: Controller,
    identity: IdentityKey,
    intro_points: Sequence[IntroPoint],
    view: NetworkView,
    *,
    now: int | None = None,
    randbytes: Randbytes = secrets.token_bytes,
    revision_clock: RevisionClock | None = None,
    flow_control: str | None = None,
    pow_params: PowParams | None = None,
    client_auth_keys: Sequence[bytes] = (),
    lifetime_minutes: int = 180,
    upload_timeout: float = 60.0,
    periods: Collection[PeriodLabel] = ("current", "next"),
) -> dict[PeriodLabel, PeriodPublish]:
    """Build the first ("current") and second ("next") master descriptors and upload each to
    its responsible HSDirs, one after the other. A failure of one never discards the other.
    ``periods`` names the ones to build and upload (both by default)."""
    planned = plan_master_descriptors(
        identity,
        intro_points,
        view,
        now=int(time.time()) if now is None else now,
        randbytes=randbytes,
        revision_clock=revision_clock,
        flow_control=flow_control,
        pow_params=pow_params,
        client_auth_keys=client_auth_keys,
        lifetime_minutes=lifetime_minutes,
        periods=periods,
    )
    upload = control_upload(ctrl)
    return {p.label: await upload_planned(upload, p, timeout=upload_timeout) for p in planned}
