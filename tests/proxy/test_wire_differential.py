"""The wire layer against h11, the independent oracle, both ways and in both directions.

Reading: every message the wire layer accepts (head and body, from a client or from a
target), h11 accepts with the same meaning: method, request-target (in origin-form), version,
fields, status, body bytes, trailers, and where the message ends (the bytes left for the next
one). The wire layer may refuse more than h11 (it is stricter on purpose: lengths that do not
fit, control characters, ``//`` paths...), never less.

Writing: what the proxy writes for a message it read (the head with the rewritten fields and
the framing field, the body re-framed), h11 reads as that same message.

Messages are built from parts that are often valid and often slightly wrong (bare LF, obs-fold,
a blank before a colon, odd lengths and codings, chunk extensions, trailers), then sometimes
mutated at one byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.proxy import wire
from rustbalance.proxy.rewrite import RewriteRules, request_field_lines, response_field_lines
from tests.budget import budget

from .helpers import MASTER, TARGET_ONION

LIMITS = wire.Limits(max_head_bytes=16 * 1024, max_fields=100)
RULES = RewriteRules(TARGET_ONION, 80, False, MASTER)
_H11_LIMIT = 1 << 20


@dataclass
class Message:
    head: object  # an h11 Request/Response, or our wire.Request/wire.Response
    fields: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]
    rest: bytes  # what follows the message


# -- building messages -------------------------------------------------------------------------

_token = st.text(
    "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_.!#$%&'*+^`|~", min_size=1, max_size=8
)
_value_char = st.sampled_from(
    [b"a", b"Z", b"0", b"/", b":", b";", b"=", b",", b'"', b"~", b" ", b"\t", b"\x80", b"\xff"]
)
_value = st.lists(_value_char, max_size=10).map(b"".join)
_odd = st.sampled_from([b"\x00", b"\x01", b"\x7f", b"\r", b"\n", b"\x0b", b"\x0c"])
_ows = st.sampled_from([b"", b" ", b"\t", b"  "])


@st.composite
def _field(draw: st.DrawFn) -> bytes:
    name = draw(_token).encode()
    value = draw(_value)
    if draw(st.integers(0, 20)) == 0:
        value += draw(_odd)
    sep = b" :" if draw(st.integers(0, 12)) == 0 else b":"
    return name + sep + draw(_ows) + value + draw(_ows)


@st.composite
def _framing(draw: st.DrawFn, chunked_ok: bool = True) -> tuple[list[bytes], str, int]:
    """(framing field lines, kind, length) — kind: none, length, chunked."""
    kind = draw(st.sampled_from(["none", "length", "length", "chunked", "chunked", "both", "odd"]))
    size = draw(st.integers(0, 40))
    if kind == "none":
        return [], "none", 0
    if kind == "length":
        form = draw(st.sampled_from([b"%d", b"0%d", b"%d, %d", b" %d ", b"%d,%d"]))
        value = form % ((size,) * form.count(b"%d"))
        return [b"Content-Length: " + value], "length", size
    if kind == "chunked":
        return (
            [b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"Chunked"]))],
            "chunked",
            0,
        )
    if kind == "both":
        return [b"Content-Length: %d" % size, b"Transfer-Encoding: chunked"], "chunked", 0
    odd = draw(
        st.sampled_from(
            [
                b"Content-Length: 18446744073709551621",
                b"Content-Length: 99999999999999999999",
                b"Content-Length: 9223372036854775808",
                b"Content-Length: -1",
                b"Content-Length: 1, 2",
                b"Transfer-Encoding: gzip",
                b"Transfer-Encoding: gzip, chunked",
            ]
        )
    )
    return [odd], "odd", 0


@st.composite
def _body(draw: st.DrawFn, kind: str, length: int) -> bytes:
    payload = draw(st.binary(max_size=60))
    if kind == "length":
        return draw(st.binary(min_size=length, max_size=length))
    if kind != "chunked":
        return b""
    out = b""
    rest = payload
    while rest:
        n = draw(st.integers(1, len(rest)))
        size = draw(st.sampled_from([b"%x", b"%X", b"0%x"])) % n
        ext = draw(st.sampled_from([b"", b"", b"", b";a", b";a=b", b';a="x y"', b" ;a", b";"]))
        out += size + ext + b"\r\n" + rest[:n] + b"\r\n"
        rest = rest[n:]
    trailer = draw(
        st.sampled_from([b"", b"", b"X-T: 1\r\n", b"X-T: 1\r\nHost: 2\r\n", b"Bad Line\r\n"])
    )
    return out + b"0\r\n" + trailer + b"\r\n"


def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    if not data or draw(st.integers(0, 4)):
        return data
    at = draw(st.integers(0, len(data) - 1))
    return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]


@st.composite
def request_streams(draw: st.DrawFn) -> bytes:
    method = draw(
        st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"X-1"])
    )
    target = draw(
        st.sampled_from(
            [b"/", b"/a?b=c", b"/p%20q", b"/", b"/x/y", b"http://h.example/x?y", b"https://h:1",
             b"*", b"//evil/x", b"/a#f", b"ftp://e/", b"e:80", b"/\x80"]
        )
    )  # fmt: skip
    version = draw(st.sampled_from([b"1.1"] * 6 + [b"1.0", b"1.0", b"2.0"]))
    hosts = draw(st.sampled_from([[b"Host: x"]] * 8 + [[], [b"Host: a", b"Host: b"]]))
    fields = draw(st.lists(_field(), max_size=4))
    framing, kind, length = draw(_framing())
    connection = draw(st.sampled_from([[], [b"Connection: close"], [b"Connection: keep-alive"]]))
    lines = hosts + fields + framing + connection
    order = draw(st.permutations(lines))
    eol = draw(st.sampled_from([b"\r\n"] * 5 + [b"\n"]))
    fold = [b" folded"] if draw(st.integers(0, 15)) == 0 and order else []
    head = eol.join([method + b" " + target + b" HTTP/" + version, *order, *fold]) + eol + eol
    body = draw(_body(kind, length))
    after = draw(st.sampled_from([b"", b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n", b"junk"]))
    return _mutate(draw, head + body + after)


@st.composite
def response_streams(draw: st.DrawFn) -> tuple[bytes, bytes]:
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST"]))
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 404, 500, 100, 103, 199, 599, 42]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Not Found", b" a\tb"]))
    version = draw(st.sampled_from([b"1.1"] * 6 + [b"1.0", b"1.0", b"2.0"]))
    fields = draw(st.lists(_field(), max_size=4))
    framing, kind, length = draw(_framing())
    lines = fields + framing
    order = draw(st.permutations(lines))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    head = eol.join([b"HTTP/" + version + b" %03d" % status + reason, *order]) + eol + eol
    interim = b""
    if draw(st.integers(0, 5)) == 0:
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    bodiless = status < 200 or status in (204, 304) or method == b"HEAD"
    body = b"" if bodiless and draw(st.booleans()) else draw(_body(kind, length))
    if kind == "none" and not bodiless:
        body = draw(st.binary(max_size=20))  # read until the close
    after = draw(st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"]))
    return method, _mutate(draw, interim + head + body + after)


# -- reading with the wire layer ----------------------------------------------------------------


def _read_body(
    framing: wire.Framing, length: int, data: bytes, eof: bool
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes] | None:
    if framing is wire.Framing.LENGTH:
        if len(data) < length:
            return None
        return data[:length], [], data[length:]
    if framing is wire.Framing.CHUNKED:
        reader = wire.ChunkedReader(LIMITS)
        try:
            pieces, used = reader.feed(data)
        except wire.MessageError:
            return None
        if not reader.done:
            return None
        return b"".join(pieces), reader.trailers, data[used:]
    if framing is wire.Framing.UNTIL_CLOSE:
        return (data, [], b"") if eof else None
    return b"", [], data


def ours_request(data: bytes) -> Message | None:
    end = wire.find_head_end(data)
    if end < 0 or end > LIMITS.max_head_bytes or wire.request_head_problem(data[:end], LIMITS):
        return None
    try:
        request = wire.parse_request(data[:end], LIMITS)
    except wire.MessageError:
        return None
    body = _read_body(request.framing, request.length, data[end:], eof=False)
    if body is None:
        return None
    return Message(request, request.fields, *body)


def ours_response(method: bytes, data: bytes) -> Message | None:
    while True:  # interim responses first
        end = wire.find_head_end(data)
        if end < 0:
            return None
        try:
            response = wire.parse_response(data[:end], method, LIMITS)
        except wire.MessageError:
            return None
        data = data[end:]
        if response.status >= 200:
            break
        if response.status == 101:
            return None
    body = _read_body(response.framing, response.length, data, eof=True)
    if body is None:
        return None
    return Message(response, response.fields, *body)


# -- reading with h11 ---------------------------------------------------------------------------


def _h11_events(conn: h11.Connection) -> tuple[object, bytes, list[tuple[bytes, bytes]]] | None:
    head: object = None
    body = b""
    try:
        for _ in range(10_000):
            event = conn.next_event()
            if isinstance(event, h11.Request | h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return head, body, list(event.headers)
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:
                return None
    except h11.RemoteProtocolError:
        return None
    return None


def h11_request(data: bytes) -> Message | None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_H11_LIMIT)
    conn.receive_data(data)
    found = _h11_events(conn)
    if found is None:
        return None
    head, body, trailers = found
    assert isinstance(head, h11.Request)
    return Message(head, list(head.headers), body, trailers, bytes(conn.trailing_data[0]))


def h11_response(method: bytes, data: bytes, *, eof: bool = True) -> Message | None:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_H11_LIMIT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    found = _h11_events(conn)
    if found is None:
        return None
    head, body, trailers = found
    assert isinstance(head, h11.Response)
    return Message(head, list(head.headers), body, trailers, bytes(conn.trailing_data[0]))


def _same_fields(ours: list[tuple[bytes, bytes]], theirs: list[tuple[bytes, bytes]]) -> None:
    """Equal, but h11 keeps a Content-Length list as its one value and lowers the coding."""
    assert len(ours) == len(theirs)
    for (name, value), (their_name, their_value) in zip(ours, theirs, strict=True):
        assert name == their_name
        if name == b"content-length":
            assert int(value.split(b",")[0]) == int(their_value)
        elif name == b"transfer-encoding":
            assert value.lower() == their_value
        else:
            assert value == their_value


# -- the properties ------------------------------------------------------------------------------


@settings(max_examples=budget(400), deadline=None)
@given(data=request_streams())
def test_every_request_the_wire_layer_accepts_h11_reads_the_same(data: bytes) -> None:
    ours = ours_request(data)
    if ours is None:
        return
    theirs = h11_request(data)
    assert theirs is not None, "accepted here, refused by h11"
    request, event = ours.head, theirs.head
    assert isinstance(request, wire.Request) and isinstance(event, h11.Request)
    assert request.method == event.method
    assert request.target == wire.origin_form(event.method, event.target)
    assert b"1.%d" % request.minor == event.http_version
    _same_fields(ours.fields, theirs.fields)
    assert (ours.body, ours.trailers, ours.rest) == (theirs.body, theirs.trailers, theirs.rest)


@settings(max_examples=budget(400), deadline=None)
@given(found=response_streams())
def test_every_response_the_wire_layer_accepts_h11_reads_the_same(
    found: tuple[bytes, bytes],
) -> None:
    method, data = found
    ours = ours_response(method, data)
    if ours is None:
        return
    theirs = h11_response(method, data)
    assert theirs is not None, "accepted here, refused by h11"
    response, event = ours.head, theirs.head
    assert isinstance(response, wire.Response) and isinstance(event, h11.Response)
    assert (response.status, response.reason) == (event.status_code, event.reason)
    assert b"1.%d" % response.minor == event.http_version
    _same_fields(ours.fields, theirs.fields)
    assert (ours.body, ours.trailers, ours.rest) == (theirs.body, theirs.trailers, theirs.rest)


def _pair(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b": ")
    return name.lower(), value


def _reframed(framing: wire.Framing, body: bytes, trailers: list[tuple[bytes, bytes]]) -> bytes:
    """The body as the proxy writes it on (Content-Length passed through, chunked re-framed)."""
    if framing is wire.Framing.CHUNKED:
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        return b"".join(wire.chunk(p) for p in pieces) + wire.last_chunk(
            wire.trailer_lines(trailers)
        )
    return body


@settings(max_examples=budget(300), deadline=None)
@given(data=request_streams())
def test_what_the_proxy_writes_for_a_request_h11_reads_as_that_request(data: bytes) -> None:
    ours = ours_request(data)
    if ours is None:
        return
    request = ours.head
    assert isinstance(request, wire.Request)
    host = b"host: %s\r\n" % RULES.target_authority.encode()
    lines = request_field_lines(
        request.fields, request.connection, RULES, host, upgrade=request.upgrade,
        extra=(b"x-tor-circuit-id", b"42"),
    )  # fmt: skip
    written = wire.request_bytes(request, lines) + _reframed(
        request.framing, ours.body, ours.trailers
    )
    theirs = h11_request(written)
    assert theirs is not None
    event = theirs.head
    assert isinstance(event, h11.Request)
    assert (event.method, event.target, event.http_version) == (
        request.method,
        request.target,
        b"1.1",
    )
    written_lines = lines + wire.framing_line(request.framing, request.length)
    expected = [_pair(line) for line in written_lines.split(b"\r\n")[:-1]]
    _same_fields(expected, theirs.fields)
    assert theirs.body == ours.body and theirs.rest == b""
    assert theirs.trailers == [t for t in ours.trailers if wire.trailer_lines([t])]


@settings(max_examples=budget(300), deadline=None)
@given(found=response_streams())
def test_what_the_proxy_writes_for_a_response_h11_reads_as_that_response(
    found: tuple[bytes, bytes],
) -> None:
    method, data = found
    ours = ours_response(method, data)
    if ours is None:
        return
    response = ours.head
    assert isinstance(response, wire.Response)
    lines = response_field_lines(response.fields, response.connection, RULES)
    framing = response.framing
    if framing in (wire.Framing.LENGTH, wire.Framing.CHUNKED):
        lines += wire.framing_line(framing, response.length)
    close = framing is wire.Framing.UNTIL_CLOSE
    written = wire.response_bytes(response.status, response.reason, lines, close=close)
    written += _reframed(framing, ours.body, ours.trailers)
    theirs = h11_response(method, written, eof=close)
    assert theirs is not None
    event = theirs.head
    assert isinstance(event, h11.Response)
    assert (event.status_code, event.reason) == (response.status, response.reason)
    assert theirs.body == ours.body and theirs.rest == b""
