"""When and how to publish the master descriptor (Phase 1.4, 1.5 and 2.3).

- First publish as soon as possible (Phase 1.5): poll for own intro points every 5 s for at most
  120 s instead of a fixed 90 s sleep.
- Publish with retries (Phase 1.4): after a failed publish up to 3 retries with
  ``backoff(attempt, 5, 30)`` (about 5/10/20 s plus jitter), reconnecting to tor before each.
  Each time period is tracked separately: a failed "next" upload never discards a successful
  "current" one; the publish fails only if no period succeeded. A node that carries
  ``pow-params`` uploads only the first descriptor (:func:`periods_to_publish`).
- Refresh schedule and emergency republish (Phase 2.3): publish every ``refresh_interval`` (600 s)
  or earlier on a trigger (intro points changed, new time period / SRV, tor restarted); if the
  last successful publish is older than ``descriptor_max_age`` (900 s), WARN and publish now.
  Wake up every 30 s while never published and every 60 s once the age passed half the maximum.

Times are unix seconds from an injected clock; sleeping and randomness are injected too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

Period = Literal["current", "next"]
PERIODS: tuple[Period, ...] = ("current", "next")

MSG_RETRIES_EXHAUSTED = "Failed to publish after 3 retries"

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


# ---------------------------------------------------------------------------------------------
# Phase 1.5: first-publish wait


async def wait_for_intro_points(
    has_intro_points: Callable[[], bool | Awaitable[bool]],
    *,
    clock: Clock,
    sleep: Sleep,
    poll_interval: float = 5.0,
    max_wait: float = 120.0,
) -> bool:
    """Poll ``has_intro_points`` until true or ``max_wait`` passed; True if intro points exist."""
    log.info("Publish loop waiting for intro points (max %.0f seconds)...", max_wait)
    start = clock()
    while True:
        answer = has_intro_points()
        ready = await answer if isinstance(answer, Awaitable) else answer
        elapsed = clock() - start
        if ready:
            log.info("Intro points available after %ds - starting publish loop", int(elapsed))
            return True
        if elapsed >= max_wait:
            log.warning(
                "No intro points after %.0fs - starting publish loop anyway (will retry)",
                max_wait,
            )
            return False
        await sleep(min(poll_interval, max_wait - elapsed))


# ---------------------------------------------------------------------------------------------
# Phase 1.4: backoff and per-period results


def backoff(
    attempt: int,
    base: float = 5.0,
    cap: float = 30.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before retry ``attempt`` (1-based): base·2^(attempt-1) plus up to 25 % jitter, capped.

    With the defaults: about 5, 10, 20 s, never more than 30 s.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    delay = min(base * float(2 ** min(attempt - 1, 16)), cap)
    jitter = delay * 0.25 * min(max(rand(), 0.0), 1.0)
    return min(delay + jitter, cap)


@dataclass(frozen=True)
class HsDirResult:
    """One HSDir's answer to an upload (HS_DESC UPLOADED / FAILED, Phase 3.7)."""

    hsdir: str
    ok: bool
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"hsdir": self.hsdir, "ok": self.ok, "reason": self.reason}


@dataclass(frozen=True)
class PeriodResult:
    """The upload of one descriptor (one time period)."""

    ok: bool
    error: str | None = None
    hsdirs: tuple[HsDirResult, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "error": self.error,
            "hsdirs": [h.to_dict() for h in self.hsdirs],
            "hsdirs_ok": sum(1 for h in self.hsdirs if h.ok),
            "hsdirs_failed": sum(1 for h in self.hsdirs if not h.ok),
        }


PublishOutcome = Mapping[Period, PeriodResult]
PublishOnce = Callable[[], Awaitable[PublishOutcome]]


def periods_to_publish(carries_pow: bool) -> tuple[Period, ...]:
    """Which of the two master descriptors this node uploads (docs/pow.md section 5).

    Both, except when the node carries ``pow-params`` (a lone ``shared`` node with
    ``tor.pow_enabled``): its intro points are read from tor's first descriptor
    (``hs/service/desc/id``), and tor checks a PoW solution against the blinded key of the
    descriptor that owns the intro point (hs_service.c ``pick_needed_intro_points``, hs_cell.c
    ``handle_introduce2_encrypted_cell_pow_extension``). In the second descriptor, which
    clients use in the second half of a period, they would drop every solved introduction;
    tor's own upload of its second descriptor is left in place instead.
    """
    return ("current",) if carries_pow else PERIODS


