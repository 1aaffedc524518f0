"""Sans-IO Tor control-port protocol: reply/event parser, command encoders, typed replies.

In the spirit of h11, nothing here touches a socket or a clock. :class:`ControlParser` is fed the
bytes read from the control port and returns complete :class:`Reply` and :class:`Event` objects;
the encoders return the bytes to write. The asyncio shell is :mod:`rustbalance.tor.control`.

Grammar (control-spec §2.3 "Replies from Tor to the controller", §2.4 "General-use tokens"):

- Every line ends in CRLF and starts with a three-digit status code and a separator:
  ``"NNN "`` ends a reply, ``"NNN-"`` is a mid line, ``"NNN+"`` is a line followed by a data block.
- A data block (control-spec §2.4 "Data") is a sequence of CRLF lines ending in a line ``"."``;
  a line that starts with ``"."`` carries one extra leading ``"."`` ("dot-stuffing").
- All lines of one reply share one status code (control-spec §2.3).
- Status 650 marks an asynchronous event (control-spec §4.1). Events can be single lines,
  ``650-`` multi-line, or ``650+`` data blocks followed by ``650 OK`` (e.g. HS_DESC_CONTENT,
  control-spec §4.1.26), and they can arrive between a command and its reply, so 650 lines are
  accumulated apart from the reply in progress.

Everything parsed here comes from a socket, so every failure is a :class:`ControlProtocolError`
(a :class:`~rustbalance.errors.ControlError`) whose message names the problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rustbalance.errors import ControlError

__all__ = [
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_MAX_REPLY_SIZE",
    "EVENT_STATUS",
    "AuthChallenge",
    "ControlParser",
    "ControlProtocolError",
    "ControlReplyError",
    "Event",
    "HsDescContentEvent",
    "HsDescEvent",
    "ProtocolInfo",
    "Reply",
    "ReplyLine",
    "decode_data_block",
    "encode_command",
    "encode_data_block",
    "encode_data_command",
    "format_keyword_arg",
    "parse_authchallenge",
    "parse_bootstrap_phase",
    "parse_getconf",
    "parse_getinfo",
    "parse_hsdir",
    "parse_keywords",
    "parse_protocolinfo",
    "quote_string",
    "setconf_args",
    "typed_event",
    "unquote_string",
]

#: control-spec §4.1: every asynchronous event uses status code 650.
EVENT_STATUS = 650

#: Longest single line accepted. Tor's own lines are far shorter; this only bounds memory when a
#: peer never sends CRLF.
DEFAULT_MAX_LINE_LENGTH = 1024 * 1024

#: Largest reply (or event) accepted, all lines and data blocks together. 16 MiB leaves room for
#: ``GETINFO dir/status-vote/current/consensus-microdesc`` and ``GETINFO md/all`` (tor.md §9.2).
DEFAULT_MAX_REPLY_SIZE = 16 * 1024 * 1024

_STATUS_RE = re.compile(rb"\A[0-9]{3}\Z")
_FINGERPRINT_RE = re.compile(r"\A[0-9A-Fa-f]{40}\Z")
# control-spec §2.4: a Keyword is a run of printable non-space characters without '='.
_TOKEN_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")


class ControlProtocolError(ControlError):
    """The control port sent something that is not valid control-spec syntax, or too much of it."""


# --------------------------------------------------------------------------------------------
# Parsed objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyLine:
    """One line of a reply or event.

    ``text`` is what follows the status code and separator; for a ``+`` line ``data`` holds the
    decoded data block (LF line ends, dot-stuffing removed), otherwise it is ``None``.
    """

    status: int
    separator: str
    text: str
    data: str | None = None


@dataclass(frozen=True)
class Reply:
    """A complete reply to one command (control-spec §2.3)."""

    status: int
    lines: tuple[ReplyLine, ...]

    @property
    def is_success(self) -> bool:
        """True for 2xx replies (control-spec §4: 2yz is positive completion)."""
        return 200 <= self.status < 300

    @property
    def message(self) -> str:
        """Tor's human-readable message: the text of the last line (e.g. ``Invalid descriptor``)."""
        return self.lines[-1].text if self.lines else ""

    def raise_for_status(self, command: str = "") -> Reply:
        """Return self for a 2xx reply, else raise :class:`ControlReplyError`."""
        if not self.is_success:
            raise ControlReplyError(self, command)
        return self


