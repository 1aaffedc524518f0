"""The tor network as the node's components see it: one interface, injected.

:class:`TorNetwork` is everything the publisher, the intro-point watch and the consensus watch
ask of tor: read the network view, read our own descriptor, fetch a descriptor, upload a
planned one, upload one descriptor per HSDir and fetch back what each HSDir serves (distinct
descriptors, docs/distinct-descriptors.md), follow our own descriptor's ``HS_DESC`` events,
switch tor's native publishing and start a fresh control session. :class:`ControlTorNetwork`
does it over the daemon's control connection with the primitives of
:mod:`rustbalance.tor.network`; unit tests give the components a fake, and end-to-end tests
that need a fault real tor cannot produce wrap this class (``tests/node_e2e``), instead of
patching module globals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.tor.consensus import HSDirRelay
from rustbalance.tor.control import ControlTimeoutError, ReconnectingController, Subscription
from rustbalance.tor.control_protocol import ControlProtocolError, ControlReplyError, HsDescEvent
from rustbalance.tor.network import (
    HsDirFetch,
    HsDirUpload,
    NetworkView,
    PlannedDescriptor,
    fetch_descriptor,
    fetch_per_hsdir,
    read_network_view,
    read_own_descriptor,
    upload_descriptor,
    upload_per_hsdir,
)

__all__ = [
    "CONTROL_WAIT_SECS",
    "ControlTorNetwork",
    "DescriptorEvents",
    "TorNetwork",
    "native_publishing_conf",
]

# How long to wait for the control session when one is needed (reconnects back off <= 5 s).
CONTROL_WAIT_SECS = 30.0


def native_publishing_conf(on: bool) -> Mapping[str, str]:
    """The SETCONF that switches tor's own descriptor uploads (tor manual,
    ``PublishHidServDescriptors``)."""
    return {"PublishHidServDescriptors": "1" if on else "0"}


class DescriptorEvents(Protocol):
    """``HS_DESC`` events (tor.md §9.3-§9.4) as they arrive."""

    async def next(self, timeout: float) -> HsDescEvent | None:  # noqa: ASYNC109
        """The next event, or None when none (that parses) came within ``timeout`` s."""
        ...

    async def aclose(self) -> None: ...


class TorNetwork(Protocol):
    """What the node's components need of tor (one control session, reconnecting)."""

    async def read_view(self) -> NetworkView:
        """The consensus and microdescriptors: periods, SRVs, the HSDir ring."""
        ...

    async def consensus_valid_after(self) -> str | None:
        """``consensus/valid-after``; None when this tor cannot say (read the view instead)."""
        ...

    async def read_own_descriptor(self, address: str, view: NetworkView) -> DecodedDescriptor:
        """tor's first descriptor of the service it hosts; ControlReplyError 551 before tor
        built one."""
        ...

    async def fetch(self, address: str, view: NetworkView, *, timeout: float) -> DecodedDescriptor:  # noqa: ASYNC109
        """HSFETCH ``address`` from the HSDirs a client would ask; verified and decrypted."""
        ...

    async def upload(self, planned: PlannedDescriptor, timeout: float) -> list[HsDirUpload]:  # noqa: ASYNC109
        """HSPOST one planned descriptor to its HSDirs; each HSDir's verdict."""
        ...

    async def upload_per_hsdir(
        self,
        address: str,
        uploads: Sequence[tuple[HSDirRelay, str]],
        timeout: float,  # noqa: ASYNC109
    ) -> list[HsDirUpload]:
        """HSPOST each text to its own HSDir only; each HSDir's verdict, in order."""
        ...

    async def fetch_per_hsdir(
        self,
        address: str,
        view: NetworkView,
        hsdirs: Sequence[HSDirRelay],
        timeout: float,  # noqa: ASYNC109
    ) -> list[HsDirFetch]:
        """HSFETCH ``SERVER=`` each HSDir: what each one serves now (current period)."""
        ...

    async def descriptor_events(self) -> DescriptorEvents:
        """Subscribe to ``HS_DESC``; the caller closes the stream."""
        ...

    async def set_native_publishing(self, on: bool) -> None:
        """tor's own uploads of the service it hosts, on or off."""
        ...

    async def fresh_session(self) -> None:
        """Drop the control session and wait for a new one (before a publish retry)."""
        ...


class _SubscriptionEvents:
    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    async def next(self, timeout: float) -> HsDescEvent | None:  # noqa: ASYNC109
        try:
            raw = await self._sub.get(timeout)
        except ControlTimeoutError:
            return None
        try:
            return HsDescEvent.from_event(raw)
        except ControlProtocolError:
            return None

    async def aclose(self) -> None:
        await self._sub.aclose()


class ControlTorNetwork:
    """:class:`TorNetwork` over the daemon's reconnecting control session.

    ``controller`` returns the session (it raises ControlError while there is none yet)."""

    def __init__(self, controller: Callable[[], ReconnectingController]) -> None:
        self._controller = controller

    async def read_view(self) -> NetworkView:
        return await read_network_view(self._controller())

    async def consensus_valid_after(self) -> str | None:
        key = "consensus/valid-after"
        try:
            return (await self._controller().get_info(key))[key]
        except ControlReplyError:
            return None  # older tor

    async def read_own_descriptor(self, address: str, view: NetworkView) -> DecodedDescriptor:
        return await read_own_descriptor(self._controller(), address, view)

    async def fetch(self, address: str, view: NetworkView, *, timeout: float) -> DecodedDescriptor:  # noqa: ASYNC109
        return await fetch_descriptor(self._controller(), address, view, timeout=timeout)

    async def upload(self, planned: PlannedDescriptor, timeout: float) -> list[HsDirUpload]:  # noqa: ASYNC109
        return await upload_descriptor(
            self._controller(), planned.text, planned.address, planned.hsdirs, timeout=timeout
        )

    async def upload_per_hsdir(
        self,
        address: str,
        uploads: Sequence[tuple[HSDirRelay, str]],
        timeout: float,  # noqa: ASYNC109
    ) -> list[HsDirUpload]:
        return await upload_per_hsdir(self._controller(), address, uploads, timeout=timeout)

    async def fetch_per_hsdir(
        self,
        address: str,
        view: NetworkView,
        hsdirs: Sequence[HSDirRelay],
        timeout: float,  # noqa: ASYNC109
    ) -> list[HsDirFetch]:
        return await fetch_per_hsdir(self._controller(), address, view, hsdirs, timeout=timeout)

    async def descriptor_events(self) -> DescriptorEvents:
        return _SubscriptionEvents(await self._controller().subscribe("HS_DESC"))

    async def set_native_publishing(self, on: bool) -> None:
        await self._controller().set_conf(native_publishing_conf(on))

    async def fresh_session(self) -> None:
        ctrl = self._controller()
        conn = ctrl.connection
        if conn is not None:
            await conn.close()  # the controller notices and reconnects (re-subscribing)
        await ctrl.wait_connected(CONTROL_WAIT_SECS)
