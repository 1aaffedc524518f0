"""The front door's decisions: connection slots, per-circuit limits, cuts (pure, clock passed in).

Anyone can open thousands of streams through tor for free, so the connection cap must not be
a lock-out:

- **Waiting connections make room.** A connection that has not yet sent a complete request
  head (or waits idle for its next request) holds a slot nobody uses. At the cap a new
  connection displaces one of them: of the ``CANDIDATES`` connections waiting longest, the
  one whose circuit holds the most connections (the longest-waiting of those on a tie). So
  connections that never send a request never lock out a real client, and under contention
  each circuit's share shrinks first where it is largest. Choosing costs O(``CANDIDATES``),
  however many circuits there are (an attacker may use a new circuit per connection).
- **Only a connection found waiting can be displaced.** A connection joins the waiting list
  when its session has looked at what arrived and found no complete request (:meth:`waiting`),
  never at accept: a real client's request is read before it could be taken for idle, even
  when an attacker's reconnect storm keeps the accept loop busy. So newcomers the proxy has
  not looked at yet may take the count over the cap (up to ``hard_limit``, twice the cap);
  every newcomer at or over the cap displaces one found waiting, and a newcomer over the cap
  that turns out to be busy (a request, or a tcp stream to relay) must make room
  (:meth:`make_room`): it displaces a waiting one, or it is refused (503). So at most
  ``max_connections`` connections are ever busy. When the count reaches the hard limit with
  nobody waiting, a newcomer is refused at accept.
- **Per-circuit limits** (tor tells which circuit a stream came on: ``.wire.proxy_line``).
  Every new stream and every request takes a token from the circuit's bucket (``rate`` per
  second, up to ``burst``). An empty bucket answers 429; a circuit that goes on until it owes
  a whole burst more, or that holds more than ``max_connections`` streams at once (a browser
  holds at most 6 per host), is **cut**: its connections are closed and its new streams
  refused for ``cut_seconds``. Sources without a circuit (no PROXY line) share one group
  that is never limited or cut.

The asyncio shell (:mod:`.server`) acts on the verdicts: closes the victim, answers 429, cuts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

Key = int | str | None  # a circuit id, a source address, or None (no PROXY line)

# Entries of circuits with no connection, no cut and a full bucket are forgotten; beyond this
# many entries a sweep runs at once (a bound on memory under a many-circuit attack).
_MAX_CIRCUITS = 65536
# How many of the longest-waiting connections a displacement looks at (see above).
CANDIDATES = 16


@dataclass(frozen=True, slots=True)
class CircuitLimits:
    """Per-circuit limits; 0 turns a limit off."""

    max_connections: int = 32
    rate: float = 20.0  # tokens per second: every stream and every request takes one
    burst: int = 200
    cut_seconds: float = 60.0


class Verdict(Enum):
    OK = "ok"
    THROTTLE = "throttle"  # over the rate: answer 429, forward nothing
    REFUSE = "refuse"  # the circuit is cut: close the new stream at once
    CUT = "cut"  # this made the circuit cut now: close all its connections


@dataclass(slots=True)
class _Circuit:
    tokens: float
    stamp: float
    connections: int = 0
    cut_until: float = 0.0


@dataclass(slots=True)
class _Session:
    key: Key


@dataclass(frozen=True, slots=True)
class Cut:
    """Why a circuit was cut (for the log line)."""

    key: Key
    reason: str


class Admission:
    """Connection slots and per-circuit state of one proxy.

    A session enters the waiting list when it starts to wait for a request (:meth:`waiting`,
    at the end: the list is in the order sessions started waiting); it does not have to leave
    it when a request arrives: ``is_waiting`` (the shell's view of the session's phase) is
    asked when a victim is chosen, and entries that no longer wait are dropped then. So the
    per-request cost is one call.
    """

    def __init__(
        self,
        max_connections: int,
        limits: CircuitLimits | None = None,
        is_waiting: Callable[[int], bool] = lambda _session: True,
    ) -> None:
        self.max_connections = max_connections
        self.hard_limit = 2 * max_connections
        self.limits = limits or CircuitLimits()
        self.is_waiting = is_waiting
        self._sessions: dict[int, _Session] = {}
        self._circuits: dict[Key, _Circuit] = {}
        self._waiting: dict[int, None] = {}  # ordered: who started waiting first
        # More connections than the cap (newcomers not read yet): a request must make room.
        self.over_cap = False
        self.last_cut: Cut | None = None

    # -- slots --------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._sessions)

    def admit(self, session: int, now: float) -> tuple[bool, int | None]:
        """A new connection: (admitted, the waiting session to close to make room or None).
        When admitted, the newcomer has its slot already; it is not on the waiting list (see
        the module docstring)."""
        victim: int | None = None
        count = len(self._sessions)
        if count >= self.max_connections:
            victim = self._victim()
            if victim is not None:
                self._forget(victim)
            elif count >= self.hard_limit:
                return False, None
        self._sessions[session] = _Session(None)
        self._circuit(None, now).connections += 1
        self.over_cap = len(self._sessions) > self.max_connections
        return True, victim

    def make_room(self, session: int) -> tuple[bool, int | None]:
        """The session starts work (a request, a tcp relay): within the cap, (True, None);
        over it, (True, the waiting session to close) or (False, None): refuse this one."""
        if len(self._sessions) <= self.max_connections or session not in self._sessions:
            return True, None
        self._waiting.pop(session, None)
        victim = self._victim()
        if victim is None:
            return False, None
        self._forget(victim)
        return True, victim

    def _victim(self) -> int | None:
        """The waiting session to displace: of the CANDIDATES waiting longest, the one whose
        circuit holds the most connections."""
        waiting, sessions, circuits = self._waiting, self._sessions, self._circuits
        best: int | None = None
        most = -1
        seen = 0
        stale: list[int] = []
        for session in waiting:  # bounded: CANDIDATES live ones, plus the stale ones dropped
            if not self.is_waiting(session):
                stale.append(session)  # it works on a request now
                continue
            count = circuits[sessions[session].key].connections
            if count > most:
                best, most = session, count
            seen += 1
            if seen >= CANDIDATES:
                break
        for session in stale:
            del waiting[session]
        return best

    def waiting(self, session: int, flag: bool) -> None:
        """The session was found waiting for a request (True: it goes to the end of the list)
        or works on one (False; optional, see the class docstring)."""
        if session not in self._sessions:
            return
        self._waiting.pop(session, None)
        if flag:
            self._waiting[session] = None

    def release(self, session: int) -> None:
        """The connection closed (also after it was displaced: then nothing is left to do)."""
        if session in self._sessions:
            self._forget(session)

    def _forget(self, session: int) -> None:
        entry = self._sessions.pop(session)
        self._circuits[entry.key].connections -= 1
        self._waiting.pop(session, None)
        self.over_cap = len(self._sessions) > self.max_connections

    # -- circuits -----------------------------------------------------------------------------

    def _circuit(self, key: Key, now: float) -> _Circuit:
        circuit = self._circuits.get(key)
        if circuit is None:
            if len(self._circuits) >= _MAX_CIRCUITS:
                self.sweep(now)
            circuit = _Circuit(tokens=float(self.limits.burst), stamp=now)
            self._circuits[key] = circuit
        return circuit

    def identify(self, session: int, key: Key, now: float) -> Verdict:
        """The session's PROXY line named ``key``: move it to that circuit, count the stream
        against the circuit's limits."""
        entry = self._sessions.get(session)
        if entry is None:
            return Verdict.REFUSE  # displaced meanwhile
        self._circuits[entry.key].connections -= 1
        entry.key = key
        circuit = self._circuit(key, now)
        circuit.connections += 1
        if key is None:
            return Verdict.OK
        if circuit.cut_until > now:
            return Verdict.REFUSE
        limit = self.limits.max_connections
        if limit and circuit.connections > limit:
            return self._cut(key, circuit, now, f"{circuit.connections} streams at once")
        return self._take(key, circuit, now)

    def request(self, session: int, now: float) -> Verdict:
        """A request head arrived on the session: take a token from its circuit."""
        entry = self._sessions.get(session)
        if entry is None or entry.key is None:
            return Verdict.OK
        circuit = self._circuits[entry.key]
        if circuit.cut_until > now:
            return Verdict.REFUSE
        return self._take(entry.key, circuit, now)

    def _take(self, key: Key, circuit: _Circuit, now: float) -> Verdict:
        limits = self.limits
        if not limits.rate:
            return Verdict.OK
        elapsed = max(0.0, now - circuit.stamp)
        circuit.tokens = min(float(limits.burst), circuit.tokens + elapsed * limits.rate)
        circuit.stamp = now
        circuit.tokens -= 1.0
        if circuit.tokens >= 0:
            return Verdict.OK
        if circuit.tokens > -limits.burst:
            return Verdict.THROTTLE
        rate = f"{limits.rate:g}/s"
        return self._cut(key, circuit, now, f"over {rate} by a burst of {limits.burst}")

    def _cut(self, key: Key, circuit: _Circuit, now: float, reason: str) -> Verdict:
        circuit.cut_until = now + self.limits.cut_seconds
        circuit.tokens = float(self.limits.burst)  # a fresh start once the cut is over
        self.last_cut = Cut(key, reason)
        return Verdict.CUT

    def sessions_of(self, key: Key) -> list[int]:
        return [sid for sid, entry in self._sessions.items() if entry.key == key]

    def is_cut(self, key: Key, now: float) -> bool:
        circuit = self._circuits.get(key)
        return circuit is not None and circuit.cut_until > now

    def sweep(self, now: float) -> None:
        """Forget circuits that hold nothing: no connection, no cut, a full bucket."""
        limits = self.limits
        for key in [
            key
            for key, c in self._circuits.items()
            if key is not None
            and not c.connections
            and c.cut_until <= now
            and (not limits.rate or c.tokens + (now - c.stamp) * limits.rate >= limits.burst)
        ]:
            del self._circuits[key]

    def circuits(self) -> int:
        """Circuits tracked now (for tests and the summary line)."""
        return sum(1 for key in self._circuits if key is not None)