@dataclass(frozen=True)
class Event:
    """An asynchronous event (status 650, control-spec §4.1).

    ``type`` is the event keyword (``HS_DESC``...), ``text`` the rest of the first line.
    """

    type: str
    text: str
    lines: tuple[ReplyLine, ...]


class ControlReplyError(ControlError):
    """Tor answered a command with a non-2xx reply (e.g. ``552 Unrecognized key``).

    ``code`` is tor's status code and ``tor_message`` its message text, so callers can tell
    ``554 Invalid descriptor`` from ``551 Not found in cache``.
    """

    def __init__(self, reply: Reply, command: str = "") -> None:
        self.reply = reply
        self.code = reply.status
        self.tor_message = reply.message
        where = f"{command}: " if command else ""
        super().__init__(f"{where}tor replied {reply.status} {reply.message}")


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


@dataclass
class _Accumulator:
    """Lines of one reply or event in progress."""

    status: int | None = None
    lines: list[ReplyLine] = field(default_factory=list)
    size: int = 0
    data_header: tuple[int, str] | None = None
    data_lines: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.status = None
        self.lines = []
        self.size = 0
        self.data_header = None
        self.data_lines = []


class ControlParser:
    """Incremental control-port parser: ``feed(data)`` returns the replies and events completed.

    After a :class:`ControlProtocolError` the parser stays failed: the byte stream can no longer
    be trusted to be in sync, so every later ``feed`` raises the same error.
    """

    def __init__(
        self,
        *,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
    ) -> None:
        if max_line_length < 8 or max_reply_size < max_line_length:
            raise ValueError("need max_reply_size >= max_line_length >= 8")
        self._max_line = max_line_length
        self._max_reply = max_reply_size
        self._buffer = bytearray()
        self._reply = _Accumulator()
        self._event = _Accumulator()
        # The data block in progress belongs to exactly one of the two accumulators.
        self._in_data: _Accumulator | None = None
        self._failed: ControlProtocolError | None = None

    @property
    def idle(self) -> bool:
        """True when no partial line, reply or event is buffered."""
        return (
            not self._buffer
            and self._reply.status is None
            and self._event.status is None
            and self._in_data is None
        )

    def feed(self, data: bytes) -> list[Reply | Event]:
        """Consume bytes; return every reply and event they complete, in arrival order."""
        if self._failed is not None:
            raise self._failed
        try:
            return self._feed(data)
        except ControlProtocolError as exc:
            self._failed = exc
            self._buffer.clear()
            raise

    def _feed(self, data: bytes) -> list[Reply | Event]:
        self._buffer += data
        out: list[Reply | Event] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            raw = bytes(self._buffer[start:end])
            start = end + 1
            # control-spec §2.3: lines end in CRLF; a bare LF is accepted as well.
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > self._max_line:
                raise ControlProtocolError(
                    f"control line of {len(raw)} bytes exceeds the limit of {self._max_line}"
                )
            item = self._line(raw)
            if item is not None:
                out.append(item)
        del self._buffer[:start]
        if len(self._buffer) > self._max_line:
            raise ControlProtocolError(
                f"control line longer than {self._max_line} bytes without a line end"
            )
        return out

    def _grow(self, acc: _Accumulator, n: int) -> None:
        acc.size += n + 2
        if acc.size > self._max_reply:
            kind = "event" if acc is self._event else "reply"
            raise ControlProtocolError(
                f"control {kind} exceeds the size limit of {self._max_reply} bytes"
            )

    def _line(self, raw: bytes) -> Reply | Event | None:
        acc = self._in_data
        if acc is not None:
            self._grow(acc, len(raw))
            if raw == b".":
                # control-spec §2.4: a line "." ends the data block.
                assert acc.data_header is not None
                status, text = acc.data_header
                acc.lines.append(ReplyLine(status, "+", text, _join_data_lines(acc.data_lines)))
                acc.data_header = None
                acc.data_lines = []
                self._in_data = None
                return None
            if raw.startswith(b"."):
                raw = raw[1:]  # undo dot-stuffing
            acc.data_lines.append(_decode(raw))
            return None

        if len(raw) < 4:
            raise ControlProtocolError(f"control line too short: {_preview(raw)}")
        code = raw[:3]
        if not _STATUS_RE.match(code):
            raise ControlProtocolError(f"control line has no 3-digit status: {_preview(raw)}")
        separator = chr(raw[3])
        if separator not in " -+":
            raise ControlProtocolError(
                f"control line has a bad separator {separator!r}: {_preview(raw)}"
            )
        status = int(code)
        text = _decode(raw[4:])
        acc = self._event if status == EVENT_STATUS else self._reply
        if acc.status is not None and acc.status != status:
            raise ControlProtocolError(
                f"inconsistent status codes in one reply: {acc.status} then {status}"
            )
        acc.status = status
        self._grow(acc, len(raw))
        if separator == "+":
            acc.data_header = (status, text)
            self._in_data = acc
            return None
        acc.lines.append(ReplyLine(status, separator, text))
        if separator == "-":
            return None
        lines = tuple(acc.lines)
        acc.reset()
        if status == EVENT_STATUS:
            first = lines[0].text
            event_type, _, rest = first.partition(" ")
            if not event_type:
                raise ControlProtocolError("event line without an event type")
            return Event(event_type.upper(), rest, lines)
        return Reply(status, lines)


