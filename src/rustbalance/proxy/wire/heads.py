"""HTTP/1.1 message heads: read them strictly, write them canonically (pure, no I/O).

Reading follows RFC 9112 and refuses, with the status a server answers (``MessageError``),
everything a request smuggler or a desynchronised target relies on:

- the request line and every field line must match the grammar (§3, §5; RFC 9110 §5.5):
  no whitespace before a colon, no obsolete line folding (§5.2), no CR or NUL outside a line
  end, no control characters in values;
- ``Content-Length`` must be digits that fit a signed 64-bit length (``MAX_CONTENT_LENGTH``),
  repeated only with the same value (RFC 9110 §8.6); ``Transfer-Encoding`` must be exactly
  ``chunked`` (§6.1: a server answers 501 to a coding it does not know), and an HTTP/1.0
  message carrying it is refused (§6.1: its framing is faulty);
- a request with both is read by its chunked coding and ends the connection (§6.1, §6.3);
- only HTTP/1.0 and HTTP/1.1 are spoken (505 for others); a 1.1 request has exactly one Host.

Lines may end in a bare LF (§2.2 lets a recipient accept it, as h11 does); the head is
written on with CRLF only. What is written never copies a framing field: the length or the
coding comes from the parsed framing (:func:`framing_line`), so no received form of it
(leading zeros, a list, both fields) reaches the other side.

h11 is the independent oracle in the tests: every head accepted here, h11 accepts with the
same meaning (tests/proxy/test_wire_differential.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple, cast

from .errors import MessageError
from .targets import origin_form

# RFC 9110 §8.6 puts no bound on Content-Length, but a recipient must not let a length
# overflow (§6.3 item 5 of RFC 9112 treats an unparsable one as an error). The smallest
# common bound among targets is a signed 64-bit file offset (nginx's off_t, Go's int64):
# anything larger would wrap in one of them and turn body bytes into a second request.
MAX_CONTENT_LENGTH = 2**63 - 1
_MAX_LENGTH_DIGITS = 20


class Framing(IntEnum):
    """How a message body is delimited (RFC 9112 §6.3)."""

    NONE = 0  # no body: a request without length fields, 1xx/204/304, a response to HEAD
    LENGTH = 1  # exactly ``length`` bytes (Content-Length)
    CHUNKED = 2  # the chunked transfer coding (§7.1)
    UNTIL_CLOSE = 3  # a response read until the target closes (§6.3 item 8)


# Members as module constants for the per-message code (Enum attribute access costs a lookup
# per use on Python 3.11).
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = (
    Framing.NONE,
    Framing.LENGTH,
    Framing.CHUNKED,
    Framing.UNTIL_CLOSE,
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits of a head: bytes up to and including the blank line, and field lines."""

    max_head_bytes: int = 16 * 1024
    max_fields: int = 100


Fields = list[tuple[bytes, bytes]]  # (lower-case name, value without surrounding blanks)


# Requests and responses are named tuples: immutable, and built in one step (a dataclass
# __init__ runs a line per field, and one is built per message).
class Request(NamedTuple):
    """A request head as read from the client."""

    method: bytes
    target: bytes  # origin-form, or b"*" for OPTIONS (absolute-form already converted)
    minor: int  # HTTP/1.<minor>: 0 or 1
    fields: Fields
    framing: Framing
    length: int  # Framing.LENGTH: the body's length
    keep_alive: bool  # the client lets the connection carry another request afterwards
    upgrade: bool  # asks to switch protocols (RFC 9110 §7.8): Connection: upgrade + Upgrade
    connection: frozenset[bytes]  # the Connection field's tokens, lower case


class Response(NamedTuple):
    """A response head as read from the target."""

    status: int
    reason: bytes
    minor: int
    fields: Fields
    framing: Framing
    length: int  # Framing.LENGTH: the body's length; NONE: a declared length (HEAD, 304) or -1
    keep_alive: bool  # the target lets the connection carry another request afterwards
    both_lengths: bool  # it had Content-Length and Transfer-Encoding (§6.3 item 3)
    connection: frozenset[bytes]  # the Connection field's tokens, lower case


