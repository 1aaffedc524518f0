"""The HTTP/1.1 wire layer by example (pure: no sockets, no clock)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.proxy.wire import (
    MAX_CONTENT_LENGTH,
    ChunkedReader,
    Framing,
    Limits,
    MessageError,
    ProxyLine,
    ProxyLineError,
    chunk,
    find_head_end,
    last_chunk,
    origin_form,
    parse_request,
    parse_response,
    read_proxy_line,
    request_head_problem,
    tor_proxy_line,
    trailer_lines,
)
from tests.budget import budget

LIMITS = Limits()


def _request(head: bytes) -> object:
    return parse_request(head, LIMITS)


def _status(head: bytes) -> int:
    with pytest.raises(MessageError) as info:
        parse_request(head, LIMITS)
    return info.value.status


# -- request heads -----------------------------------------------------------------------------


def test_a_plain_request() -> None:
    request = parse_request(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nAccept:  */* \r\n\r\n", LIMITS)
    assert (request.method, request.target, request.minor) == (b"GET", b"/a?b=1", 1)
    assert request.fields == [(b"host", b"x"), (b"accept", b"*/*")]
    assert request.framing is Framing.NONE and request.keep_alive and not request.upgrade


def test_bare_lf_line_ends_are_read_like_crlf() -> None:
    crlf = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n\r\n", LIMITS)
    lf = parse_request(b"GET / HTTP/1.1\nHost: x\nA: b\n\n", LIMITS)
    assert crlf == lf


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold (RFC 9112 §5.2)
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),  # blank before the colon (§5.1)
        (b"GET / HTTP/1.1\r\nHost: x\rY\r\n\r\n", 400),  # bare CR (§2.2)
        (b"GET / HTTP/1.1\r\nHost: x\x00\r\n\r\n", 400),  # NUL
        (b"GET / HTTP/1.1\r\nHost: x\x01y\r\n\r\n", 400),  # a control character
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host in 1.1
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 505),
        (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2**63), 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),  # §6.1: faulty in 1.0
        (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: x\r\n\r\n", 501),
        (b"GET ws://evil.example/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ],
)  # fmt: skip
def test_what_a_request_head_may_not_be(head: bytes, status: int) -> None:
    assert _status(head) == status


def test_content_length_forms() -> None:
    def length(value: bytes) -> int:
        request = parse_request(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n" % value, LIMITS
        )
        assert request.framing is Framing.LENGTH
        return request.length

    assert length(b"0") == 0
    assert length(b"007") == 7
    assert length(b"5, 5") == 5
    assert length(b"%d" % MAX_CONTENT_LENGTH) == MAX_CONTENT_LENGTH
    assert length(b"0%d" % MAX_CONTENT_LENGTH) == MAX_CONTENT_LENGTH  # 20 digits: h11's bound


def test_both_lengths_read_chunked_and_end_the_connection() -> None:
    request = parse_request(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: Chunked\r\n\r\n",
        LIMITS,
    )
    assert request.framing is Framing.CHUNKED and not request.keep_alive


def test_connection_decides_keep_alive_and_upgrade() -> None:
    def read(fields: bytes, version: bytes = b"1.1") -> tuple[bool, bool]:
        request = parse_request(b"GET / HTTP/%s\r\nHost: x\r\n%s\r\n" % (version, fields), LIMITS)
        return request.keep_alive, request.upgrade

    assert read(b"") == (True, False)
    assert read(b"Connection: Close\r\n") == (False, False)
    assert read(b"", b"1.0") == (False, False)  # HTTP/1.0: no persistent connection (h11)
    assert read(b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n") == (True, True)
    assert read(b"Upgrade: websocket\r\n") == (True, False)  # not named in Connection


def test_field_count_and_head_size_limits() -> None:
    small = Limits(max_head_bytes=1024, max_fields=3)
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(3))
    assert (
        len(
            parse_request(
                b"GET / HTTP/1.1\r\n%s\r\n" % fields.replace(b"X-0", b"Host"), small
            ).fields
        )
        == 3
    )
    with pytest.raises(MessageError) as info:
        parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n%s\r\n" % fields, small)
    assert info.value.status == 431
    assert request_head_problem(b"GET /" + b"a" * 2000, small).status == 414  # type: ignore[union-attr]
    assert request_head_problem(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000, small).status == 431  # type: ignore[union-attr]
    assert request_head_problem(b"\r\nGET", small).status == 400  # type: ignore[union-attr]
    assert request_head_problem(b"GET / HT", small) is None


def test_the_end_of_a_head() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest") == 27
    assert find_head_end(b"GET / HTTP/1.1\nHost: x\n\nrest") == 24
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\n\r\nrest") == 26
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1
    # The earliest blank line wins, whatever its form.
    assert find_head_end(b"A\n\nB\r\n\r\n") == 3


# -- request-targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        (b"GET", b"/", b"/"),
        (b"GET", b"/a/b?c=d&e", b"/a/b?c=d&e"),
        (b"GET", b"http://evil.example/a?b", b"/a?b"),
        (b"GET", b"HTTPS://evil.example:8443", b"/"),
        (b"GET", b"http://[::1]:80?q", b"/?q"),
        (b"OPTIONS", b"*", b"*"),
        (b"OPTIONS", b"http://evil.example:8001", b"*"),  # RFC 9112 §3.2.4
        (b"GET", b"*", None),
        (b"GET", b"//evil.example/x", None),
        (b"GET", b"http://evil.example//x", None),
        (b"GET", b"/a#frag", None),
        (b"GET", b"http://user:pw@evil.example/", None),
        (b"GET", b"http://", None),
        (b"GET", b"http:/x", None),
        (b"GET", b"ws://evil.example/", None),
        (b"GET", b"ftp://evil.example/f", None),
        (b"GET", b"evil.example:80", None),
        (b"GET", b"a", None),
    ],
)
def test_only_origin_form_goes_on(method: bytes, target: bytes, expected: bytes | None) -> None:
    if expected is None:
        with pytest.raises(MessageError) as info:
            origin_form(method, target)
        assert info.value.status == 400
    else:
        assert origin_form(method, target) == expected


# -- response heads ----------------------------------------------------------------------------


def _response(head: bytes, method: bytes = b"GET") -> object:
    return parse_response(head, method, LIMITS)


def test_bodiless_responses_have_no_body_whatever_they_claim() -> None:
    for status in (100, 103, 204, 304):
        response = parse_response(
            b"HTTP/1.1 %d X\r\nContent-Length: 7\r\n\r\n" % status, b"GET", LIMITS
        )
        assert response.framing is Framing.NONE
    head = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD", LIMITS)
    assert head.framing is Framing.NONE and head.length == 5  # the length a GET would get


def test_response_framing_and_reuse() -> None:
    chunked = parse_response(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
        b"GET",
        LIMITS,
    )
    assert chunked.framing is Framing.CHUNKED and chunked.both_lengths
    until_close = parse_response(b"HTTP/1.1 200 OK\r\n\r\n", b"GET", LIMITS)
    assert until_close.framing is Framing.UNTIL_CLOSE and not until_close.keep_alive
    old = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", b"GET", LIMITS)
    assert not old.keep_alive
    bare = parse_response(b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\n", b"GET", LIMITS)
    assert bare.reason == b""


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551621\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"nonsense\r\n\r\n",
    ],
)
def test_a_broken_response_is_a_502(head: bytes) -> None:
    with pytest.raises(MessageError) as info:
        parse_response(head, b"GET", LIMITS)
    assert info.value.status == 502


# -- chunked bodies ----------------------------------------------------------------------------

_BODY = b'3;name=value\r\nabc\r\n10;q="a\\"b"\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\nNEXT'


def _decode(
    data: bytes, steps: list[int] | None = None
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    reader = ChunkedReader(LIMITS)
    out: list[bytes] = []
    pos = 0
    for size in steps or [len(data)]:
        piece = data[pos : pos + size]
        pieces, used = reader.feed(piece)
        out += pieces
        if reader.done:
            return b"".join(out), reader.trailers, data[pos + used :]
        assert used == len(piece)
        pos += size
    raise AssertionError("not done")


def test_chunked_bodies_end_exactly_at_their_last_chunk() -> None:
    assert _decode(_BODY) == (b"abc0123456789abcdef", [(b"x-t", b"1")], b"NEXT")


@settings(max_examples=budget(100))
@given(cuts=st.lists(st.integers(1, 8), min_size=1, max_size=60))
def test_chunked_bodies_read_the_same_however_they_arrive(cuts: list[int]) -> None:
    steps = [*cuts, len(_BODY)]
    assert _decode(_BODY, steps) == _decode(_BODY)


@pytest.mark.parametrize(
    "body",
    [
        b"3\r\nabcX\r\n",  # data not followed by CRLF
        b"3 ;a\r\nabc\r\n",  # blank before an extension (h11 refuses it too)
        b"g\r\n",
        b"\r\n",
        b"11111111111111111\r\n",  # 17 hex digits
        b"8000000000000000\r\n",  # 2^63
        b"3\nabc\r\n",  # a bare LF ending a size line
        b"0\r\nX : y\r\n\r\n",  # a bad trailer
    ],
)
def test_a_broken_chunked_body_is_a_400(body: bytes) -> None:
    with pytest.raises(MessageError):
        ChunkedReader(LIMITS).feed(body + b"0\r\n\r\n")


def test_chunks_are_written_canonically() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert last_chunk() == b"0\r\n\r\n"
    trailers = trailer_lines([(b"x-sum", b"1"), (b"content-length", b"5"), (b"host", b"h")])
    assert last_chunk(trailers) == b"0\r\nx-sum: 1\r\n\r\n"


# -- tor's PROXY line --------------------------------------------------------------------------


@pytest.mark.parametrize("circuit", [0, 1, 666, 65535, 65536, 2**31, 2**32 - 1])
def test_tors_proxy_line_names_the_circuit(circuit: int) -> None:
    line = tor_proxy_line(circuit)
    assert read_proxy_line(line + b"GET /") == (ProxyLine(_address(circuit), circuit), len(line))
    for cut in range(len(line)):
        assert read_proxy_line(line[:cut]) is None  # an incomplete line waits for more


def _address(circuit: int) -> str:
    import ipaddress

    return str(ipaddress.IPv6Address((0xFC00_DEAD_BEEF_4DAD << 64) | circuit))


def test_tor_writes_exactly_this_line() -> None:
    """tor's own test vector (src/test/test_hs_service.c, test_export_client_circuit_id)."""
    assert tor_proxy_line(666, 42) == b"PROXY TCP6 fc00:dead:beef:4dad::0:29a ::1 666 42\r\n"
    assert tor_proxy_line(2**32 - 1, 42) == (
        b"PROXY TCP6 fc00:dead:beef:4dad::ffff:ffff ::1 65535 42\r\n"
    )