def _decode(raw: bytes) -> str:
    # Tor's control port is ASCII; keep going on stray bytes rather than crash.
    return raw.decode("utf-8", errors="replace")


def _preview(raw: bytes) -> str:
    return repr(raw[:40])


def _join_data_lines(lines: list[str]) -> str:
    # Tor turns a data block back into LF-terminated text (control-spec §2.4).
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote_string(value: str) -> str:
    """Encode ``value`` as a control-spec §2.1 QuotedString.

    Backslash and double quote are escaped; CR, LF and TAB become C escapes, which tor's
    ``unescape_string`` decodes (control-spec §2.1 notes tor accepts C escapes in quoted strings).
    Other control characters cannot be carried safely and are refused.
    """
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            # The message does not echo the character: the string may be a password.
            raise ControlError("a control character cannot be sent in a quoted string")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _check_token(value: str, what: str) -> str:
    if not value or _TOKEN_FORBIDDEN.search(value):
        raise ControlError(f"invalid {what} {value!r}: empty, whitespace or control characters")
    return value


def format_keyword_arg(key: str, value: str) -> str:
    """``key=value``, quoting the value when it is empty or has spaces/quotes/escapes."""
    _check_token(key, "keyword")
    if "=" in key:
        raise ControlError(f"invalid keyword {key!r}: contains '='")
    if value and not _TOKEN_FORBIDDEN.search(value) and '"' not in value and "\\" not in value:
        return f"{key}={value}"
    return f"{key}={quote_string(value)}"


def encode_command(keyword: str, *args: str) -> bytes:
    """Encode one command line (control-spec §2.2). Each arg must already be one token.

    Refusing CR, LF and spaces inside tokens keeps a caller-supplied value from injecting a
    second command.
    """
    parts = [_check_token(keyword, "command keyword")]
    for arg in args:
        if "\r" in arg or "\n" in arg or "\x00" in arg:
            raise ControlError("command argument contains CR, LF or NUL")
        parts.append(arg)
    return (" ".join(parts) + "\r\n").encode("utf-8")


def encode_data_block(text: str) -> bytes:
    """Encode ``text`` as a data block (control-spec §2.4): CRLF lines, dot-stuffing, ``.``.

    LF and CRLF line ends in ``text`` are both accepted; a last line without a line end gets one.
    """
    if "\x00" in text:
        raise ControlError("data block contains NUL")
    body = text.replace("\r\n", "\n")
    if "\r" in body:
        raise ControlError("data block contains a bare CR")
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = bytearray()
    for line in lines:
        if line.startswith("."):
            out += b"."
        out += line.encode("utf-8") + b"\r\n"
    out += b".\r\n"
    return bytes(out)


def decode_data_block(block: bytes) -> str:
    """Inverse of :func:`encode_data_block` (used by tests and tools); needs the final ``.``."""
    if not block.endswith(b".\r\n"):
        raise ControlProtocolError("data block does not end with a '.' line")
    lines = block[:-3].split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif block != b".\r\n":
        raise ControlProtocolError("data block is not CRLF terminated")
    if block == b".\r\n":
        return ""
    out = []
    for line in lines:
        if line == b".":
            raise ControlProtocolError("data block has a '.' line before its end")
        out.append(_decode(line[1:] if line.startswith(b".") else line))
    return _join_data_lines(out)


def encode_data_command(keyword: str, args: Iterable[str], data: str) -> bytes:
    """``+KEYWORD args`` followed by a data block (control-spec §2.2, e.g. ``+HSPOST``)."""
    return b"+" + encode_command(keyword, *args) + encode_data_block(data)


