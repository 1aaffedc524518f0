"""tor's PROXY protocol v1 line: which circuit a stream came on (pure).

With ``HiddenServiceExportCircuitID haproxy`` tor writes one line before the client's first
byte (tor's ``export_hs_client_circuit_id``, src/core/or/connection_edge.c)::

    PROXY TCP6 fc00:dead:beef:4dad::<gid >> 16, hex>:<gid & 0xffff, hex> ::1 <port> <vport>\\r\\n

``gid`` is the rendezvous circuit's global identifier, the same number the control port
uses for the circuit (``CLOSECIRCUIT``). The line follows HAProxy's PROXY protocol v1
(haproxy's doc/proxy-protocol.txt §2.1): ``PROXY`` and a protocol (``TCP4``, ``TCP6`` or
``UNKNOWN``), addresses and ports separated by single spaces, CRLF, at most 107 bytes. Any
source outside tor's prefix (another proxy in front) is kept as a plain address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# haproxy's doc/proxy-protocol.txt §2.1: the longest v1 line, CRLF included.
MAX_LINE = 107
_SIGNATURE = b"PROXY "
# tor's src_ipv6_prefix "fc00:dead:beef:4dad:" (RFC 4193 unique local), as the top 64 bits.
_TOR_PREFIX = 0xFC00_DEAD_BEEF_4DAD


class ProxyLineError(ValueError):
    """Not a PROXY protocol v1 line."""


class NoProxyLine(ProxyLineError):
    """The stream does not start with ``PROXY ``: it did not come through tor (a local client)."""


@dataclass(frozen=True, slots=True)
class ProxyLine:
    """Where a stream came from: ``circuit`` is tor's circuit id (None for a source outside
    tor's prefix, or ``UNKNOWN``); ``source`` the source address as text."""

    source: str
    circuit: int | None

    @property
    def key(self) -> int | str:
        """What per-circuit limits count by: the circuit, else the source address."""
        return self.circuit if self.circuit is not None else self.source


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyLineError("bad port in the PROXY line")
    port = int(text)
    if port > 65535:
        raise ProxyLineError("bad port in the PROXY line")
    return port


def read_proxy_line(buf: bytes | bytearray) -> tuple[ProxyLine, int] | None:
    """Parse the PROXY line at the start of ``buf``: (the line, its length), or None when more
    bytes are needed. Raises :class:`ProxyLineError` as soon as ``buf`` cannot be one."""
    head = bytes(buf[: len(_SIGNATURE)])
    if head != _SIGNATURE[: len(head)]:
        raise NoProxyLine("the stream does not start with a PROXY line")
    end = buf.find(b"\r\n", 0, MAX_LINE)
    if end < 0:
        if len(buf) >= MAX_LINE:
            raise ProxyLineError("PROXY line too long")
        return None
    parts = bytes(buf[len(_SIGNATURE) : end]).split(b" ")
    if parts[0] == b"UNKNOWN":
        return ProxyLine("unknown", None), end + 2
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        raise ProxyLineError("malformed PROXY line")
    family = ipaddress.IPv4Address if parts[0] == b"TCP4" else ipaddress.IPv6Address
    try:
        source = family(parts[1].decode("ascii"))
        family(parts[2].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProxyLineError("bad address in the PROXY line") from exc
    _port(parts[3])
    _port(parts[4])
    value = int(source)
    circuit = None
    if source.version == 6 and value >> 64 == _TOR_PREFIX and not (value >> 32) & 0xFFFFFFFF:
        circuit = value & 0xFFFFFFFF
    return ProxyLine(str(source), circuit), end + 2


def tor_proxy_line(circuit: int, virtual_port: int = 80) -> bytes:
    """The line tor writes for a stream on ``circuit`` (tests and benchmarks send it)."""
    return b"PROXY TCP6 fc00:dead:beef:4dad::%x:%x ::1 %d %d\r\n" % (
        circuit >> 16,
        circuit & 0xFFFF,
        circuit & 0xFFFF,
        virtual_port,
    )
