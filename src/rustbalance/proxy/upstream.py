"""Opening the connection to the target: through Tor's SOCKS5 port or directly (asyncio)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass

from python_socks import ProxyError as SocksProxyError
from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy as SocksProxy

from .protocol import open_stream
from .settings import ProxyError, ProxySettings, Target, format_seconds


class ConnectTimeout(ProxyError):
    """The target (or the SOCKS port in front of it) did not answer within connect_timeout."""


class UpstreamError(ProxyError):
    """The target could not be reached (refused, SOCKS error reply, TLS failure...)."""


@dataclass(frozen=True)
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


def timeout_message(settings: ProxySettings) -> str:
    """The exact log line for a connect timeout (tor operators grep for it)."""
    seconds = format_seconds(settings.connect_timeout)
    if settings.target.is_onion:
        return f"SOCKS5 connect timed out after {seconds} seconds"
    return f"Connect to target timed out after {seconds} seconds"


def tls_context(settings: ProxySettings) -> ssl.SSLContext:
    """TLS to the target. An onion address already authenticates the service (its key is the
    address), and onion certificates are usually self-signed, so checks are off only there."""
    context = ssl.create_default_context(cafile=settings.tls_ca_file)
    if settings.target.is_onion:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def _open(settings: ProxySettings, context: ssl.SSLContext | None) -> Upstream:
    target: Target = settings.target
    limit = settings.read_size * 2
    server_hostname = target.host if context is not None else None
    if not target.is_onion:
        reader, writer = await open_stream(
            limit, host=target.host, port=target.port, ssl=context, server_hostname=server_hostname
        )
        _tune(writer)
        return Upstream(reader, writer)
    # rdns: the onion name goes to tor in the CONNECT request (SOCKS5 ATYP 3, RFC 1928 §5);
    # it can't be resolved locally anyway.
    proxy = SocksProxy(ProxyType.SOCKS5, settings.socks_host, settings.socks_port, rdns=True)
    # Our own asyncio.timeout around this whole function is the one that counts; this one is
    # only a backstop, longer so that it never fires first.
    sock = await proxy.connect(target.host, target.port, timeout=settings.connect_timeout + 60)
    try:
        reader, writer = await open_stream(
            limit, sock=sock, ssl=context, server_hostname=server_hostname
        )
    except BaseException:
        sock.close()
        raise
    _tune(writer)
    return Upstream(reader, writer)


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Let the writer buffer up to a couple of reads before drain() waits (backpressure).
    writer.transport.set_write_buffer_limits(high=512 * 1024)


async def connect_upstream(settings: ProxySettings) -> Upstream:
    """Connect to the target within ``connect_timeout`` (SOCKS TCP connect + handshake +
    CONNECT, or direct connect, plus the TLS handshake if any).

    Raises :class:`ConnectTimeout` or :class:`UpstreamError`; never leaks a socket.
    """
    context = tls_context(settings) if settings.target.use_tls else None
    try:
        async with asyncio.timeout(settings.connect_timeout):
            return await _open(settings, context)
    except TimeoutError as exc:  # also python-socks' ProxyTimeoutError, a TimeoutError
        raise ConnectTimeout(timeout_message(settings)) from exc
    except (OSError, SocksProxyError, ssl.SSLError) as exc:
        raise UpstreamError(_describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SocksProxyError):
        return f"SOCKS5 CONNECT failed: {exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS to target failed: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"connect to target failed: {exc.strerror}"
    return f"connect to target failed: {exc}"