# --------------------------------------------------------------------------------------------
# Tokens: quoted strings and keyword=value arguments
# --------------------------------------------------------------------------------------------

_UNESCAPE_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


def unquote_string(text: str, start: int = 0) -> tuple[str, int]:
    """Decode a QuotedString starting at ``text[start] == '"'``; return (value, index after it).

    Accepts the C escapes tor emits (control-spec §2.1; tor's ``esc_for_log``): ``\\n \\r \\t
    \\\\ \\" \\'``, octal ``\\NNN`` and hex ``\\xHH``.
    """
    if start >= len(text) or text[start] != '"':
        raise ControlProtocolError("quoted string expected")
    out = bytearray()
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            return out.decode("utf-8", errors="replace"), i + 1
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        if i + 1 >= n:
            break
        esc = text[i + 1]
        if esc in _UNESCAPE_SIMPLE:
            out += _UNESCAPE_SIMPLE[esc].encode()
            i += 2
        elif esc in "01234567":
            j = i + 1
            while j < n and j < i + 4 and text[j] in "01234567":
                j += 1
            value = int(text[i + 1 : j], 8)
            if value > 255:
                raise ControlProtocolError("octal escape out of range in quoted string")
            out.append(value)
            i = j
        elif esc == "x":
            digits = text[i + 2 : i + 4]
            if len(digits) != 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ControlProtocolError("bad hex escape in quoted string")
            out.append(int(digits, 16))
            i += 4
        else:
            raise ControlProtocolError(f"unknown escape \\{esc} in quoted string")
    raise ControlProtocolError("unterminated quoted string")


def parse_keywords(text: str) -> tuple[list[str], dict[str, str]]:
    """Split a reply line into positional tokens and ``KEY=value`` / ``KEY="quoted"`` pairs."""
    positional: list[str] = []
    keywords: dict[str, str] = {}
    i = 0
    n = len(text)
    while i < n:
        if text[i] == " ":
            i += 1
            continue
        if text[i] == '"':
            value, i = unquote_string(text, i)
            positional.append(value)
            continue
        j = i
        while j < n and text[j] not in ' ="':
            j += 1
        if j < n and text[j] == "=":
            key = text[i:j]
            if not key:
                raise ControlProtocolError("keyword argument with an empty key")
            if j + 1 < n and text[j + 1] == '"':
                value, i = unquote_string(text, j + 1)
            else:
                k = j + 1
                while k < n and text[k] != " ":
                    k += 1
                value, i = text[j + 1 : k], k
            keywords[key] = value
            continue
        if j < n and text[j] == '"':
            raise ControlProtocolError("stray quote inside a token")
        positional.append(text[i:j])
        i = j
    return positional, keywords


# --------------------------------------------------------------------------------------------
# Typed replies
# --------------------------------------------------------------------------------------------


def _content_lines(reply: Reply) -> list[ReplyLine]:
    lines = list(reply.lines)
    if lines and lines[-1].separator == " " and lines[-1].text == "OK":
        lines.pop()
    return lines


def parse_getinfo(reply: Reply) -> dict[str, str]:
    """Parse a GETINFO reply (control-spec §3.9): ``250-key=value`` and ``250+key=`` blocks."""
    reply.raise_for_status("GETINFO")
    out: dict[str, str] = {}
    for line in _content_lines(reply):
        key, sep, value = line.text.partition("=")
        if not sep or not key:
            raise ControlProtocolError(f"GETINFO reply line is not key=value: {line.text[:60]!r}")
        if line.data is not None:
            if value:
                raise ControlProtocolError(f"GETINFO data line has text after '=': {key!r}")
            value = line.data
        out[key] = value
    return out


def parse_bootstrap_phase(value: str) -> int:
    """tor's bootstrap percentage from ``GETINFO status/bootstrap-phase``, whose value is a
    BOOTSTRAP status event without its 650 prefix (control-spec §4.1.10, "Status events"):
    ``NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"``."""
    positional, keywords = parse_keywords(value)
    if len(positional) < 2 or positional[1] != "BOOTSTRAP":
        raise ControlProtocolError(
            f"status/bootstrap-phase is not a BOOTSTRAP status: {value[:80]!r}"
        )
    progress = keywords.get("PROGRESS", "")
    if not progress.isascii() or not progress.isdigit() or int(progress) > 100:
        raise ControlProtocolError(
            f"status/bootstrap-phase: PROGRESS={progress[:10]!r} is not 0..100"
        )
    return int(progress)


