"""Helpers for end-to-end tests on the private Tor network: HTTP through a Tor client's
SOCKS port, and bounded waits for descriptors to appear."""

from __future__ import annotations

import asyncio
import time

from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.errors import RustBalanceError
from rustbalance.testnet.apps import NamedHTTPServer, http_get_via_tor
from rustbalance.tor.network import Controller, FetchError, NetworkView, fetch_descriptor

__all__ = [
    "NamedHTTPServer",
    "get_with_retries",
    "http_get_via_tor",
    "wait_for_descriptor",
]


async def get_with_retries(
    socks: tuple[str, int],
    host: str,
    *,
    isolation: str,
    deadline_s: float = 120.0,
    per_try: float = 30.0,
) -> str:
    """Retry a GET until it answers 200 (onion services take a while to become reachable)."""
    deadline = time.monotonic() + deadline_s
    last: BaseException | None = None
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        try:
            status, body = await http_get_via_tor(
                socks, host, isolation=f"{isolation}-{attempt}", timeout=per_try
            )
            if status == 200:
                return body
            last = RuntimeError(f"HTTP status {status}")
        except (OSError, TimeoutError, Exception) as exc:  # python-socks raises its own types
            last = exc
        await asyncio.sleep(2)
    raise AssertionError(f"{host} not reachable within {deadline_s} s: {last!r}")


async def wait_for_descriptor(
    ctrl: Controller,
    address: str,
    view: NetworkView,
    *,
    deadline_s: float = 120.0,
) -> DecodedDescriptor:
    """HSFETCH ``address`` until a verified descriptor comes back (services publish a few
    seconds after they bootstrap)."""
    deadline = time.monotonic() + deadline_s
    last: RustBalanceError | None = None
    while time.monotonic() < deadline:
        try:
            return await fetch_descriptor(ctrl, address, view, timeout=30)
        except FetchError as exc:
            last = exc
        await asyncio.sleep(3)
    raise AssertionError(f"no descriptor for {address} within {deadline_s} s: {last}")
