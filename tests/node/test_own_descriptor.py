"""Instance mode: which of tor's two descriptors the node takes its intro points from."""

from __future__ import annotations

from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.node.own_descriptor import OwnNextDescriptor, client_period_descriptor_needed


def _desc(period: int, revision: int = 1) -> DecodedDescriptor:
    return DecodedDescriptor(
        lifetime=180,
        revision_counter=revision,
        signing_key=b"",
        signing_cert_expiry=0,
        blinded_key=b"",
        time_period=period,
        intro_points=(),
        flow_control=None,
        pow_params=None,
        single_onion=False,
        intro_auth_required=(),
        client_auth=False,
        dropped_intro_points=(),
    )


class Fetcher:
    def __init__(self, result: DecodedDescriptor) -> None:
        self.result = result
        self.calls = 0

    async def __call__(self) -> DecodedDescriptor:
        self.calls += 1
        return self.result


def test_segment_b_is_when_desc_current_is_not_the_client_period() -> None:
    assert not client_period_descriptor_needed(100, 100)  # segment A
    assert client_period_descriptor_needed(99, 100)  # segment B: desc_current is the previous


async def test_segment_a_uses_desc_current_without_fetching() -> None:
    own = OwnNextDescriptor()
    fetch = Fetcher(_desc(101))
    current = _desc(100)
    assert await own.client_view(current, 100, 0.0, fetch) is current
    assert fetch.calls == 0


async def test_segment_b_uses_the_fetched_next_descriptor_cached_until_stale() -> None:
    own = OwnNextDescriptor(max_age=300)
    nxt = _desc(100, revision=7)
    fetch = Fetcher(nxt)
    current = _desc(99)
    assert await own.client_view(current, 100, 0.0, fetch) is nxt
    assert await own.client_view(current, 100, 299.0, fetch) is nxt
    assert fetch.calls == 1  # cached
    assert await own.client_view(current, 100, 300.0, fetch) is nxt
    assert fetch.calls == 2  # too old
    own.mark_stale()  # tor uploaded a new descriptor of ours
    await own.client_view(current, 100, 301.0, fetch)
    assert fetch.calls == 3


async def test_a_fetched_descriptor_of_another_period_is_not_used() -> None:
    own = OwnNextDescriptor()
    current = _desc(99)
    assert await own.client_view(current, 100, 0.0, Fetcher(_desc(99))) is current