def outcome_ok(outcome: PublishOutcome) -> bool:
    """A publish succeeds when at least one period's descriptor was uploaded (Phase 1.4)."""
    return any(result.ok for result in outcome.values())


def outcome_error(outcome: PublishOutcome) -> str:
    parts = [f"{p}: {r.error or 'failed'}" for p, r in outcome.items() if not r.ok]
    return "; ".join(parts) if parts else "no descriptor uploaded"


@dataclass
class PublishState:
    """What status and metrics show about publishing; updated by :func:`publish_with_retries`."""

    last_attempt: float | None = None
    last_success: dict[Period, float] = field(default_factory=dict)
    last_results: dict[Period, PeriodResult] = field(default_factory=dict)
    consecutive_failures: int = 0
    total_publishes: int = 0
    total_failures: int = 0

    def record(self, outcome: PublishOutcome, now: float) -> bool:
        """Record one publish attempt; a period that failed keeps its older success time."""
        self.last_attempt = now
        for period, result in outcome.items():
            self.last_results[period] = result
            if result.ok:
                self.last_success[period] = now
        ok = outcome_ok(outcome)
        if ok:
            self.total_publishes += 1
            self.consecutive_failures = 0
        else:
            self.total_failures += 1
            self.consecutive_failures += 1
        return ok

    def copy(self) -> PublishState:
        """An independent copy (for a snapshot: later publishes do not change it)."""
        return PublishState(
            self.last_attempt,
            dict(self.last_success),
            dict(self.last_results),
            self.consecutive_failures,
            self.total_publishes,
            self.total_failures,
        )

    @property
    def last_any_success(self) -> float | None:
        return max(self.last_success.values(), default=None)

    def descriptor_age(self, now: float) -> float | None:
        last = self.last_any_success
        return None if last is None else now - last

    def to_status(self) -> dict[str, object]:
        """The ``last_publish`` part of the status document."""
        return {
            "current": self.last_success.get("current"),
            "next": self.last_success.get("next"),
            "last_attempt": self.last_attempt,
            "consecutive_failures": self.consecutive_failures,
            "results": {p: r.to_dict() for p, r in sorted(self.last_results.items())},
        }


async def _attempt(publish_once: PublishOnce) -> PublishOutcome:
    try:
        return await publish_once()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a dead controller fails both periods
        error = str(exc) or type(exc).__name__
        return {p: PeriodResult(ok=False, error=error) for p in PERIODS}


def _log_success(outcome: PublishOutcome, suffix: str = "") -> None:
    done = [p for p, r in outcome.items() if r.ok]
    log.info("Published descriptor for %s period%s", " and ".join(done), suffix)
    for period, result in outcome.items():
        if not result.ok:
            # Phase 1.4: keep the period that succeeded; the failed one is retried next round.
            log.warning(
                "Failed to publish %s period descriptor: %s", period, result.error or "failed"
            )


async def publish_with_retries(
    publish_once: PublishOnce,
    reconnect: Callable[[], Awaitable[None]],
    state: PublishState,
    *,
    clock: Clock,
    sleep: Sleep,
    rand: Callable[[], float] = random.random,
    retries: int = 3,
    base: float = 5.0,
    cap: float = 30.0,
) -> bool:
    """Phase 1.4: publish; on total failure retry up to ``retries`` times with backoff."""
    outcome = await _attempt(publish_once)
    if state.record(outcome, clock()):
        _log_success(outcome)
        return True
    log.warning("Failed to publish descriptor: %s", outcome_error(outcome))
    for attempt in range(1, retries + 1):
        delay = backoff(attempt, base, cap, rand)
        log.info("Retrying publish in %.1fs (retry %d/%d)", delay, attempt, retries)
        await sleep(delay)
        try:
            await reconnect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("Reconnecting to the Tor control port failed: %s", exc)
        outcome = await _attempt(publish_once)
        if state.record(outcome, clock()):
            _log_success(outcome, f" (retry {attempt}/{retries})")
            return True
        log.warning("Publish retry %d/%d failed: %s", attempt, retries, outcome_error(outcome))
    log.error("Failed to publish after %d retries", retries)
    return False


