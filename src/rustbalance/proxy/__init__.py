"""The reverse proxy: each accepted connection goes to the target (tcp and http modes).

Pure pieces: :mod:`.settings` (settings, target parsing), :mod:`.rewrite` (header rules),
:mod:`.session` (per-connection state, counters, error pages). Asyncio shell:
:mod:`.upstream` (SOCKS5 / direct / TLS connect), :mod:`.protocol` (stream protocol whose bytes
the http fast path can take in callbacks), :mod:`.relay`, :mod:`.http`, :mod:`.server`;
:mod:`.eventloop` picks the process's event loop (uvloop for http mode).
"""

from .http import InterceptedRequest, InterceptedResponse, Interceptor
from .rewrite import RewriteRules, rewrite_request_headers, rewrite_response_headers
from .server import ReverseProxy
from .session import Outcome, ProxyStats
from .settings import ProxyError, ProxySettings, Target, format_seconds, parse_target
from .upstream import timeout_message

__all__ = [
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
    "format_seconds",
    "parse_target",
    "rewrite_request_headers",
    "rewrite_response_headers",
    "timeout_message",
]
