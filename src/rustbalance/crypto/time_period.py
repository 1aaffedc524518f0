"""Time periods, shared-random runs and which (period, SRV) each descriptor uses.

Pure functions: every time is passed in as Unix seconds (normally the ``valid-after`` of the live
consensus, which is what tor uses, never the local clock).

Sources:

- rend-spec-v3 [TIME-PERIODS], [FIRSTDESCUPLOAD], [SECONDDESCUPLOAD], [PUB-SHAREDRANDOM].
- tor ``src/feature/hs/hs_common.c``: ``hs_get_time_period_num``,
  ``hs_get_start_time_of_next_time_period``, ``hs_in_period_between_tp_and_srv``,
  ``compute_disaster_srv``, ``hs_get_current_srv`` / ``hs_get_previous_srv``.
- tor ``src/feature/hs_common/shared_random_client.c``:
  ``sr_state_get_start_time_of_current_protocol_run`` (and ``..._previous_...``),
  ``sr_state_get_phase_duration`` (12 rounds) and ``sr_state_get_protocol_run_duration``
  (24 rounds).
- tor ``src/feature/nodelist/nodelist.c`` ``node_set_hsdir_index`` (tp and SRV of the fetch,
  store_first and store_second ring) and ``src/feature/hs/hs_service.c``
  ``build_descriptors_for_new_service`` / ``set_descriptor_revision_counter``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = [
    "LIVE_TIME_PARAMS",
    "SHARED_RANDOM_N_PHASES",
    "SHARED_RANDOM_N_ROUNDS",
    "DescriptorTarget",
    "TimeParams",
    "client_fetch_target",
    "descriptor_targets",
    "disaster_srv",
    "in_period_between_tp_and_srv",
    "srv_run_start",
    "time_period_num",
    "time_period_start",
]

# shared_random_client.h: "Each protocol phase has 12 rounds" and there are 2 phases (commit,
# reveal), so one SR protocol run lasts 24 voting intervals.
SHARED_RANDOM_N_ROUNDS = 12
SHARED_RANDOM_N_PHASES = 2

# hs_common.h HS_SRV_DISASTER_PREFIX; hashed without its NUL (HS_SRV_DISASTER_PREFIX_LEN is
# sizeof - 1).
_DISASTER_PREFIX = b"shared-random-disaster"

_SRV_LEN = 32
_UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class TimeParams:
    """The network's timing: period length and rotation offset (minutes), voting interval (s).

    On the live network these are 1440 / 720 / 3600. With ``TestingTorNetwork`` tor uses a
    period of one SR run (24 voting intervals) and an offset of one SR phase (12 intervals);
    derive them from the consensus with :func:`rustbalance.tor.consensus.time_params`.
    """

    period_length_minutes: int
    rotation_offset_minutes: int
    voting_interval_seconds: int

    def __post_init__(self) -> None:
        if self.period_length_minutes < 1:
            raise ValueError("period_length_minutes must be at least 1")
        if self.rotation_offset_minutes < 0:
            raise ValueError("rotation_offset_minutes must not be negative")
        if self.voting_interval_seconds < 1:
            raise ValueError("voting_interval_seconds must be at least 1")

    @property
    def srv_run_seconds(self) -> int:
        """Length of one shared-random protocol run (sr_state_get_protocol_run_duration)."""
        return SHARED_RANDOM_N_ROUNDS * SHARED_RANDOM_N_PHASES * self.voting_interval_seconds


# rend-spec-v3 [TIME-PERIODS]: 1440-minute periods, rotated 12 hours after the new SRV;
# dir-spec: the live network votes every hour.
LIVE_TIME_PARAMS = TimeParams(
    period_length_minutes=1440, rotation_offset_minutes=720, voting_interval_seconds=3600
)


@dataclass(frozen=True)
class DescriptorTarget:
    """Where one descriptor lives: its time period, the SRV of its HSDir ring, and the start of
    the SR protocol run its revision counter counts from (hs_service.c
    ``set_descriptor_revision_counter``)."""

    time_period: int
    srv: bytes
    srv_run_start: int


def time_period_num(unix_time: int, params: TimeParams) -> int:
    """The time period number at ``unix_time`` (hs_common.c ``hs_get_time_period_num``).

    ``tp = floor((minutes_since_epoch - rotation_offset) / period_length)``.
    """
    minutes_since_epoch = unix_time // 60
    return (minutes_since_epoch - params.rotation_offset_minutes) // params.period_length_minutes


def time_period_start(time_period: int, params: TimeParams) -> int:
    """Unix time at which ``time_period`` starts (rend-spec-v3 [TIME-PERIODS]).

    hs_common.c ``hs_get_start_time_of_next_time_period`` adds the offset in seconds
    (12 voting intervals); that equals ``rotation_offset_minutes * 60`` whenever the voting
    interval is a multiple of 5 s, which every real and test network uses.
    """
    return (time_period * params.period_length_minutes + params.rotation_offset_minutes) * 60


def srv_run_start(unix_time: int, params: TimeParams) -> int:
    """Start of the SR protocol run containing ``unix_time``, computed as tor does from the
    voting schedule (shared_random_client.c
    ``sr_state_get_start_time_of_current_protocol_run``): the round slot is
    ``(t / voting_interval) % 24`` and the run began ``slot * voting_interval`` seconds before
    ``t``. Pass the consensus ``valid-after`` (a round boundary) as ``unix_time``."""
    interval = params.voting_interval_seconds
    total_rounds = SHARED_RANDOM_N_ROUNDS * SHARED_RANDOM_N_PHASES
    slot = (unix_time // interval) % total_rounds
    return unix_time - slot * interval


def in_period_between_tp_and_srv(valid_after: int, params: TimeParams) -> bool:
    """True in segment B: after a time period started and before the next SRV (live
    12:00-00:00 UTC). hs_common.c ``hs_in_period_between_tp_and_srv``."""
    run_start = srv_run_start(valid_after, params)
    next_tp_start = time_period_start(time_period_num(run_start, params) + 1, params)
    return not (run_start <= valid_after < next_tp_start)


def disaster_srv(period_length: int, time_period: int) -> bytes:
    """The SRV used when the consensus has none (rend-spec-v3 [PUB-SHAREDRANDOM];
    hs_common.c ``compute_disaster_srv``):
    ``H("shared-random-disaster" | INT_8(period_length) | INT_8(period_num))``."""
    for name, value in (("period_length", period_length), ("time_period", time_period)):
        if not 0 <= value <= _UINT64_MAX:
            raise ValueError(f"{name} must fit in an unsigned 64-bit integer")
    return hashlib.sha3_256(
        _DISASTER_PREFIX + period_length.to_bytes(8, "big") + time_period.to_bytes(8, "big")
    ).digest()


def _check_srv(name: str, srv: bytes | None) -> None:
    if srv is not None and len(srv) != _SRV_LEN:
        raise ValueError(f"{name} must be {_SRV_LEN} bytes")


def _current_srv(srv_current: bytes | None, period_length: int, time_period: int) -> bytes:
    # hs_common.c hs_get_current_srv: the consensus value, else the disaster SRV of the period
    # the caller builds an index for.
    return srv_current if srv_current is not None else disaster_srv(period_length, time_period)


def _previous_srv(srv_previous: bytes | None, period_length: int, time_period: int) -> bytes:
    # hs_common.c hs_get_previous_srv, same fallback.
    return srv_previous if srv_previous is not None else disaster_srv(period_length, time_period)


def descriptor_targets(
    valid_after: int,
    params: TimeParams,
    srv_current: bytes | None,
    srv_previous: bytes | None,
) -> tuple[DescriptorTarget, DescriptorTarget]:
    """(first, second) descriptor targets exactly as a tor service chooses them.

    rend-spec-v3 [FIRSTDESCUPLOAD]/[SECONDDESCUPLOAD], nodelist.c ``node_set_hsdir_index``,
    hs_service.c ``build_descriptors_for_new_service``:

    - segment A (new SRV -> period start): first = ``tp`` with the previous SRV,
      second = ``tp + 1`` with the current SRV;
    - segment B (period start -> next SRV): first = ``tp - 1`` with the previous SRV,
      second = ``tp`` with the current SRV.

    A missing SRV is replaced by the disaster SRV of that descriptor's period. The first
    descriptor's revision counter counts from the start of the previous SR run, the second's
    from the current one (hs_service.c ``set_descriptor_revision_counter``).
    """
    _check_srv("srv_current", srv_current)
    _check_srv("srv_previous", srv_previous)
    length = params.period_length_minutes
    tp = time_period_num(valid_after, params)
    if in_period_between_tp_and_srv(valid_after, params):
        first_tp, second_tp = tp - 1, tp
    else:
        first_tp, second_tp = tp, tp + 1
    current_run = srv_run_start(valid_after, params)
    previous_run = current_run - params.srv_run_seconds
    first = DescriptorTarget(first_tp, _previous_srv(srv_previous, length, first_tp), previous_run)
    second = DescriptorTarget(second_tp, _current_srv(srv_current, length, second_tp), current_run)
    return first, second


def client_fetch_target(
    valid_after: int,
    params: TimeParams,
    srv_current: bytes | None,
    srv_previous: bytes | None,
) -> tuple[int, bytes]:
    """(time period, SRV) of the ring a client fetches from (nodelist.c
    ``node_set_hsdir_index``: always the current period; the current SRV in segment B,
    the previous SRV in segment A)."""
    _check_srv("srv_current", srv_current)
    _check_srv("srv_previous", srv_previous)
    length = params.period_length_minutes
    tp = time_period_num(valid_after, params)
    if in_period_between_tp_and_srv(valid_after, params):
        return tp, _current_srv(srv_current, length, tp)
    return tp, _previous_srv(srv_previous, length, tp)
