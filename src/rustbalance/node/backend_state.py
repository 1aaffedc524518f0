"""Plain tor backends (``master.backends``): which ones are usable, when to fetch, what changed.

Pure and clock-injected: every method takes ``now`` (unix seconds); :mod:`rustbalance.node.
backends` is the asyncio shell that fetches (HSFETCH) and probes and feeds the results in.

A backend is a tor onion service run as an Onionbalance instance of the master
(``HiddenServiceOnionbalanceInstance 1``, tor.md §11), so its intro points accept the master's
subcredentials and can be copied into the master descriptor. Its intro points are merged while:

- its descriptor was fetched successfully within ``max_age`` seconds, and within the
  descriptor's own ``descriptor-lifetime`` (rend-spec-v3 §2.4: an HSDir drops it after that, so
  a copy older than that vouches for nothing), and
- it did not fail ``probe_failures`` reachability checks in a row. HSDirs keep serving a dead
  backend's descriptor for its whole lifetime (3 h for tor's own), so only a connection
  through its own address tells that its tor is gone.

Failed fetches and probes are retried sooner than the poll interval, with exponential backoff
(``retry_base`` doubling, capped at the poll interval). :meth:`BackendBook.transitions` reports
each backend's up/down changes once, so the shell logs a state change, not every poll.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rustbalance.descriptor.intro_point import IntroPoint

__all__ = [
    "BACKEND_PROBE_FAILURES",
    "BackendBook",
    "BackendSignature",
    "BackendState",
    "Transition",
]

# Two failed reachability checks in a row: one failure can be a client-side circuit problem.
BACKEND_PROBE_FAILURES = 2
# First retry after a failed fetch or probe; doubles per failure, capped at the poll interval.
BACKEND_RETRY_BASE_SECS = 5.0

# ((backend address, its merged intro auth keys), ...) sorted by address.
BackendSignature = tuple[tuple[str, frozenset[bytes]], ...]


@dataclass
class BackendState:
    address: str
    intro_points: tuple[IntroPoint, ...] = ()
    fetched_at: float | None = None  # last successful fetch
    lifetime_secs: float | None = None  # descriptor-lifetime of the last fetched descriptor
    revision_counter: int | None = None
    fetch_failures: int = 0  # in a row
    probe_failures: int = 0  # in a row
    probed: bool = False  # at least one probe result since the last fetch
    last_error: str | None = None
    next_due: float = 0.0
    reported: str = "unknown"  # "up"/"down" as last reported by transitions()


@dataclass(frozen=True)
class Transition:
    address: str
    up: bool
    reason: str


class BackendBook:
    """The state of every configured backend."""

    def __init__(
        self,
        addresses: Iterable[str],
        *,
        poll_secs: float,
        max_age_secs: float,
        probe_failures: int = BACKEND_PROBE_FAILURES,
        retry_base_secs: float = BACKEND_RETRY_BASE_SECS,
    ) -> None:
        if poll_secs <= 0 or max_age_secs <= 0 or retry_base_secs <= 0 or probe_failures < 1:
            raise ValueError("backend timings must be positive")
        self.poll_secs = poll_secs
        self.max_age_secs = max_age_secs
        self.probe_failures = probe_failures
        self.retry_base_secs = retry_base_secs
        self.states: dict[str, BackendState] = {}
        for address in addresses:
            bare = address.lower().removesuffix(".onion")
            self.states[bare] = BackendState(bare)

    # -- scheduling ---------------------------------------------------------------------

    def due(self, now: float) -> list[str]:
        return sorted(a for a, s in self.states.items() if s.next_due <= now)

    def next_due(self) -> float | None:
        return min((s.next_due for s in self.states.values()), default=None)

    def expedite(self, now: float) -> None:
        """Fetch everything now (a new time period: backends publish new descriptors)."""
        for state in self.states.values():
            state.next_due = min(state.next_due, now)

    def _backoff(self, failures: int) -> float:
        return float(min(self.poll_secs, self.retry_base_secs * 2 ** min(failures - 1, 20)))

    def _reschedule(self, state: BackendState, now: float) -> None:
        failures = max(state.fetch_failures, state.probe_failures)
        state.next_due = now + (self._backoff(failures) if failures else self.poll_secs)

    # -- results ------------------------------------------------------------------------

    def _state(self, address: str) -> BackendState:
        return self.states[address.lower().removesuffix(".onion")]

    def record_fetch(
        self,
        address: str,
        intro_points: Iterable[IntroPoint],
        *,
        revision_counter: int,
        lifetime_mins: int,
        now: float,
    ) -> None:
        state = self._state(address)
        state.intro_points = tuple(intro_points)
        state.fetched_at = now
        state.lifetime_secs = lifetime_mins * 60.0
        state.revision_counter = revision_counter
        state.fetch_failures = 0
        state.last_error = None
        self._reschedule(state, now)

    def record_fetch_failure(self, address: str, reason: str, now: float) -> None:
        state = self._state(address)
        state.fetch_failures += 1
        state.last_error = f"descriptor fetch failed: {reason}"
        self._reschedule(state, now)

    def record_probe(self, address: str, ok: bool, reason: str, now: float) -> None:
        state = self._state(address)
        state.probed = True
        if ok:
            state.probe_failures = 0
        else:
            state.probe_failures += 1
            state.last_error = f"not reachable through its address: {reason}"
        self._reschedule(state, now)

    # -- decisions ----------------------------------------------------------------------

    def down_reason(self, address: str, now: float) -> str | None:
        """None if the backend's intro points may be merged, else why not."""
        state = self._state(address)
        if state.fetched_at is None:
            return state.last_error or "descriptor not fetched yet"
        limit = self.max_age_secs
        if state.lifetime_secs is not None:
            limit = min(limit, state.lifetime_secs)
        age = now - state.fetched_at
        if age > limit:
            return f"no descriptor for {age:.0f} s (limit {limit:.0f} s): {state.last_error}"
        if state.probe_failures >= self.probe_failures:
            return f"{state.probe_failures} failed checks in a row, {state.last_error}"
        if not state.intro_points:
            return "its descriptor lists no intro points"
        return None

    def intro_points(self, now: float) -> dict[str, tuple[IntroPoint, ...]]:
        """The usable backends' intro points, by address (callers sort for a stable order)."""
        return {
            address: state.intro_points
            for address, state in sorted(self.states.items())
            if self.down_reason(address, now) is None
        }

    def signature(self, now: float) -> BackendSignature:
        return signature_of(self.intro_points(now))

    def transitions(self, now: float) -> list[Transition]:
        """Up/down changes since the last call (each reported once)."""
        changes: list[Transition] = []
        for address, state in sorted(self.states.items()):
            reason = self.down_reason(address, now)
            current = "up" if reason is None else "down"
            if current == state.reported:
                continue
            if (
                state.reported == "unknown"
                and state.fetched_at is None
                and not state.fetch_failures
            ):
                continue  # not tried yet: nothing to report
            state.reported = current
            changes.append(
                Transition(
                    address,
                    current == "up",
                    reason or f"{len(state.intro_points)} intro points",
                )
            )
        return changes


def signature_of(points: Mapping[str, Iterable[IntroPoint]]) -> BackendSignature:
    return tuple(
        (address, frozenset(p.auth_key for p in points[address])) for address in sorted(points)
    )
