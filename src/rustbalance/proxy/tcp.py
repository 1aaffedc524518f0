"""tcp mode: connect to the target and relay bytes both ways (asyncio shell).

Plain TCP on both sides relays with splice(2) (the bytes stay in the kernel); TLS to the
target, or a loop without the selector internals splice needs, relays through streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .relay import can_splice, relay_both, splice_both
from .session import Outcome, Phase, ProxyStats, SessionState
from .sockets import close_writer
from .upstream import ConnectTimeout, Upstream, UpstreamError

log = logging.getLogger("rustbalance.proxy")


async def serve_tcp(
    state: SessionState,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    connect: Callable[[], Awaitable[Upstream]],
    stats: ProxyStats,
    read_size: int,
    splice: bool,
    count_up: Callable[[int], None],
    count_down: Callable[[int], None],
) -> None:
    """One tcp-mode connection: the target connection, then the relay until both ends close."""
    state.phase = Phase.CONNECTING
    try:
        upstream = await connect()
    except ConnectTimeout as exc:
        log.warning("%s", exc)
        stats.connect_timeouts += 1
        state.set_outcome(Outcome.CONNECT_TIMEOUT)
        return
    except UpstreamError as exc:
        log.warning("Session #%d: %s", state.session_id, exc)
        stats.upstream_errors += 1
        state.set_outcome(Outcome.UPSTREAM_ERROR)
        return
    state.phase = Phase.ACTIVE
    state.touch(asyncio.get_running_loop().time())
    try:
        if splice and can_splice(writer, upstream.writer):
            # Plain TCP both sides: the bytes stay in the kernel (splice through a pipe).
            await splice_both(
                reader,
                writer,
                upstream.reader,
                upstream.writer,
                count_up=count_up,
                count_down=count_down,
            )
            return
        await relay_both(
            reader,
            writer,
            upstream.reader,
            upstream.writer,
            read_size=read_size,
            count_up=count_up,
            count_down=count_down,
        )
    finally:
        await close_writer(upstream.writer, graceful=False)
