"""Helpers for the proof-of-work tests on the private Tor network (docs/pow.md).

A tor client solves a PoW puzzle only when the descriptor it holds suggests an effort above 0,
and a tor service raises its suggested effort only after minutes under an introduction flood
(``hs_service.c`` ``update_suggested_effort``, every 300 s). So the tests publish the descriptor
themselves, signed with the key they created, with the seed and intro points of the tors under
test and a chosen effort: exactly what tor would publish under attack, without the attack.

- :func:`publish_for_client`: upload both descriptors, then make a *fresh* client fetch (and
  cache) the one it will use, and check it is ours (no older upload of anyone else can slip in);
- :func:`visit`: one HTTP GET through that client, run as a task the caller can watch;
- :class:`TorLog`: the lines a tor logged since a point in time (tor logs a dropped solution at
  ``warn``: ``hs_pow.c`` ``hs_pow_verify``, and with ``ProtocolWarnings 1`` ``hs_cell.c``
  ``parse_introduce_cell_extension``);
- :func:`rend_efforts`: from a service tor's ``CIRC`` events, the effort of each rendezvous
  circuit it launched: ``HS_POW=v1,<effort>`` for a verified solution, 0 without one
  (``hs_circuit.c`` ``launch_rendezvous_point_circuit``, ``control_fmt.c``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from rustbalance.crypto.keys import IdentityKey
from rustbalance.descriptor.builder import PowParams
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.testnet import TorInstance
from rustbalance.testnet.apps import http_get_via_tor
from rustbalance.tor.control import ControlConnection, Subscription
from rustbalance.tor.network import (
    PeriodLabel,
    RevisionClock,
    fetch_descriptor,
    publish_master,
    read_network_view,
)

__all__ = [
    "EFFORT",
    "TorLog",
    "drain",
    "publish_for_client",
    "rend_efforts",
    "visit",
    "wait_unserved",
    "watch_circuits",
]

# Small enough to solve in well under a second on this machine, far above 0.
EFFORT = 10

# A CIRC event of a service's rendezvous circuit; HS_POW only when a solution was verified.
_REND_RE = re.compile(r"^(\d+) \w+ .*\bPURPOSE=HS_SERVICE_REND\b")
_HS_POW_RE = re.compile(r"\bHS_POW=v1,(\d+)\b")


@dataclass
class TorLog:
    """A tor's log from the moment this object was made."""

    tor: TorInstance
    offset: int = field(init=False)

    def __post_init__(self) -> None:
        self.offset = len(self.tor.log_text())

    def text(self) -> str:
        return self.tor.log_text()[self.offset :]

    async def wait_for(self, pattern: str, timeout: float) -> str:  # noqa: ASYNC109
        """Wait (bounded) for a new line matching ``pattern``; return it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.text().splitlines():
                if regex.search(line):
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.tor.name} logged no line matching {pattern!r} within {timeout:.0f} s; "
                    f"new lines:\n{self.text()[-2000:]}"
                )
            await asyncio.sleep(0.25)


async def publish_for_client(
    uploader: str,
    client: str,
    identity: IdentityKey,
    points: Sequence[IntroPoint],
    pow_params: PowParams | None,
    clock: RevisionClock,
) -> DecodedDescriptor:
    """Upload the descriptor of ``identity`` that clients use now (through ``uploader``; the
    other one, which tor may still serve in the next half of the period, is left alone), then
    have ``client`` fetch it and check that it is this upload."""
    async with await ControlConnection.connect(uploader) as ctrl:
        view = await read_network_view(ctrl)
        first, _second = view.descriptor_targets()
        label: PeriodLabel = (
            "current" if first.time_period == view.current_time_period() else "next"
        )
        results = await publish_master(
            ctrl,
            identity,
            points,
            view,
            revision_clock=clock,
            pow_params=pow_params,
            periods=(label,),
        )
    for label, result in results.items():
        assert result.ok, (label, result.error, result.hsdirs)
    async with await ControlConnection.connect(client) as ctrl:
        view = await read_network_view(ctrl)
        decoded = await fetch_descriptor(ctrl, identity.onion_address, view)
    posted = {r.time_period: r.revision_counter for r in results.values()}
    assert decoded.revision_counter == posted.get(decoded.time_period), "not our upload"
    assert decoded.pow_params == pow_params
    assert {p.auth_key for p in decoded.intro_points} == {p.auth_key for p in points}
    return decoded


def visit(client: TorInstance, address: str, tag: str) -> asyncio.Task[tuple[int, str]]:
    """GET ``http://address/`` through ``client`` (a fresh circuit) as a task."""
    assert client.socks_address is not None
    return asyncio.ensure_future(
        http_get_via_tor(client.socks_address, address, isolation=f"pow-{tag}", timeout=90)
    )


async def wait_unserved(
    visit_task: asyncio.Task[tuple[int, str]], log: TorLog, dropped: str, *, grace: float = 10.0
) -> str:
    """The service's tor logs ``dropped`` (regex), and the client gets no answer for ``grace``
    seconds more; returns the log line. The visit is cancelled afterwards."""
    try:
        line = await log.wait_for(dropped, 60)
        done, _ = await asyncio.wait({visit_task}, timeout=grace)
        if done:
            outcome = visit_task.exception() or visit_task.result()
            assert not isinstance(outcome, tuple), f"the client was served: {outcome}"
        return line
    finally:
        visit_task.cancel()
        await asyncio.gather(visit_task, return_exceptions=True)


@contextlib.asynccontextmanager
async def watch_circuits(control: str) -> AsyncIterator[Subscription]:
    """``CIRC`` events of the tor at ``control`` while the block runs."""
    async with contextlib.AsyncExitStack() as stack:
        ctrl = await stack.enter_async_context(await ControlConnection.connect(control))
        yield await stack.enter_async_context(await ctrl.subscribe("CIRC"))


def drain(sub: Subscription) -> list[str]:
    """The text of every event queued on ``sub`` now."""
    texts: list[str] = []
    while (event := sub.get_nowait()) is not None:
        texts.append(event.text)
    return texts


def rend_efforts(circ_events: Sequence[str]) -> dict[str, int]:
    """Rendezvous circuits a service tor launched: circuit id -> verified PoW effort (0 when
    the introduction carried no solution)."""
    efforts: dict[str, int] = {}
    for text in circ_events:
        rend = _REND_RE.match(text)
        if rend is None:
            continue
        pow_match = _HS_POW_RE.search(text)
        effort = int(pow_match.group(1)) if pow_match else 0
        efforts[rend.group(1)] = max(efforts.get(rend.group(1), 0), effort)
    return efforts
