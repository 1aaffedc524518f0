"""The front door's decisions without sockets: slots, displacement, per-circuit limits, cuts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.proxy.admission import Admission, CircuitLimits, Verdict
from tests.budget import budget


def _admit_waiting(admission: Admission, *sessions: int, now: float = 0.0) -> None:
    """Admit, then find waiting (what the session does once it looked at its bytes)."""
    for session in sessions:
        assert admission.admit(session, now) == (True, None)
        admission.waiting(session, True)


def test_a_waiting_connection_makes_room_the_oldest_first() -> None:
    admission = Admission(3)
    _admit_waiting(admission, 1, 2, 3)
    assert admission.admit(4, 1.0) == (True, 1)  # 1 waited longest
    assert admission.active == 3
    admission.release(1)  # the displaced connection closes: nothing left to do
    assert admission.active == 3


def test_a_newcomer_is_never_displaced_before_it_was_looked_at() -> None:
    """A reconnect storm keeps the accept loop busy: the newcomers the proxy has not read
    yet take the count over the cap (to twice it) rather than being taken for idle; once
    found waiting over the cap, the longest-waiting go."""
    busy: set[int] = set()
    admission = Admission(2, is_waiting=lambda session: session not in busy)
    _admit_waiting(admission, 1, 2)
    busy.update({1, 2})  # both busy with a request
    assert admission.admit(3, 1.0) == (True, None)  # over the cap, not looked at yet
    assert admission.admit(4, 1.0) == (True, None)
    assert admission.admit(5, 1.0) == (False, None)  # twice the cap and nobody waiting
    assert admission.make_room(3) == (False, None)  # 3 has a request: every slot is busy
    admission.release(3)  # (refused: 503)
    admission.waiting(4, True)  # 4 was found waiting: the next newcomer displaces it
    assert admission.admit(5, 2.0) == (True, 4)
    assert admission.active == 3  # 1, 2 busy; 5 not looked at yet
    assert admission.make_room(5) == (False, None)  # a request too: refused, 2 stay busy


def test_only_waiting_connections_make_room() -> None:
    busy: set[int] = set()
    admission = Admission(2, is_waiting=lambda session: session not in busy)
    _admit_waiting(admission, 1, 2)
    busy.update({1, 2})  # both work on a request
    assert admission.admit(3, 1.0) == (True, None)
    assert admission.admit(4, 1.0) == (True, None)
    assert admission.admit(5, 1.0) == (False, None)
    busy.discard(2)
    admission.release(3)
    admission.release(4)
    admission.waiting(2, True)  # 2's response ended: it waits again
    assert admission.admit(3, 2.0) == (True, 2)


def test_a_connection_that_waits_again_goes_to_the_end_of_the_line() -> None:
    admission = Admission(3)
    _admit_waiting(admission, 1, 2, 3)
    admission.waiting(1, False)
    admission.waiting(1, True)  # 1 served a request and waits again: the newest waiter
    assert admission.admit(4, 1.0) == (True, 2)


def test_the_circuit_holding_most_connections_gives_way_first() -> None:
    admission = Admission(4, CircuitLimits(max_connections=0, rate=0))
    _admit_waiting(admission, 1, 2, 3, 4)
    admission.identify(1, 100, 0.0)  # an ordinary client
    for session in (2, 3, 4):
        admission.identify(session, 666, 0.0)  # one circuit holds three
    assert admission.admit(5, 1.0) == (True, 2)
    admission.identify(5, 200, 1.0)
    admission.waiting(5, True)
    assert admission.admit(6, 1.0) == (True, 3)


def test_too_many_streams_at_once_cut_the_circuit_for_a_while() -> None:
    limits = CircuitLimits(max_connections=3, rate=0, cut_seconds=60)
    admission = Admission(100, limits)
    for session in (1, 2, 3):
        admission.admit(session, 0.0)
        assert admission.identify(session, 7, 0.0) is Verdict.OK
    admission.admit(4, 0.0)
    assert admission.identify(4, 7, 0.0) is Verdict.CUT
    assert admission.last_cut is not None and admission.last_cut.key == 7
    assert sorted(admission.sessions_of(7)) == [1, 2, 3, 4]
    for session in (1, 2, 3, 4):
        admission.release(session)
    admission.admit(5, 30.0)
    assert admission.identify(5, 7, 30.0) is Verdict.REFUSE  # cut: refused for 60 s
    assert admission.request(5, 30.0) is Verdict.REFUSE
    admission.release(5)
    admission.admit(6, 61.0)
    assert admission.identify(6, 7, 61.0) is Verdict.OK  # the cut is over
    admission.admit(7, 61.0)
    assert admission.identify(7, 8, 61.0) is Verdict.OK  # other circuits never noticed


def test_the_rate_throttles_then_cuts_a_circuit_that_goes_on() -> None:
    limits = CircuitLimits(max_connections=0, rate=10, burst=5, cut_seconds=60)
    admission = Admission(10, limits)
    admission.admit(1, 0.0)
    assert admission.identify(1, 9, 0.0) is Verdict.OK  # the stream takes a token
    verdicts = [admission.request(1, 0.0) for _ in range(4)]
    assert verdicts == [Verdict.OK] * 4  # the burst is spent
    assert admission.request(1, 0.0) is Verdict.THROTTLE
    # Throttled requests still count: the bucket goes into debt. 0.5 s refills 5 tokens.
    later = [admission.request(1, 0.5) for _ in range(9)]
    ok, throttle = Verdict.OK, Verdict.THROTTLE
    assert later == [ok, ok, ok, ok, throttle, throttle, throttle, throttle, Verdict.CUT]
    # (4 tokens, then a debt of 1..4; owing a whole burst of 5 cuts the circuit)
    assert admission.request(1, 0.6) is Verdict.REFUSE


def test_connections_without_a_circuit_are_never_limited() -> None:
    admission = Admission(10, CircuitLimits(max_connections=1, rate=1, burst=1))
    for session in (1, 2, 3):
        admission.admit(session, 0.0)
        assert admission.identify(session, None, 0.0) is Verdict.OK
    assert all(admission.request(1, 0.0) is Verdict.OK for _ in range(100))


def test_idle_circuits_are_forgotten_but_cut_ones_and_busy_buckets_are_kept() -> None:
    limits = CircuitLimits(max_connections=1, rate=1, burst=10, cut_seconds=60)
    admission = Admission(10, limits)
    for session, key in ((1, 1), (2, 2), (3, 3), (4, 3)):
        admission.admit(session, 0.0)
        admission.identify(session, key, 0.0)  # session 4 cuts circuit 3
    for session in (1, 2):
        for _ in range(8):
            admission.request(session, 0.0)  # 1 of 10 tokens left
    for session in (1, 2, 3, 4):
        admission.release(session)
    admission.sweep(5.0)  # 1 and 2 have 6 of their 10 tokens again: kept
    assert admission.circuits() == 3
    admission.sweep(20.0)  # full buckets: forgotten; circuit 3 is still cut
    assert admission.circuits() == 1 and admission.is_cut(3, 20.0)
    admission.sweep(61.0)
    assert admission.circuits() == 0


_ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "identify", "request", "waiting", "busy", "release"]),
        st.integers(0, 15),  # session
        st.sampled_from([None, 1, 2, 3]),  # circuit
    ),
    max_size=120,
)


@settings(max_examples=budget(300))
@given(ops=_ops)
def test_any_sequence_keeps_the_books_straight(ops: list[tuple[str, int, int | None]]) -> None:
    busy: set[int] = set()
    admission = Admission(
        5, CircuitLimits(max_connections=3, rate=2, burst=3, cut_seconds=5), busy.__contains__
    )
    admission.is_waiting = lambda session: session not in busy
    now = 0.0
    live: set[int] = set()
    for op, session, circuit in ops:
        now += 0.25
        if op == "admit" and session not in live:
            ok, victim = admission.admit(session, now)
            if ok:
                assert victim is None or (victim in live and victim not in busy)
                if victim is not None:
                    live.discard(victim)
                live.add(session)
            else:
                assert len(live) >= 10
        elif op == "identify" and session in live:
            admission.identify(session, circuit, now)
        elif op == "request" and session in live:
            admission.request(session, now)
        elif op == "busy" and session in live:
            busy.add(session)
            admission.waiting(session, False)
        elif op == "waiting" and session in live:
            busy.discard(session)
            admission.waiting(session, True)
        elif op == "release":
            admission.release(session)
            live.discard(session)
            busy.discard(session)
        assert admission.active == len(live) <= 10