# Built straight from a tuple in the order of the fields (a named tuple's own __new__ is a
# Python-level call per message).
_tuple_new = cast(Callable[[type[Any], tuple[object, ...]], Any], tuple.__new__)


# -- grammar (RFC 9110 §5.1, §5.5; RFC 9112 §3, §4, §5) ----------------------------------------

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_FIELD_CHAR = rb"[\x21-\x7e\x80-\xff]"  # VCHAR / obs-text
# A value without the blanks around it: visible characters with inner blanks. The possessive
# quantifiers keep every match linear (a long blank run followed by a bad byte once made a
# plain-quantifier version try every split: quadratic time on the event loop).
_VALUE = rb"(?:" + _FIELD_CHAR + rb"++(?:[ \t]++" + _FIELD_CHAR + rb"++)*+)?"
_FIELD_LINE = rb"\r\n" + _TOKEN + rb":[ \t]*+" + _VALUE + rb"[ \t]*+"
_FIELDS = rb"((?:" + _FIELD_LINE + rb")*+)"
_REQUEST_HEAD = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])" + _FIELDS)
# The common case (HTTP/1.0 or 1.1, CRLF lines) in one match; the general pattern above tells
# a bad version (505) from a bad head (400), and bare LF lines are read with it.
# Its target is either origin-form without a fragment and not starting "//" (group 2, the
# common case, already what goes on) or anything else (group 3, for targets.origin_form).
_REQUEST_HEAD_1X = re.compile(
    rb"(" + _TOKEN + rb") (?:(/(?!/)[\x21\x22\x24-\x7e]*+)|([\x21-\x7e]+)) HTTP/1\.([01])" + _FIELDS
)
_RESPONSE_HEAD = re.compile(
    rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*+))?" + _FIELDS
)
_FIELD_BLOCK = re.compile(_FIELDS)
_MINORS = {b"0": 0, b"1": 1}  # HTTP/1.0 and HTTP/1.1, the versions spoken
_TCHAR = frozenset(b"-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def find_head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """The offset just past the blank line that ends a head in ``buf[start:]``; -1 if none
    yet. Lines may end in CRLF or a bare LF (RFC 9112 §2.2)."""
    crlf = buf.find(b"\n\r\n", start)
    lf = buf.find(b"\n\n", start)
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf + 2
    return crlf + 3 if crlf >= 0 else -1


def _crlf_lines(head: bytes) -> bytes:
    """``head`` (without its blank line) with every bare LF line end made a CRLF; a CR
    anywhere else stays and fails the grammar (§2.2: a bare CR is invalid)."""
    return b"\r\n".join(line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n"))


def _strip_blank_line(head: bytes) -> bytes:
    if head.endswith(b"\r\n\r\n"):
        return head[:-4]
    if head.endswith(b"\n\r\n"):
        return head[:-3]
    return head[:-2]  # b"\n\n"


def _split_fields(block: bytes) -> Fields:
    """The fields of a block the grammar matched already (each line ``CRLF name: value``):
    split, not matched again (a name has no colon, a value no blanks around it)."""
    fields = []
    for line in block.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t")))
    return fields


def _fields(block: bytes, limits: Limits) -> Fields:
    if not block:
        return []
    fields = _split_fields(block)
    if len(fields) > limits.max_fields:
        raise MessageError(431, f"more than {limits.max_fields} header fields")
    return fields


def parse_fields(block: bytes, limits: Limits) -> Fields:
    """Field lines (each ``CRLF name: value``, as a trailer section is read) or 400."""
    if _FIELD_BLOCK.fullmatch(block) is None:
        raise MessageError(400, "malformed field line")
    return _fields(block, limits)


def _content_length(value: bytes, seen: int | None) -> int:
    """A Content-Length value (RFC 9110 §8.6: a list of equal values is one value)."""
    digits = value
    if not value.isdigit():  # (bytes.isdigit: ASCII digits only)
        lengths = {part.strip(b" \t") for part in value.split(b",")}
        if len(lengths) != 1:
            raise MessageError(400, "conflicting Content-Length values")
        digits = lengths.pop()
        if not digits.isdigit():
            raise MessageError(400, "Content-Length is not a number")
    # At most 20 digits, leading zeros included (h11's bound: what it refuses, so do we).
    if len(digits) > _MAX_LENGTH_DIGITS or int(digits) > MAX_CONTENT_LENGTH:
        raise MessageError(400, "Content-Length too large")
    length = int(digits)
    if seen is not None and seen != length:
        raise MessageError(400, "conflicting Content-Length fields")
    return length


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip(b" \t").lower() for token in value.split(b",")]


_NO_TOKENS: frozenset[bytes] = frozenset()
# Fields that frame a message or decide its connection, and Host: the only ones _scan reads.
_SCANNED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade"})


def _scan(fields: Fields, minor: int) -> tuple[int | None, bool, frozenset[bytes], int, bool]:
    """What the framing fields of a head say: (Content-Length, chunked, the Connection
    tokens, how many Host fields, an Upgrade field). Raises on a bad one: ``Transfer-Encoding``
    other than exactly ``chunked`` is 501 (RFC 9112 §6.1), as h11 has it; in HTTP/1.0 it is
    400 (§6.1: a 1.0 message with it has faulty framing)."""
    length, chunked, upgrade, connection, hosts = None, False, False, _NO_TOKENS, 0
    for name, value in fields:
        if name not in _SCANNED:
            continue
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            # (Plain digits, the common case, inline; _content_length has every rule.)
            if length is None and value.isdigit() and len(value) <= 18:
                length = int(value)  # 18 digits always fit MAX_CONTENT_LENGTH
            else:
                length = _content_length(value, length)
        elif name == b"transfer-encoding":
            if minor == 0:
                raise MessageError(400, "Transfer-Encoding in an HTTP/1.0 message")
            if chunked:
                raise MessageError(501, "more than one Transfer-Encoding field")
            if value.lower() != b"chunked":
                raise MessageError(501, "transfer coding other than chunked")
            chunked = True
        elif name == b"connection":
            connection = connection | frozenset(_tokens(value))
        else:
            upgrade = True
    return length, chunked, connection, hosts, upgrade


def parse_request(head: bytes, limits: Limits) -> Request:
    """Parse a complete request head (through its blank line). Raises :class:`MessageError`."""
    match = None
    if head.endswith(b"\r\n\r\n"):
        match = _REQUEST_HEAD_1X.fullmatch(head, 0, len(head) - 4)
    if match is None:
        method, raw_target, minor, block = _request_parts(_strip_blank_line(head))
        target = None
    else:
        method, target, raw_target, minor_digit, block = match.groups()
        minor = 1 if minor_digit == b"1" else 0
    fields = _split_fields(block)
    if len(fields) > limits.max_fields:
        raise MessageError(431, f"more than {limits.max_fields} header fields")
    length, chunked, connection, hosts, upgrade_field = _scan(fields, minor)
    if hosts != 1 and (hosts or minor == 1):
        raise MessageError(400, "a request needs exactly one Host field")
    if method == b"CONNECT":
        raise MessageError(501, "CONNECT is not supported by a reverse proxy")
    if target is None:  # not plain origin-form (the pattern's group 2)
        target = origin_form(method, raw_target)
    keep_alive = minor == 1 and b"close" not in connection
    if chunked:
        framing, size = _CHUNKED, 0
        if length is not None:
            keep_alive = False  # RFC 9112 §6.1: after both length fields the server MUST close
    elif length is not None:
        framing, size = _LENGTH, length
    else:
        framing, size = _NONE, 0
    upgrade = upgrade_field and b"upgrade" in connection
    request: Request = _tuple_new(
        Request, (method, target, minor, fields, framing, size, keep_alive, upgrade, connection)
    )
    return request


def _request_parts(text: bytes) -> tuple[bytes, bytes, int, bytes]:
    """(method, target, minor version, field block) of a head the common pattern did not
    match: bare LF lines, another version (505), or a malformed head (400)."""
    match = _REQUEST_HEAD.fullmatch(text)
    if match is None and b"\n" in text.replace(b"\r\n", b""):
        match = _REQUEST_HEAD.fullmatch(_crlf_lines(text))
    if match is None:
        raise MessageError(400, "malformed request head")
    method, raw_target, major, minor_digit, block = match.groups()
    if major != b"1" or minor_digit not in (b"0", b"1"):
        raise MessageError(505, "HTTP version not supported")
    return method, raw_target, int(minor_digit), block


def parse_response(head: bytes, method: bytes, limits: Limits) -> Response:
    """Parse a complete response head to a request with ``method``. Framing follows RFC 9112
    §6.3: 1xx, 204, 304 and any response to HEAD have no body whatever their fields say; then
    chunked, then Content-Length; else the body runs until the target closes. Raises
    :class:`MessageError` (the caller answers the client 502)."""
    match = None
    if head.endswith(b"\r\n\r\n"):
        match = _RESPONSE_HEAD.fullmatch(head, 0, len(head) - 4)
    if match is None:
        text = _strip_blank_line(head)
        match = _RESPONSE_HEAD.fullmatch(text)
        if match is None and b"\n" in text.replace(b"\r\n", b""):
            match = _RESPONSE_HEAD.fullmatch(_crlf_lines(text))
    if match is None:
        raise MessageError(502, "malformed response head")
    major, minor_digit, status_digits, reason, block = match.groups()
    minor = _MINORS.get(minor_digit)
    if major != b"1" or minor is None:
        raise MessageError(502, "response in an HTTP version other than 1.0 or 1.1")
    status = int(status_digits)
    if status < 100:
        raise MessageError(502, "status code below 100")
    fields = _split_fields(block)
    if len(fields) > limits.max_fields:
        raise MessageError(502, f"more than {limits.max_fields} header fields")
    try:
        declared, chunked, connection, _hosts, _upgrade = _scan(fields, minor)
    except MessageError as exc:
        raise MessageError(502, exc.reason) from None
    keep_alive = minor == 1 and b"close" not in connection
    both = chunked and declared is not None
    if status < 200 or status in (204, 304) or method == b"HEAD":
        framing, length = _NONE, -1 if declared is None else declared
    elif chunked:
        framing, length = _CHUNKED, 0
    elif declared is not None:
        framing, length = _LENGTH, declared
    else:
        framing, length, keep_alive = _UNTIL_CLOSE, 0, False
    response: Response = _tuple_new(
        Response,
        (status, reason or b"", minor, fields, framing, length, keep_alive, both, connection),
    )
    return response


def request_head_problem(buf: bytes | bytearray, limits: Limits) -> MessageError | None:
    """For an incomplete head (no blank line yet in ``buf``): the error to answer now, if
    any. A first byte that cannot start a method is 400 at once (as h11 does); a request line
    longer than the limit is 414, a head longer than it 431 (RFC 9112 §3, RFC 6585 §5)."""
    if buf and buf[0] not in _TCHAR:
        return MessageError(400, "malformed request line")
    if len(buf) > limits.max_head_bytes:
        if buf.find(b"\n", 0, limits.max_head_bytes) < 0:
            return MessageError(414, "request line too long")
        return MessageError(431, "request head too large")
    return None


# -- writing ------------------------------------------------------------------------------------


def framing_line(framing: Framing, length: int) -> bytes:
    """The one framing field of an outgoing message, from the parsed framing."""
    if framing is Framing.LENGTH:
        return b"content-length: %d\r\n" % length
    if framing is Framing.CHUNKED:
        return b"transfer-encoding: chunked\r\n"
    return b""


def request_bytes(request: Request, field_lines: bytes) -> bytes:
    """The head sent to the target: HTTP/1.1, the origin-form target, ``field_lines`` (the
    rewritten fields, each ending in CRLF, no framing field), the framing field, the blank
    line."""
    if request.framing is _NONE:
        return b"%s %s HTTP/1.1\r\n%s\r\n" % (request.method, request.target, field_lines)
    return b"%s %s HTTP/1.1\r\n%s%s\r\n" % (
        request.method,
        request.target,
        field_lines,
        framing_line(request.framing, request.length),
    )


def response_bytes(status: int, reason: bytes, field_lines: bytes, *, close: bool) -> bytes:
    """A response head to the client (``field_lines`` ends with the framing field, if any);
    ``close`` adds ``Connection: close`` (RFC 9112 §9.6: the last response on it)."""
    return b"HTTP/1.1 %d %s\r\n%s%s\r\n" % (
        status,
        reason,
        field_lines,
        b"connection: close\r\n" if close else b"",
    )
