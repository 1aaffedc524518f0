"""The chunked transfer coding, read incrementally and written canonically (RFC 9112 §7.1).

:class:`ChunkedReader` is fed whatever bytes arrive and returns the payload and where the
message ended, so bytes after the last chunk (a pipelined request, or excess a target sent)
are never taken for body. It is strict where h11 (the tests' oracle) is: the size is hex
digits (at most 16, value at most ``MAX_CONTENT_LENGTH``), an extension follows the size at
once (``;name[=value]``), every chunk ends in exactly CRLF; the trailer section is field
lines ending in CRLF, within the head limits.

Chunks are written on re-framed (:func:`chunk`, :func:`last_chunk`): extensions are dropped,
and only trailer fields that may be trailers go on (:func:`trailer_lines`).
"""

from __future__ import annotations

import re

from .errors import MessageError
from .heads import MAX_CONTENT_LENGTH, Fields, Limits, parse_fields

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*+"'
_EXTENSION = rb";[ \t]*+" + _TOKEN + rb"(?:[ \t]*+=[ \t]*+(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:" + _EXTENSION + rb")*+[ \t]*+\r\n")
# A chunk-size line with extensions longer than this is an attack on our buffer, not data.
_MAX_SIZE_LINE = 4096

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

# Fields that never go on as trailers (RFC 9110 §6.5.1): framing, routing, connection
# options; a recipient would otherwise apply them after the body.
_NOT_TRAILERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"content-encoding",
        b"content-type",
        b"content-range",
    }
)


class ChunkedReader:
    """Decodes one chunked body. ``feed`` returns the payload pieces and the offset where it
    stopped: the end of ``data``, or the end of the message (then ``done`` is true and
    ``trailers`` holds the trailer fields). Raises :class:`MessageError` (400)."""

    __slots__ = ("_line", "_need", "_state", "limits", "trailers")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._state = _SIZE
        self._need = 0
        self._line = bytearray()
        self.trailers: Fields = []

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def in_data(self) -> int:
        """Bytes still to come of the current chunk's data (0 between chunks)."""
        return self._need if self._state == _DATA else 0

    def feed(self, data: bytes, start: int = 0) -> tuple[list[bytes], int]:
        out: list[bytes] = []
        i, end = start, len(data)
        while i < end:  # each turn consumes at least one byte or ends the message
            state = self._state
            if state == _DATA:
                take = min(self._need, end - i)
                out.append(data[i : i + take])
                i += take
                self._need -= take
                if not self._need:
                    self._state = _DATA_END
            elif state == _DATA_END:
                i = self._data_end(data, i)
            elif state == _SIZE:
                i = self._size_line(data, i)
            elif state == _TRAILER:
                i = self._trailer_line(data, i)
            else:
                break
            if self._state == _DONE:
                break
        return out, i

    def _data_end(self, data: bytes, i: int) -> int:
        """The CRLF after a chunk's data (it may arrive split)."""
        line = self._line
        piece = data[i : i + 2 - len(line)]
        line += piece
        if line != b"\r\n"[: len(line)]:
            raise MessageError(400, "chunk data not followed by CRLF")
        if len(line) == 2:
            line.clear()
            self._state = _SIZE
        return i + len(piece)

    def _size_line(self, data: bytes, i: int) -> int:
        newline = data.find(b"\n", i)
        stop = len(data) if newline < 0 else newline + 1
        self._line += data[i:stop]
        if len(self._line) > _MAX_SIZE_LINE:
            raise MessageError(400, "chunk-size line too long")
        if newline < 0:
            return stop
        match = _SIZE_LINE.fullmatch(self._line)
        if match is None:
            raise MessageError(400, "malformed chunk-size line")
        size = int(match[1], 16)
        if size > MAX_CONTENT_LENGTH:
            raise MessageError(400, "chunk too large")
        self._line.clear()
        if size:
            self._state, self._need = _DATA, size
        else:
            self._state = _TRAILER
        return stop

    def _trailer_line(self, data: bytes, i: int) -> int:
        """The trailer section: field lines, then an empty line (all CRLF)."""
        section = self._line
        newline = data.find(b"\n", i)
        stop = len(data) if newline < 0 else newline + 1
        section += data[i:stop]
        if len(section) > self.limits.max_head_bytes:
            raise MessageError(431, "trailer section too large")
        if newline < 0:
            return stop
        if section == b"\r\n" or section.endswith(b"\r\n\r\n"):
            block = b"\r\n" + bytes(section[:-4]) if len(section) > 2 else b""
            self.trailers = parse_fields(block, self.limits)
            section.clear()
            self._state = _DONE
        elif not section.endswith(b"\r\n"):
            raise MessageError(400, "trailer line not ended by CRLF")
        return stop


def chunk(data: bytes) -> bytes:
    """One chunk of ``data`` (not empty: an empty chunk would end the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: bytes = b"") -> bytes:
    """The last chunk and the trailer section (``trailers``: field lines ending in CRLF)."""
    return b"0\r\n%s\r\n" % trailers


def trailer_lines(fields: Fields) -> bytes:
    """The trailer fields that may go on, as field lines."""
    return b"".join(b"%s: %s\r\n" % (n, v) for n, v in fields if n not in _NOT_TRAILERS)
