"""Time periods, SR runs and descriptor targets.

Vectors: tor ``src/test/test_hs_common.c`` (test_time_period, test_start_time_of_next_time_period,
test_time_between_tp_and_srv, the reachability scenarios and test_client_service_hsdir_set_sync),
the example in ``shared_random_client.c`` (sr_state_get_start_time_of_current_protocol_run's
comment) and rend-spec-v3 [TIME-PERIODS]. The disaster SRV vector was computed independently
with ``openssl dgst -sha3-256`` over the bytes of rend-spec-v3 [PUB-SHAREDRANDOM].
"""

from __future__ import annotations

import calendar
import hashlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.crypto.time_period import (
    LIVE_TIME_PARAMS,
    DescriptorTarget,
    TimeParams,
    client_fetch_target,
    descriptor_targets,
    disaster_srv,
    in_period_between_tp_and_srv,
    srv_run_start,
    time_period_num,
    time_period_start,
)
from tests.budget import budget

TEST_NET_20S = TimeParams(
    period_length_minutes=8, rotation_offset_minutes=4, voting_interval_seconds=20
)
TEST_NET_10S = TimeParams(
    period_length_minutes=4, rotation_offset_minutes=2, voting_interval_seconds=10
)


def utc(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


def srv_of_run(run_start: int) -> bytes:
    """A distinct SRV per SR protocol run, for modelling what a consensus would carry."""
    return hashlib.sha256(b"srv %d" % run_start).digest()


def srvs_at(valid_after: int, params: TimeParams) -> tuple[bytes, bytes]:
    """(current, previous) SRV in a consensus with this valid-after."""
    run = srv_run_start(valid_after, params)
    return srv_of_run(run), srv_of_run(run - params.srv_run_seconds)


def test_live_defaults() -> None:
    assert TimeParams(1440, 720, 3600) == LIVE_TIME_PARAMS
    assert LIVE_TIME_PARAMS.srv_run_seconds == 86400
    assert TEST_NET_20S.srv_run_seconds == 480


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 720, 3600), "period_length"), ((1440, -1, 3600), "rotation"), ((1440, 720, 0), "voting")],
)
def test_time_params_rejects_nonsense(args: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TimeParams(*args)


def test_time_period_prop224_example() -> None:
    # test_hs_common.c test_time_period (the rend-spec-v3 [TIME-PERIODS] example).
    now = utc("2016-04-13 11:00:00")
    assert time_period_num(now, LIVE_TIME_PARAMS) == 16903
    assert time_period_num(now + 3599, LIVE_TIME_PARAMS) == 16903
    assert time_period_start(16904, LIVE_TIME_PARAMS) == utc("2016-04-13 12:00:00")
    assert time_period_num(now + 3600, LIVE_TIME_PARAMS) == 16904
    assert time_period_start(16905, LIVE_TIME_PARAMS) == utc("2016-04-14 12:00:00")


def test_start_of_next_period_on_10s_test_network() -> None:
    # test_hs_common.c test_start_time_of_next_time_period, TestingTorNetwork with 10 s voting:
    # 4-minute periods starting 2 minutes after the SRV.
    for now, expected in [
        ("2016-04-13 00:00:00", "2016-04-13 00:02:00"),
        ("2016-04-13 00:02:00", "2016-04-13 00:06:00"),
    ]:
        tp = time_period_num(utc(now), TEST_NET_10S)
        assert time_period_start(tp + 1, TEST_NET_10S) == utc(expected)


@settings(max_examples=budget(300), deadline=None)
@given(
    t=st.integers(min_value=10**8, max_value=4 * 10**9),
    params=st.sampled_from([LIVE_TIME_PARAMS, TEST_NET_20S, TEST_NET_10S]),
)
def test_time_is_inside_its_period(t: int, params: TimeParams) -> None:
    tp = time_period_num(t, params)
    assert time_period_start(tp, params) <= t < time_period_start(tp + 1, params)
    assert time_period_num(time_period_start(tp, params), params) == tp


def test_srv_run_start_live() -> None:
    # shared_random_client.c: valid-after 23/06/2017 23:00:00 with a 24 h run -> 00:00:00.
    assert srv_run_start(utc("2017-06-23 23:00:00"), LIVE_TIME_PARAMS) == utc("2017-06-23 00:00:00")
    assert srv_run_start(utc("2017-06-24 00:00:00"), LIVE_TIME_PARAMS) == utc("2017-06-24 00:00:00")


@settings(max_examples=budget(300), deadline=None)
@given(rounds=st.integers(min_value=10**6, max_value=10**8))
def test_srv_run_start_test_network(rounds: int) -> None:
    valid_after = rounds * 20
    start = srv_run_start(valid_after, TEST_NET_20S)
    assert start % 480 == 0
    assert start <= valid_after < start + 480


@pytest.mark.parametrize(
    ("valid_after", "in_segment_b"),
    [
        # test_hs_common.c test_time_between_tp_and_srv
        ("1985-10-26 00:00:00", False),
        ("1985-10-26 11:00:00", False),
        ("1985-10-26 12:00:00", True),
        ("1985-10-26 23:00:00", True),
    ],
)
def test_segment_live(valid_after: str, in_segment_b: bool) -> None:
    assert in_period_between_tp_and_srv(utc(valid_after), LIVE_TIME_PARAMS) is in_segment_b


def test_segment_test_network() -> None:
    run = 3_000_000 * 480
    # 20 s voting: segment A is the first 4 minutes of each 8-minute SR run (tor.md §10).
    assert not in_period_between_tp_and_srv(run, TEST_NET_20S)
    assert not in_period_between_tp_and_srv(run + 220, TEST_NET_20S)
    assert in_period_between_tp_and_srv(run + 240, TEST_NET_20S)
    assert in_period_between_tp_and_srv(run + 460, TEST_NET_20S)


def test_disaster_srv_vector() -> None:
    # printf 'shared-random-disaster' + INT_8(1440) + INT_8(16903) | openssl dgst -sha3-256
    assert disaster_srv(1440, 16903).hex() == (
        "e7a6d7d2d9de116d1d8b5d49cdf3d070555a0fa60950ca6844ebcb88828b9f53"
    )
    assert disaster_srv(1440, 16904) != disaster_srv(1440, 16903)
    assert disaster_srv(8, 16903) != disaster_srv(1440, 16903)


def test_disaster_srv_rejects_negative() -> None:
    with pytest.raises(ValueError, match="64-bit"):
        disaster_srv(1440, -1)


CUR = b"\x01" * 32
PREV = b"\x02" * 32


def test_targets_segment_a_live() -> None:
    # 2016-04-14 01:00 (EARLY_IN_SRV_TO_TP): period 16904 started 2016-04-13 12:00.
    valid_after = utc("2016-04-14 01:00:00")
    first, second = descriptor_targets(valid_after, LIVE_TIME_PARAMS, CUR, PREV)
    run = utc("2016-04-14 00:00:00")
    assert first == DescriptorTarget(16904, PREV, run - 86400)
    assert second == DescriptorTarget(16905, CUR, run)
    # Clients use the current period and, in segment A, the previous SRV: the first ring.
    assert client_fetch_target(valid_after, LIVE_TIME_PARAMS, CUR, PREV) == (16904, PREV)


def test_targets_segment_b_live() -> None:
    # 2016-04-13 13:00 (EARLY_IN_TP_TO_SRV): period 16904 has just started.
    valid_after = utc("2016-04-13 13:00:00")
    first, second = descriptor_targets(valid_after, LIVE_TIME_PARAMS, CUR, PREV)
    run = utc("2016-04-13 00:00:00")
    assert first == DescriptorTarget(16903, PREV, run - 86400)
    assert second == DescriptorTarget(16904, CUR, run)
    assert client_fetch_target(valid_after, LIVE_TIME_PARAMS, CUR, PREV) == (16904, CUR)


def test_targets_without_srv_use_disaster_values_per_period() -> None:
    valid_after = utc("2016-04-13 13:00:00")
    first, second = descriptor_targets(valid_after, LIVE_TIME_PARAMS, None, None)
    assert first.srv == disaster_srv(1440, 16903)
    assert second.srv == disaster_srv(1440, 16904)
    assert client_fetch_target(valid_after, LIVE_TIME_PARAMS, None, None) == (
        16904,
        disaster_srv(1440, 16904),
    )
    # Only the missing one is replaced.
    first, second = descriptor_targets(valid_after, LIVE_TIME_PARAMS, CUR, None)
    assert (first.srv, second.srv) == (disaster_srv(1440, 16903), CUR)


def test_targets_reject_bad_srv_length() -> None:
    with pytest.raises(ValueError, match="srv_current"):
        descriptor_targets(utc("2016-04-13 13:00:00"), LIVE_TIME_PARAMS, b"short", None)


def test_targets_on_20s_test_network() -> None:
    run = 3_000_000 * 480
    tp = time_period_num(run, TEST_NET_20S)
    assert time_period_start(tp + 1, TEST_NET_20S) == run + 240
    first, second = descriptor_targets(run + 20, TEST_NET_20S, CUR, PREV)
    assert (first.time_period, second.time_period) == (tp, tp + 1)
    assert (first.srv_run_start, second.srv_run_start) == (run - 480, run)
    first, second = descriptor_targets(run + 260, TEST_NET_20S, CUR, PREV)
    assert (first.time_period, second.time_period) == (tp, tp + 1)
    assert client_fetch_target(run + 260, TEST_NET_20S, CUR, PREV) == (tp + 1, CUR)


@pytest.mark.parametrize(
    ("service", "client"),
    [
        # test_hs_common.c reachability scenarios 1-6 (service, client valid-after).
        ("1985-10-26 13:00:00", "1985-10-26 15:00:00"),
        ("1985-10-26 23:00:00", "1985-10-27 01:00:00"),
        ("1985-10-27 03:00:00", "1985-10-27 05:00:00"),
        ("1985-10-27 11:00:00", "1985-10-27 13:00:00"),
        ("1985-10-27 01:00:00", "1985-10-26 23:00:00"),
        ("1985-10-27 13:00:00", "1985-10-27 11:00:00"),
        # test_client_service_hsdir_set_sync scenarios a-f.
        ("2016-04-13 11:00:00", "2016-04-13 11:00:00"),
        ("2016-04-13 23:00:00", "2016-04-13 23:00:00"),
        ("2016-04-13 11:00:00", "2016-04-13 13:00:00"),
        ("2016-04-13 13:00:00", "2016-04-13 11:00:00"),
        ("2016-04-14 01:00:00", "2016-04-13 23:00:00"),
        ("2016-04-13 23:00:00", "2016-04-14 01:00:00"),
    ],
)
def test_client_finds_a_ring_the_service_uploaded_to(service: str, client: str) -> None:
    s_va, c_va = utc(service), utc(client)
    targets = descriptor_targets(s_va, LIVE_TIME_PARAMS, *srvs_at(s_va, LIVE_TIME_PARAMS))
    fetch = client_fetch_target(c_va, LIVE_TIME_PARAMS, *srvs_at(c_va, LIVE_TIME_PARAMS))
    assert fetch in [(t.time_period, t.srv) for t in targets]


@settings(max_examples=budget(400), deadline=None)
@given(
    params=st.sampled_from([LIVE_TIME_PARAMS, TEST_NET_20S, TEST_NET_10S]),
    rounds=st.integers(min_value=10**6, max_value=10**7),
    skew=st.integers(min_value=-11, max_value=11),
)
def test_client_with_skewed_consensus_still_finds_the_descriptor(
    params: TimeParams, rounds: int, skew: int
) -> None:
    """A client whose consensus is up to 11 voting intervals older or newer than the service's
    fetches from one of the two rings the service uploads to."""
    interval = params.voting_interval_seconds
    s_va = rounds * interval
    c_va = s_va + skew * interval
    targets = descriptor_targets(s_va, params, *srvs_at(s_va, params))
    fetch = client_fetch_target(c_va, params, *srvs_at(c_va, params))
    assert fetch in [(t.time_period, t.srv) for t in targets]
    # Revision counters count from a run start that has already begun.
    assert all(t.srv_run_start <= s_va for t in targets)
