"""The intro point codec nodes exchange, timing validation at construction, the log limiter."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.messages import CoordinationError
from rustbalance.cluster.transport import RateLimitedLog
from rustbalance.config.schema import CoordinationConfig
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.intro_point_codec import decode_intro_point, encode_intro_point
from rustbalance.errors import DescriptorError
from tests.cluster_net.support import self_admitted
from tests.descriptor.helpers import make_intro_point, rng
from tests.trust import node_key


def test_intro_point_round_trip_and_strictness() -> None:
    r = rng(11)
    for index in range(5):
        point = make_intro_point(r, index=index)
        data = encode_intro_point(point)
        assert decode_intro_point(data) == point
        assert encode_intro_point(decode_intro_point(data)) == data
        with pytest.raises(DescriptorError):
            decode_intro_point(data + b"\x00")  # trailing bytes
        with pytest.raises(DescriptorError):
            decode_intro_point(data[:-1])  # truncated
        with pytest.raises(DescriptorError):
            decode_intro_point(b"\x02" + data[1:])  # unknown version


_VALID = encode_intro_point(make_intro_point(rng(3)))


@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255), st.integers(0, len(_VALID)))
def test_corrupt_intro_point_raises_only_descriptor_error(at: int, value: int, cut: int) -> None:
    corrupt = (_VALID[:at] + bytes([value]) + _VALID[at + 1 :])[:cut]
    try:
        point = decode_intro_point(corrupt)
    except DescriptorError:
        return
    # Some bytes (keys, signatures) may take any value: then it decodes to the changed point.
    assert isinstance(point, IntroPoint) and encode_intro_point(point) == corrupt


def test_bad_timings_are_refused_at_construction() -> None:
    for interval, timeout, grace in [(5, 10, 15), (5, 15, 4), (0, 15, 15)]:
        config = CoordinationConfig(
            heartbeat_interval_secs=interval,
            heartbeat_timeout_secs=timeout,
            takeover_grace_secs=grace,
        )
        with pytest.raises(CoordinationError):
            Coordinator(
                node_id="a",
                node_key=node_key("a"),
                membership=self_admitted("a", node_key("a"), "127.0.0.1:1", priority=1),
                config=config,
                state_dir=None,
                encode_intro_point=bytes,
                decode_intro_point=bytes,
            )


def test_a_node_that_is_not_admitted_cannot_coordinate() -> None:
    """No admission record for this node key (never admitted, or admitted with another key):
    the coordinator refuses to start, with a message naming the key's fingerprint."""
    key = node_key("a")
    other = self_admitted("a", node_key("a", generation=1), "127.0.0.1:1", priority=1)
    with pytest.raises(CoordinationError, match=r"not admitted with its node key SHA256:"):
        Coordinator(
            node_id="a",
            node_key=key,
            membership=other,
            config=CoordinationConfig(),
            state_dir=None,
            encode_intro_point=bytes,
            decode_intro_point=bytes,
        )


def test_rate_limited_log_one_line_per_key_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = [100.0]
    limiter = RateLimitedLog(logging.getLogger("t.limit"), 60.0, lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="t.limit")
    assert limiter.warning("forged", "dropped %s", "x")
    assert not limiter.warning("forged", "dropped %s", "x")
    assert limiter.warning("stale", "dropped %s", "y")  # another reason: its own budget
    clock[0] += 60.0
    assert limiter.warning("forged", "dropped %s", "x")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["dropped x", "dropped y", "dropped x (1 similar suppressed)"]
