"""The HTTP/1.1 wire layer (pure, sans-IO, deterministic): every path of http mode reads and
writes messages through it, so no two paths can disagree on where a message ends.

:mod:`.heads` reads request and response heads strictly and writes them canonically (the
framing field comes from the parsed framing, never copied); :mod:`.bodies` reads and writes
the chunked coding; :mod:`.targets` turns a request-target into origin-form;
:mod:`.proxy_line` reads tor's PROXY protocol v1 line (the circuit a stream came on).
"""

from .bodies import ChunkedReader, chunk, last_chunk, trailer_lines
from .errors import MessageError
from .heads import (
    MAX_CONTENT_LENGTH,
    Fields,
    Framing,
    Limits,
    Request,
    Response,
    find_head_end,
    framing_line,
    parse_fields,
    parse_request,
    parse_response,
    request_bytes,
    request_head_problem,
    response_bytes,
)
from .proxy_line import (
    MAX_LINE,
    NoProxyLine,
    ProxyLine,
    ProxyLineError,
    read_proxy_line,
    tor_proxy_line,
)
from .targets import origin_form

__all__ = [
    "MAX_CONTENT_LENGTH",
    "MAX_LINE",
    "ChunkedReader",
    "Fields",
    "Framing",
    "Limits",
    "MessageError",
    "NoProxyLine",
    "ProxyLine",
    "ProxyLineError",
    "Request",
    "Response",
    "chunk",
    "find_head_end",
    "framing_line",
    "last_chunk",
    "origin_form",
    "parse_fields",
    "parse_request",
    "parse_response",
    "read_proxy_line",
    "request_bytes",
    "request_head_problem",
    "response_bytes",
    "tor_proxy_line",
    "trailer_lines",
]
