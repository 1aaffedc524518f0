"""Helpers for the instance-mode and plain-backend end-to-end tests (issue 5).

- :func:`names_served`: GETs the master address over isolated circuits (a fresh SOCKS user
  name each, tor's ``IsolateSOCKSAuth``) until every expected target answered, bounded;
- :func:`master_intro_keys`: the intro auth keys of the master descriptor as a client fetches
  it from the HSDirs (HSFETCH through the client's control port).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection

from rustbalance.testnet import TorInstance
from rustbalance.tor.control import ControlConnection
from rustbalance.tor.network import FetchError, fetch_descriptor, read_network_view
from tests.torhelpers import http_get_via_tor

__all__ = ["master_intro_keys", "names_served"]


async def names_served(
    socks: tuple[str, int],
    address: str,
    expected: Collection[str],
    *,
    tag: str,
    deadline_s: float = 240.0,
    per_try: float = 30.0,
) -> dict[str, int]:
    """Bodies seen (``hello from <name>`` -> count) until every name in ``expected`` answered;
    AssertionError naming what was missing after ``deadline_s``."""
    seen: dict[str, int] = {}
    errors: list[str] = []
    deadline = time.monotonic() + deadline_s
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        try:
            status, body = await http_get_via_tor(
                socks, address, isolation=f"{tag}-{attempt}", timeout=per_try
            )
        except Exception as exc:  # python-socks raises its own types
            errors.append(type(exc).__name__)
            await asyncio.sleep(1)
            continue
        if status == 200:
            name = body.strip().removeprefix("hello from ")
            seen[name] = seen.get(name, 0) + 1
            if set(expected) <= set(seen):
                return seen
    raise AssertionError(
        f"{address}: not every target answered within {deadline_s:.0f} s: saw {seen}, "
        f"expected {sorted(expected)}, {attempt} attempts, errors {errors[-5:]}"
    )


async def master_intro_keys(
    client: TorInstance, address: str, fetch_secs: float = 30
) -> set[bytes]:
    """The intro auth keys of ``address``'s descriptor as ``client`` fetches it now."""
    async with await ControlConnection.connect(client.control_address) as conn:
        view = await read_network_view(conn)
        try:
            decoded = await fetch_descriptor(conn, address, view, timeout=fetch_secs)
        except FetchError:
            return set()
    return {p.auth_key for p in decoded.intro_points}