def parse_getconf(reply: Reply) -> dict[str, list[str]]:
    """Parse a GETCONF reply (control-spec §3.3).

    Each line is ``Key=Value`` (repeated for options given several times, e.g.
    HiddenServicePort) or a bare ``Key`` for an option that is unset or at its default, which
    gives an empty list. Keys are spelled as tor spells them (``SocksPort``). Values tor quoted
    (escaped, ``config_get_assigned_option``) are unquoted.
    """
    reply.raise_for_status("GETCONF")
    out: dict[str, list[str]] = {}
    for line in reply.lines:
        if line.data is not None:
            raise ControlProtocolError("GETCONF reply has an unexpected data block")
        key, sep, value = line.text.partition("=")
        if not key or " " in key:
            raise ControlProtocolError(f"GETCONF reply line has a bad key: {line.text[:60]!r}")
        values = out.setdefault(key, [])
        if sep:
            if value.startswith('"'):
                value, end = unquote_string(value)
                if end != len(line.text) - len(key) - 1:
                    raise ControlProtocolError(f"GETCONF value for {key} has trailing text")
            values.append(value)
    return out


@dataclass(frozen=True)
class ProtocolInfo:
    """The PROTOCOLINFO reply (control-spec §3.21)."""

    protocol_version: int
    auth_methods: frozenset[str]
    cookie_file: str | None
    tor_version: str | None


def parse_protocolinfo(reply: Reply) -> ProtocolInfo:
    """Parse ``250-PROTOCOLINFO 1``, ``250-AUTH METHODS=... COOKIEFILE="..."``, ``250-VERSION``."""
    reply.raise_for_status("PROTOCOLINFO")
    version: int | None = None
    methods: frozenset[str] | None = None
    cookie: str | None = None
    tor_version: str | None = None
    for line in _content_lines(reply):
        keyword, _, rest = line.text.partition(" ")
        if keyword == "PROTOCOLINFO":
            word = rest.split(" ", 1)[0]
            if not word.isdigit() or len(word) > 6:
                raise ControlProtocolError(f"PROTOCOLINFO version is not a number: {word!r}")
            version = int(word)
        elif keyword == "AUTH":
            _, kw = parse_keywords(rest)
            if "METHODS" not in kw:
                raise ControlProtocolError("PROTOCOLINFO AUTH line has no METHODS=")
            methods = frozenset(m.upper() for m in kw["METHODS"].split(",") if m)
            cookie = kw.get("COOKIEFILE")
        elif keyword == "VERSION":
            _, kw = parse_keywords(rest)
            tor_version = kw.get("Tor")
        # control-spec §3.21: unknown InfoLines must be ignored.
    if version is None:
        raise ControlProtocolError("PROTOCOLINFO reply has no PROTOCOLINFO line")
    if methods is None:
        raise ControlProtocolError("PROTOCOLINFO reply has no AUTH line")
    return ProtocolInfo(version, methods, cookie, tor_version)


@dataclass(frozen=True)
class AuthChallenge:
    """The AUTHCHALLENGE reply (control-spec §3.24): 32-byte server hash and server nonce."""

    server_hash: bytes
    server_nonce: bytes