# ---------------------------------------------------------------------------------------------
# Phase 2.3: refresh schedule and emergency republish


@dataclass(frozen=True)
class ScheduleDecision:
    publish: bool
    reasons: tuple[str, ...]
    emergency: bool = False
    age: float | None = None


@dataclass
class PublishSchedule:
    """Pure refresh schedule; ``now`` and ``last_success`` are unix seconds."""

    refresh_interval: float = 600.0
    max_age: float = 900.0
    never_published_recheck: float = 30.0
    aging_recheck: float = 60.0
    next_due: float | None = None  # None: publish at the first decision
    pending: list[str] = field(default_factory=list)

    def trigger(self, reason: str) -> None:
        """Publish early: intro points changed, new time period / SRV, tor restarted, ..."""
        if reason not in self.pending:
            self.pending.append(reason)

    def decide(self, now: float, last_success: float | None) -> ScheduleDecision:
        age = None if last_success is None else now - last_success
        if age is not None and age > self.max_age:
            return ScheduleDecision(True, ("emergency",), emergency=True, age=age)
        reasons = list(self.pending)
        if last_success is None:
            reasons.append("never published")
        if self.next_due is None or now >= self.next_due:
            reasons.append("refresh interval")
        return ScheduleDecision(bool(reasons), tuple(reasons), age=age)

    def published(self, now: float) -> None:
        """A publish round ran (whatever its result): the next one is due in refresh_interval."""
        self.next_due = now + self.refresh_interval
        self.pending.clear()

    def sleep_for(self, now: float, last_success: float | None) -> float:
        """How long to wait before the next decision (if no trigger arrives)."""
        wait = self.refresh_interval if self.next_due is None else self.next_due - now
        if last_success is None:
            wait = min(wait, self.never_published_recheck)
        elif now - last_success > self.max_age / 2:
            wait = min(wait, self.aging_recheck)
        return max(wait, 0.0)


class PublishTrigger:
    """Wakes the publish loop early; a thin asyncio shell around :meth:`PublishSchedule.trigger`."""

    def __init__(self, schedule: PublishSchedule) -> None:
        self._schedule = schedule
        self._event = asyncio.Event()

    def fire(self, reason: str) -> None:
        self._schedule.trigger(reason)
        self._event.set()

    async def wait(self, seconds: float) -> None:
        """Return after ``seconds`` or as soon as a trigger fires."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        self._event.clear()


async def run_publish_loop(
    publish_once: PublishOnce,
    reconnect: Callable[[], Awaitable[None]],
    has_intro_points: Callable[[], bool | Awaitable[bool]],
    state: PublishState,
    schedule: PublishSchedule,
    *,
    clock: Clock,
    sleep: Sleep,
    wait: Sleep,
    is_publisher: Callable[[], bool] = lambda: True,
    rand: Callable[[], float] = random.random,
    poll_interval: float = 5.0,
    max_wait: float = 120.0,
) -> None:
    """The publish loop: first-publish wait, then publish on schedule, triggers and emergencies.

    ``wait(timeout)`` returns early when a trigger fires (``PublishTrigger.wait``); ``sleep`` is
    used for the intro-point polls and retry backoff.
    """
    await wait_for_intro_points(
        has_intro_points, clock=clock, sleep=sleep, poll_interval=poll_interval, max_wait=max_wait
    )
    while True:
        now = clock()
        last = state.last_any_success
        if is_publisher():
            decision = schedule.decide(now, last)
            if decision.publish:
                if decision.emergency and decision.age is not None:
                    log.warning(
                        "Descriptor age %ds exceeds maximum, forcing emergency republish",
                        int(decision.age),
                    )
                else:
                    log.debug("Publishing: %s", ", ".join(decision.reasons))
                await publish_with_retries(
                    publish_once, reconnect, state, clock=clock, sleep=sleep, rand=rand
                )
                schedule.published(clock())
        else:
            # Standby: nothing to publish; forget triggers meant for the publisher.
            schedule.pending.clear()
        now = clock()
        await wait(schedule.sleep_for(now, state.last_any_success))