def test_other_proxy_lines_name_a_source_and_no_circuit() -> None:
    line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    assert read_proxy_line(line) == (ProxyLine("192.0.2.1", None), len(line))
    assert read_proxy_line(b"PROXY UNKNOWN\r\n") == (ProxyLine("unknown", None), 15)
    outside = b"PROXY TCP6 fc00:dead:beef:4dae::1 ::1 1 80\r\n"
    found = read_proxy_line(outside)
    assert (
        found is not None and found[0].circuit is None and found[0].key == "fc00:dead:beef:4dae::1"
    )


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP6 fc00:dead:beef:4dad::1 ::1 1\r\n",
        b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n",
        b"PROXY " + b"x" * 120,
    ],
)
def test_anything_else_is_no_proxy_line(data: bytes) -> None:
    with pytest.raises(ProxyLineError):
        read_proxy_line(data)


@settings(max_examples=budget(300))
@given(
    data=st.one_of(st.binary(max_size=120), st.binary(max_size=100).map(lambda b: b"PROXY " + b))
)
def test_random_bytes_give_a_line_none_or_a_proxy_line_error(data: bytes) -> None:
    try:
        found = read_proxy_line(data)
    except ProxyLineError:
        return
    if found is not None:
        _line, used = found
        assert data[used - 2 : used] == b"\r\n" and used <= 107
