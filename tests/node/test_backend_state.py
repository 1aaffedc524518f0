"""The pure core of plain tor backends (``master.backends``): usable, stale, due, changed."""

from __future__ import annotations

import pytest

from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.node.backend_state import BackendBook, signature_of
from tests.descriptor.helpers import make_intro_point, rng

A = "a" * 56
B = "b" * 56
T0 = 1_000_000.0


def _points(seed: int, n: int = 3) -> tuple[IntroPoint, ...]:
    randbytes = rng(seed)
    return tuple(make_intro_point(randbytes, index=i) for i in range(n))


def _book(**kwargs: float) -> BackendBook:
    return BackendBook([f"{A}.onion", B], poll_secs=60, max_age_secs=600, **kwargs)  # type: ignore[arg-type]


def _fetched(book: BackendBook, address: str, points: tuple[IntroPoint, ...], now: float) -> None:
    book.record_fetch(address, points, revision_counter=1, lifetime_mins=180, now=now)


def test_nothing_is_merged_before_the_first_fetch_and_everything_is_due() -> None:
    book = _book()
    assert book.due(T0) == [A, B]
    assert book.intro_points(T0) == {}
    assert book.transitions(T0) == []  # not tried yet: nothing to report


def test_fetched_backend_is_merged_and_polled_again_after_the_interval() -> None:
    book = _book()
    pa = _points(1)
    _fetched(book, A, pa, T0)
    book.record_probe(A, True, "", T0)
    assert book.intro_points(T0 + 1) == {A: pa}
    assert book.due(T0 + 59) == [B]
    assert book.due(T0 + 60) == [A, B]
    (change,) = book.transitions(T0 + 1)
    assert (change.address, change.up) == (A, True)
    assert book.transitions(T0 + 2) == []  # reported once, not every poll


def test_failed_fetches_back_off_exponentially_up_to_the_poll_interval() -> None:
    book = _book()
    delays = []
    now = T0
    for _ in range(6):
        book.record_fetch_failure(B, "NOT_FOUND", now)
        state = book.states[B]
        delays.append(state.next_due - now)
        now = state.next_due
    assert delays == [5, 10, 20, 40, 60, 60]
    (change,) = book.transitions(now)
    assert change.address == B and not change.up
    assert "NOT_FOUND" in change.reason


def test_backend_drops_out_when_fetches_fail_longer_than_max_age() -> None:
    book = _book()
    pa = _points(1)
    _fetched(book, A, pa, T0)
    book.transitions(T0)
    book.record_fetch_failure(A, "TIMEOUT", T0 + 60)
    assert book.intro_points(T0 + 600) == {A: pa}  # old copy still within max_age
    assert book.intro_points(T0 + 601) == {}
    (change,) = book.transitions(T0 + 601)
    assert not change.up and "TIMEOUT" in change.reason


def test_descriptor_lifetime_bounds_staleness_below_max_age() -> None:
    book = BackendBook([A], poll_secs=60, max_age_secs=7200)
    book.record_fetch(A, _points(1), revision_counter=5, lifetime_mins=30, now=T0)
    assert A in book.intro_points(T0 + 1800)
    assert book.intro_points(T0 + 1801) == {}


def test_two_failed_reachability_checks_in_a_row_drop_a_backend() -> None:
    book = _book()
    pa = _points(1)
    _fetched(book, A, pa, T0)
    book.record_probe(A, False, "intro failed", T0)
    assert book.intro_points(T0) == {A: pa}  # one failure may be our circuit
    assert book.states[A].next_due == T0 + 5  # checked again soon
    _fetched(book, A, pa, T0 + 5)
    book.record_probe(A, False, "intro failed", T0 + 5)
    assert book.intro_points(T0 + 5) == {}
    assert "2 failed checks" in (book.down_reason(A, T0 + 5) or "")
    _fetched(book, A, pa, T0 + 15)
    book.record_probe(A, True, "", T0 + 15)
    assert book.intro_points(T0 + 15) == {A: pa}


def test_signature_changes_with_the_intro_point_set_only() -> None:
    book = _book()
    pa, pb = _points(1), _points(2)
    _fetched(book, A, pa, T0)
    first = book.signature(T0)
    _fetched(book, A, pa, T0 + 60)  # same content, new fetch
    assert book.signature(T0 + 60) == first
    _fetched(book, A, pa[:2] + pb[:1], T0 + 120)  # tor rotated one intro point
    assert book.signature(T0 + 120) != first
    assert signature_of({A: pa}) == first


def test_empty_descriptor_counts_as_down() -> None:
    book = _book()
    _fetched(book, A, (), T0)
    assert book.down_reason(A, T0) == "its descriptor lists no intro points"


def test_expedite_makes_every_backend_due() -> None:
    book = _book()
    _fetched(book, A, _points(1), T0)
    _fetched(book, B, _points(2), T0)
    assert book.due(T0 + 1) == []
    book.expedite(T0 + 1)
    assert book.due(T0 + 1) == [A, B]
    assert book.next_due() == T0 + 1


def test_bad_timings_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        BackendBook([A], poll_secs=0, max_age_secs=10)