def _hex32(value: str | None, name: str) -> bytes:
    if value is None or len(value) != 64:
        raise ControlProtocolError(f"AUTHCHALLENGE {name} is not 64 hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ControlProtocolError(f"AUTHCHALLENGE {name} is not hex") from None


def parse_authchallenge(reply: Reply) -> AuthChallenge:
    """Parse ``250 AUTHCHALLENGE SERVERHASH=<64 hex> SERVERNONCE=<64 hex>``."""
    reply.raise_for_status("AUTHCHALLENGE")
    positional, kw = parse_keywords(reply.lines[0].text)
    if not positional or positional[0] != "AUTHCHALLENGE":
        raise ControlProtocolError("AUTHCHALLENGE reply does not start with AUTHCHALLENGE")
    return AuthChallenge(
        _hex32(kw.get("SERVERHASH"), "SERVERHASH"), _hex32(kw.get("SERVERNONCE"), "SERVERNONCE")
    )


# --------------------------------------------------------------------------------------------
# Typed events
# --------------------------------------------------------------------------------------------


def parse_hsdir(value: str) -> tuple[str | None, str | None]:
    """Split a ServerSpec ``$<40 hex>~<nick>`` / ``$<hex>=<nick>`` / ``$<hex>`` (control-spec
    §2.4 LongName) into (upper-case fingerprint, nickname); ``UNKNOWN`` gives (None, None)."""
    if value == "UNKNOWN":
        return None, None
    body = value[1:] if value.startswith("$") else value
    fp, nick = body, None
    for sep in "~=":
        if sep in body:
            fp, nick = body.split(sep, 1)
            break
    if not _FINGERPRINT_RE.match(fp):
        raise ControlProtocolError(f"HSDir {value[:60]!r} is not $<40 hex fingerprint>[~nick]")
    return fp.upper(), nick or None


@dataclass(frozen=True)
class HsDescEvent:
    """``650 HS_DESC`` (control-spec §4.1.25; tor.md §9.4)."""

    action: str
    address: str
    auth_type: str
    hsdir: str
    hsdir_fingerprint: str | None
    hsdir_nickname: str | None
    descriptor_id: str | None
    reason: str | None
    replica: int | None
    hsdir_index: str | None

    @classmethod
    def from_event(cls, event: Event) -> HsDescEvent:
        if event.type != "HS_DESC":
            raise ControlProtocolError(f"not an HS_DESC event: {event.type}")
        positional, kw = parse_keywords(event.text)
        if len(positional) < 4 or len(positional) > 5:
            raise ControlProtocolError(
                f"HS_DESC event needs action, address, auth type, hsdir: {event.text[:80]!r}"
            )
        fp, nick = parse_hsdir(positional[3])
        replica: int | None = None
        if "REPLICA" in kw:
            if not kw["REPLICA"].isdigit() or len(kw["REPLICA"]) > 3:
                raise ControlProtocolError("HS_DESC REPLICA= is not a small number")
            replica = int(kw["REPLICA"])
        return cls(
            action=positional[0],
            address=positional[1],
            auth_type=positional[2],
            hsdir=positional[3],
            hsdir_fingerprint=fp,
            hsdir_nickname=nick,
            descriptor_id=positional[4] if len(positional) == 5 else None,
            reason=kw.get("REASON"),
            replica=replica,
            hsdir_index=kw.get("HSDIR_INDEX"),
        )


@dataclass(frozen=True)
class HsDescContentEvent:
    """``650+HS_DESC_CONTENT <addr> <descid> <hsdir>`` + descriptor (control-spec §4.1.26).

    On a failed fetch the body is empty and the address is ``UNKNOWN`` (tor.md §9.4).
    """

    address: str
    descriptor_id: str
    hsdir: str
    hsdir_fingerprint: str | None
    hsdir_nickname: str | None
    descriptor: str

    @classmethod
    def from_event(cls, event: Event) -> HsDescContentEvent:
        if event.type != "HS_DESC_CONTENT":
            raise ControlProtocolError(f"not an HS_DESC_CONTENT event: {event.type}")
        first = event.lines[0]
        if first.separator != "+" or first.data is None:
            raise ControlProtocolError("HS_DESC_CONTENT event without a data block")
        positional, _ = parse_keywords(event.text)
        if len(positional) != 3:
            raise ControlProtocolError(
                f"HS_DESC_CONTENT needs address, descriptor id, hsdir: {event.text[:80]!r}"
            )
        fp, nick = parse_hsdir(positional[2])
        return cls(positional[0], positional[1], positional[2], fp, nick, first.data)


def typed_event(event: Event) -> Event | HsDescEvent | HsDescContentEvent:
    """Return the typed form of ``event`` when one exists, else the event itself."""
    if event.type == "HS_DESC":
        return HsDescEvent.from_event(event)
    if event.type == "HS_DESC_CONTENT":
        return HsDescContentEvent.from_event(event)
    return event


def setconf_args(items: Mapping[str, str | Iterable[str] | None]) -> list[str]:
    """Arguments of SETCONF/RESETCONF (control-spec §3.1): ``key=value`` per value, bare ``key``
    for None (reset to default); an iterable gives the key once per value (e.g. HiddenServicePort).
    """
    args: list[str] = []
    for key, value in items.items():
        if value is None:
            args.append(_check_token(key, "option name"))
        elif isinstance(value, str):
            args.append(format_keyword_arg(key, value))
        else:
            values = list(value)
            if not values:
                args.append(_check_token(key, "option name"))
            args.extend(format_keyword_arg(key, v) for v in values)
    return args
