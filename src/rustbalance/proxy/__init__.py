"""The reverse proxy: each accepted connection goes to the target (tcp and http modes).

Pure pieces: :mod:`.wire` (the HTTP/1.1 wire layer: heads, bodies, request-targets, tor's
PROXY line), :mod:`.settings` (settings, target parsing), :mod:`.rewrite` (header rules),
:mod:`.session` (per-connection state, deadlines, counters, error pages),
:mod:`.admission` (connection slots, per-circuit limits and cuts). Asyncio shell:
:mod:`.upstream` (SOCKS5 / direct / TLS connect), :mod:`.protocol` (stream protocol whose bytes
the http session takes in callbacks), :mod:`.relay`, :mod:`.http`, :mod:`.tcp`,
:mod:`.sockets`, :mod:`.server`;
:mod:`.eventloop` picks the process's event loop (uvloop for http mode).
"""

from .admission import CircuitLimits
from .http import InterceptedRequest, InterceptedResponse, Interceptor
from .rewrite import RewriteRules, request_field_lines, response_field_lines
from .server import ReverseProxy
from .session import Outcome, ProxyStats, Timeouts
from .settings import ProxyError, ProxySettings, Target, format_seconds, parse_target
from .upstream import timeout_message

__all__ = [
    "CircuitLimits",
    "InterceptedRequest",
    "InterceptedResponse",
    "Interceptor",
    "Outcome",
    "ProxyError",
    "ProxySettings",
    "ProxyStats",
    "ReverseProxy",
    "RewriteRules",
    "Target",
    "Timeouts",
    "format_seconds",
    "parse_target",
    "request_field_lines",
    "response_field_lines",
    "timeout_message",
]
