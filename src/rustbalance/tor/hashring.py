"""The v3 HSDir hash ring: which relays store (or serve) a descriptor.

Pure functions, no I/O. Sources: rend-spec-v3 [HASHRING] / [WHERE-HSDESC] and tor
``src/feature/hs/hs_common.c`` (``hs_build_hs_index``, ``hs_build_hsdir_index``,
``hs_get_responsible_hsdirs``).

Typical use for one descriptor (see :func:`rustbalance.crypto.time_period.descriptor_targets`)::

    ring = responsible_hsdirs(blinded_key, target.time_period, period_length, target.srv,
                              hsdirs, params.n_replicas, params.spread_store)
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["RingMember", "hs_index", "relay_index", "responsible_hsdirs"]

# hs_common.h HS_INDEX_PREFIX / HSDIR_INDEX_PREFIX, hashed without their NUL
# (the *_PREFIX_LEN macros are sizeof - 1).
_HS_INDEX_PREFIX = b"store-at-idx"
_HSDIR_INDEX_PREFIX = b"node-idx"

_KEY_LEN = 32
_UINT64_MAX = 2**64 - 1


class RingMember(Protocol):
    """Anything with the relay's 32-byte ed25519 identity (e.g. ``consensus.HSDirRelay``)."""

    @property
    def ed25519_id(self) -> bytes: ...


RelayT = TypeVar("RelayT", bound=RingMember)


def _uint64(name: str, value: int) -> bytes:
    if not 0 <= value <= _UINT64_MAX:
        raise ValueError(f"{name} must fit in an unsigned 64-bit integer")
    return value.to_bytes(8, "big")


def _check_len(name: str, value: bytes) -> None:
    if len(value) != _KEY_LEN:
        raise ValueError(f"{name} must be {_KEY_LEN} bytes, got {len(value)}")


def hs_index(blinded_key: bytes, replica: int, period_length: int, time_period: int) -> bytes:
    """Service index of one replica (rend-spec-v3 [HASHRING], hs_common.c
    ``hs_build_hs_index``):
    ``H("store-at-idx" | blinded_key | INT_8(replica) | INT_8(period_length) | INT_8(tp))``."""
    _check_len("blinded_key", blinded_key)
    return hashlib.sha3_256(
        _HS_INDEX_PREFIX
        + blinded_key
        + _uint64("replica", replica)
        + _uint64("period_length", period_length)
        + _uint64("time_period", time_period)
    ).digest()


def relay_index(ed25519_id: bytes, srv: bytes, time_period: int, period_length: int) -> bytes:
    """Relay index on the ring (rend-spec-v3 [HASHRING], hs_common.c ``hs_build_hsdir_index``):
    ``H("node-idx" | ed25519_id | srv | INT_8(tp) | INT_8(period_length))``. Note that tp
    comes before the length here, the reverse of :func:`hs_index`."""
    _check_len("ed25519_id", ed25519_id)
    _check_len("srv", srv)
    return hashlib.sha3_256(
        _HSDIR_INDEX_PREFIX
        + ed25519_id
        + srv
        + _uint64("time_period", time_period)
        + _uint64("period_length", period_length)
    ).digest()


def responsible_hsdirs(
    blinded_key: bytes,
    time_period: int,
    period_length: int,
    srv: bytes,
    relays: Sequence[RelayT],
    n_replicas: int,
    spread: int,
) -> list[RelayT]:
    """The HSDirs responsible for a descriptor, in the order tor picks them.

    ``relays`` must already be the HSDir-capable relays (HSDir flag, ``HSDir=2``, ed25519 id;
    see ``consensus.hsdir_relays``). Follows hs_common.c ``hs_get_responsible_hsdirs``: sort by
    relay index; for each replica 1..n_replicas, start at the first relay whose index is >= the
    service index (wrapping to the start), take ``spread`` relays not already chosen for an
    earlier replica, and stop after one full turn of the ring. ``spread`` is
    ``hsdir_spread_store`` for uploads and ``hsdir_spread_fetch`` for fetches.
    """
    _check_len("blinded_key", blinded_key)
    _check_len("srv", srv)
    if n_replicas < 1:
        raise ValueError("n_replicas must be at least 1")
    if spread < 1:
        raise ValueError("spread must be at least 1")
    if not relays:
        return []

    ring = sorted(
        ((relay_index(r.ed25519_id, srv, time_period, period_length), r) for r in relays),
        key=lambda item: item[0],
    )
    keys = [index for index, _ in ring]
    # Tor tracks the chosen routerstatus pointers; positions in the sorted ring are the same
    # identity (two entries for one relay would also be two entries in tor's list).
    chosen_positions: set[int] = set()
    result: list[RelayT] = []
    for replica in range(1, n_replicas + 1):
        target = hs_index(blinded_key, replica, period_length, time_period)
        # smartlist_bsearch_idx: the matching member, else the first greater one, else the
        # list length, which tor wraps to 0.
        start = bisect.bisect_left(keys, target)
        if start == len(ring):
            start = 0
        position = start
        added = 0
        while added < spread:
            if position not in chosen_positions:
                chosen_positions.add(position)
                result.append(ring[position][1])
                added += 1
            position = (position + 1) % len(ring)
            if position == start:
                break
    return result
