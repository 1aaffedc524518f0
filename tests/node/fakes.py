"""Test doubles for the node's two injected interfaces, and builders for what they return.

- :class:`ManualClock`: a :class:`~rustbalance.node.clock.Clock` that only moves when told
  (``sleep`` moves it at once, so loops run without waiting);
- :class:`FakeNetwork`: a :class:`~rustbalance.node.tor_network.TorNetwork` that answers from
  what the test set up and records every upload, fetch and switch. It stands in for tor where
  a unit test needs a fault or an answer real tor cannot give on demand (a failed upload of one
  period, an HSDir serving an older revision, a changed HSDir ring at once); the policies it
  drives are the same code the daemon runs, which the real-tor tests in tests/node_e2e prove
  end to end;
- :class:`FakeCoordination`: a :class:`~rustbalance.node.coordination.Coordination` whose
  facts the test sets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from rustbalance.crypto.keys import IdentityKey
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.errors import ControlError
from rustbalance.node.coordination import ClusterStatus, CoordinationFacts
from rustbalance.tor.consensus import HSDirRelay
from rustbalance.tor.control_protocol import ControlReplyError, HsDescEvent, Reply, ReplyLine
from rustbalance.tor.network import (
    HsDirFetch,
    HsDirUpload,
    NetworkView,
    PlannedDescriptor,
    decode_for_view,
    network_view_from_documents,
)
from tests.descriptor.helpers import make_intro_point

DATA = Path(__file__).resolve().parents[1] / "data"
VIEW = network_view_from_documents(
    (DATA / "consensus_microdesc.txt").read_text(),
    (DATA / "consensus_microdescs.txt").read_text(),
)
# The consensus' valid-after: intro point certificates are valid then.
NOW = VIEW.valid_after


def intro_points(n: int, seed: int = 1) -> tuple[IntroPoint, ...]:
    randbytes = random.Random(seed).randbytes
    return tuple(make_intro_point(randbytes, index=i, now=NOW) for i in range(n))


def decoded(
    points: Sequence[IntroPoint],
    *,
    time_period: int | None = None,
    revision: int = 1,
    flow_control: str | None = "1-2 31",
) -> DecodedDescriptor:
    """A descriptor as :func:`~rustbalance.descriptor.parser.decode_descriptor` returns it."""
    return DecodedDescriptor(
        lifetime=180,
        revision_counter=revision,
        signing_key=b"\x00" * 32,
        signing_cert_expiry=NOW + 3600,
        blinded_key=b"\x00" * 32,
        time_period=VIEW.current_time_period() if time_period is None else time_period,
        intro_points=tuple(points),
        flow_control=flow_control,
        pow_params=None,
        single_onion=False,
        intro_auth_required=("ed25519",),
        client_auth=False,
        dropped_intro_points=(),
    )


def reply_error(status: int = 551, text: str = "Not found") -> ControlReplyError:
    return ControlReplyError(Reply(status, (ReplyLine(status, " ", text),)), "GETINFO")


def hs_desc(action: str, address: str, auth_type: str = "NO_AUTH") -> HsDescEvent:
    return HsDescEvent(action, address, auth_type, "UNKNOWN", None, None, None, None, None, None)


def with_srv(view: NetworkView, srv: bytes) -> NetworkView:
    """The view with another current SRV (a new shared-random run)."""
    return dataclasses.replace(view, consensus=dataclasses.replace(view.consensus, srv_current=srv))


def at_valid_after(view: NetworkView, valid_after: int) -> NetworkView:
    """The view of a consensus valid after ``valid_after`` (unix seconds), else the same."""
    return dataclasses.replace(
        view, consensus=dataclasses.replace(view.consensus, valid_after=valid_after)
    )


def ten_hsdirs(view: NetworkView = VIEW) -> NetworkView:
    """The view with 10 HSDirs and tor's default ring (2 replicas x 4 to store, x 3 to
    fetch), as the session test network: 8 store HSDirs, the 6 fetch ones among them."""
    randbytes = random.Random(10).randbytes
    hsdirs = tuple(
        HSDirRelay(randbytes(20).hex().upper(), f"hsdir{i}", randbytes(32)) for i in range(10)
    )
    params = dataclasses.replace(view.hsdir_params, n_replicas=2, spread_store=4, spread_fetch=3)
    return dataclasses.replace(view, hsdirs=hsdirs, hsdir_params=params)


def without_hsdir(view: NetworkView, index: int = 0) -> NetworkView:
    """The view with one HSDir less (the ring moved)."""
    hsdirs = view.hsdirs[:index] + view.hsdirs[index + 1 :]
    return dataclasses.replace(view, hsdirs=hsdirs)


class ManualClock:
    def __init__(self, wall: float = float(NOW), monotonic: float = 1000.0) -> None:
        self._wall = wall
        self._mono = monotonic
        self.slept: list[float] = []

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)


class _Events:
    def __init__(self, network: FakeNetwork) -> None:
        self._network = network
        self.closed = False

    async def next(self, timeout: float) -> HsDescEvent | None:  # noqa: ASYNC109
        queue = self._network.events
        if queue:
            return queue.pop(0)
        await self._network.clock.sleep(timeout)
        return None

    async def aclose(self) -> None:
        self.closed = True


Answer = Callable[[PlannedDescriptor], list[HsDirUpload]]
# One HSDir's answer to one text of upload_per_hsdir.
HsDirAnswer = Callable[[HSDirRelay, str], HsDirUpload]


def all_accept(planned: PlannedDescriptor) -> list[HsDirUpload]:
    return [HsDirUpload(h.fingerprint, h.nickname, True) for h in planned.hsdirs]


def hsdir_accepts(relay: HSDirRelay, text: str) -> HsDirUpload:
    return HsDirUpload(relay.fingerprint, relay.nickname, True)


class FakeNetwork:
    """See the module doc. ``own`` and ``fetched`` values may be exceptions to raise."""

    def __init__(self, clock: ManualClock, view: NetworkView = VIEW) -> None:
        self.clock = clock
        self.view = view
        self.valid_after: str | None = "2025-06-01 12:04:00"
        self.own: list[DecodedDescriptor | Exception] = []
        self.fetched: dict[str, list[DecodedDescriptor | Exception]] = {}
        self.answer: Answer = all_accept
        self.events: list[HsDescEvent] = []
        self.uploads: list[PlannedDescriptor] = []
        self.fetches: list[str] = []
        self.view_reads = 0
        self.own_reads = 0
        self.native: list[bool] = []
        self.fresh_sessions = 0
        self.stream: _Events | None = None
        # Per-HSDir uploads and fetches (distinct descriptors): each call's (HSDir, text)
        # pairs, what every HSDir stores (the last text it accepted), and answers that
        # override what an HSDir serves back: a decoded descriptor or a failure reason.
        self.hsdir_answer: HsDirAnswer = hsdir_accepts
        self.per_hsdir_uploads: list[list[tuple[HSDirRelay, str]]] = []
        self.stored: dict[str, str] = {}
        self.served: dict[str, DecodedDescriptor | str] = {}
        self.per_hsdir_fetches: list[list[str]] = []

    async def read_view(self) -> NetworkView:
        self.view_reads += 1
        return self.view

    async def consensus_valid_after(self) -> str | None:
        return self.valid_after

    async def read_own_descriptor(self, address: str, view: NetworkView) -> DecodedDescriptor:
        self.own_reads += 1
        answer = self.own.pop(0) if len(self.own) > 1 else self.own[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def fetch(self, address: str, view: NetworkView, *, timeout: float) -> DecodedDescriptor:  # noqa: ASYNC109
        self.fetches.append(address)
        answers = self.fetched.get(address) or [ControlError("nothing to fetch")]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def upload(self, planned: PlannedDescriptor, timeout: float) -> list[HsDirUpload]:  # noqa: ASYNC109
        self.uploads.append(planned)
        return self.answer(planned)

    async def upload_per_hsdir(
        self,
        address: str,
        uploads: Sequence[tuple[HSDirRelay, str]],
        timeout: float,  # noqa: ASYNC109
    ) -> list[HsDirUpload]:
        self.per_hsdir_uploads.append(list(uploads))
        results = []
        for relay, text in uploads:
            result = self.hsdir_answer(relay, text)
            if result.ok:
                self.stored[relay.fingerprint] = text
            results.append(result)
        return results

    async def fetch_per_hsdir(
        self,
        address: str,
        view: NetworkView,
        hsdirs: Sequence[HSDirRelay],
        timeout: float,  # noqa: ASYNC109
    ) -> list[HsDirFetch]:
        self.per_hsdir_fetches.append([r.fingerprint for r in hsdirs])
        results = []
        for relay in hsdirs:
            served = self.served.get(relay.fingerprint)
            if served is None and relay.fingerprint in self.stored:
                now = int(self.clock.wall())
                served = decode_for_view(self.stored[relay.fingerprint], address, view, now=now)
            if served is None:
                served = "NOT_FOUND"
            if isinstance(served, str):
                results.append(HsDirFetch(relay.fingerprint, relay.nickname, None, served))
            else:
                results.append(HsDirFetch(relay.fingerprint, relay.nickname, served))
        return results

    async def descriptor_events(self) -> _Events:
        self.stream = _Events(self)
        return self.stream

    async def set_native_publishing(self, on: bool) -> None:
        self.native.append(on)

    async def fresh_session(self) -> None:
        self.fresh_sessions += 1


class FakeCoordination:
    def __init__(self) -> None:
        self.current = CoordinationFacts(is_multi=False, holds_lease=False, peer_intro_points={})
        self.reported: list[tuple[IntroPoint, ...]] = []
        self.published: list[int] = []
        self.eligible: list[bool] = []
        self.left = False
        self.fence = True  # what may_publish answers

    def facts(self) -> CoordinationFacts:
        return self.current

    def status(self) -> ClusterStatus:
        peers = self.current.peer_intro_points
        return ClusterStatus(
            term=1,
            election_role="publisher" if self.current.holds_lease else "standby",
            publisher=None,
            counters={"heartbeats_sent": 3, "heartbeats_received": 2},
            rejected={"future": 1},
            peer_intro_points={k: len(v) for k, v in peers.items()},
            live_peers=tuple(sorted(peers)),
            known_peers=tuple(sorted(peers)),
            revoked=self.current.revoked,
        )

    def report_intro_points(self, points: Sequence[IntroPoint]) -> None:
        self.reported.append(tuple(points))

    def report_publish(self, unix_time: int) -> None:
        self.published.append(unix_time)

    def set_eligible(self, eligible: bool) -> None:
        self.eligible.append(eligible)

    def clear_changed(self) -> None:
        pass

    async def wait_changed(self, timeout: float) -> None:  # noqa: ASYNC109
        await asyncio.sleep(0)

    async def may_publish(self) -> bool:
        return self.fence

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def leave(self) -> None:
        self.left = True

    def mesh_handle(self) -> None:
        return None


async def until(condition: Callable[[], bool], rounds: int = 2000) -> None:
    """Let the tasks run (a manual clock makes their sleeps instant) until ``condition()``."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def master_key(seed: int = 7) -> IdentityKey:
    return IdentityKey.from_seed(random.Random(seed).randbytes(32))
