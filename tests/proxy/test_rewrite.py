"""Header rewriting rules, by example and by fuzzing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.proxy.rewrite import (
    RewriteRules,
    request_field_lines,
    response_field_lines,
    rewrite_csp,
    rewrite_location,
    rewrite_origin,
    rewrite_referer,
    rewrite_set_cookie,
)
from tests.budget import budget

from .helpers import MASTER, TARGET_ONION

RULES = RewriteRules(target_host=TARGET_ONION, target_port=80, target_tls=False, master_host=MASTER)
NO_MASTER = RewriteRules(
    target_host=TARGET_ONION, target_port=80, target_tls=False, master_host=None
)


def _get(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def _tokens(fields: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The Connection tokens, as the wire layer reads them."""
    return frozenset(
        t.strip(b" \t").lower() for n, v in fields if n == b"connection" for t in v.split(b",")
    )


def _lines(block: bytes) -> list[tuple[bytes, bytes]]:
    """Field lines back into (name, value) pairs."""
    pairs = []
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b": ")
        pairs.append((name, value))
    return pairs


def _request(
    fields: list[tuple[bytes, bytes]],
    rules: RewriteRules = RULES,
    *,
    upgrade: bool = False,
    extra: tuple[bytes, bytes] | None = None,
) -> list[tuple[bytes, bytes]]:
    host_line = b"host: %s\r\n" % rules.target_authority.encode()
    block = request_field_lines(
        fields, _tokens(fields), rules, host_line, upgrade=upgrade, extra=extra
    )
    return _lines(block)


def _response(
    fields: list[tuple[bytes, bytes]], rules: RewriteRules = RULES, *, switching: bool = False
) -> list[tuple[bytes, bytes]]:
    return _lines(response_field_lines(fields, _tokens(fields), rules, switching=switching))


def test_host_is_the_target_with_the_default_port_left_out() -> None:
    headers = [(b"host", MASTER.encode()), (b"accept", b"*/*")]
    assert _get(_request(headers), b"host") == [TARGET_ONION.encode()]
    tls = RewriteRules(TARGET_ONION, 443, True, MASTER)
    assert _get(_request(headers, tls), b"host") == [TARGET_ONION.encode()]
    odd = RewriteRules(TARGET_ONION, 8443, True, MASTER)
    assert _get(_request(headers, odd), b"host") == [f"{TARGET_ONION}:8443".encode()]


def test_location_on_the_target_moves_to_the_master() -> None:
    assert rewrite_location(f"http://{TARGET_ONION}/a?b=1#c", RULES) == f"http://{MASTER}/a?b=1#c"
    assert rewrite_location(f"http://{TARGET_ONION}:80", RULES) == f"http://{MASTER}/"
    assert rewrite_location(f"//{TARGET_ONION}/x", RULES) == f"http://{MASTER}/x"
    assert rewrite_location(f"http://{TARGET_ONION}/x", NO_MASTER) == "/x"


def test_location_elsewhere_is_left_alone() -> None:
    for value in (
        "/relative",
        "https://example.com/",
        f"http://{TARGET_ONION}:8080/",
        "mailto:x@y",
    ):
        assert rewrite_location(value, RULES) == value
    evil = "x" + TARGET_ONION
    assert rewrite_location(f"http://{evil}/", RULES) == f"http://{evil}/"


def test_cookie_domain_moves_to_the_master_or_goes() -> None:
    cookie = f"sid=1; Domain=.{TARGET_ONION}; Path=/; Secure"
    assert rewrite_set_cookie(cookie, RULES) == f"sid=1; Domain={MASTER}; Path=/; Secure"
    assert rewrite_set_cookie(cookie, NO_MASTER) == "sid=1; Path=/; Secure"
    other = "sid=1; Domain=example.com"
    assert rewrite_set_cookie(other, RULES) == other


def test_csp_mentions_of_the_target_become_the_master() -> None:
    csp = f"default-src http://{TARGET_ONION}:80 'self'; connect-src ws://{TARGET_ONION}"
    assert (
        rewrite_csp(csp, RULES) == f"default-src http://{MASTER} 'self'; connect-src ws://{MASTER}"
    )
    longer = f"img-src sub-{TARGET_ONION}"
    assert rewrite_csp(longer, RULES) == longer


def test_origin_and_referer_from_the_master_name_the_target() -> None:
    assert rewrite_origin(f"http://{MASTER}", RULES) == f"http://{TARGET_ONION}"
    assert rewrite_origin("null", RULES) == "null"
    assert rewrite_referer(f"http://{MASTER}/p?q", RULES) == f"http://{TARGET_ONION}/p?q"
    assert rewrite_referer("https://search.example/", RULES) == "https://search.example/"


def test_hop_by_hop_and_framing_fields_are_dropped_but_upgrade_survives_an_upgrade() -> None:
    """The framing fields never pass: the wire layer writes the one framing field from the
    parsed framing (so no received form of a length reaches the other side)."""
    headers = [
        (b"host", b"x"),
        (b"connection", b"keep-alive, x-secret-hop"),
        (b"x-secret-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-authorization", b"Basic Zm9v"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"10"),
    ]
    assert [n for n, _ in _request(headers)] == [b"host"]
    upgrade = [(b"host", b"x"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    out = _request(upgrade, upgrade=True)
    assert (b"upgrade", b"websocket") in out and (b"connection", b"upgrade") in out
    assert _request(upgrade) == [(b"host", TARGET_ONION.encode())]  # not an upgrade request
    response = _response([(b"connection", b"close"), (b"upgrade", b"h2c")])
    assert response == []
    switching = _response([(b"connection", b"upgrade"), (b"upgrade", b"h2c")], switching=True)
    assert switching == [(b"upgrade", b"h2c"), (b"connection", b"upgrade")]


def test_the_circuit_field_is_added_and_cannot_be_forged() -> None:
    forged = [(b"host", b"x"), (b"x-tor-circuit-id", b"1"), (b"accept", b"*/*")]
    out = _request(forged, extra=(b"x-tor-circuit-id", b"666"))
    assert _get(out, b"x-tor-circuit-id") == [b"666"]
    assert out[-1] == (b"x-tor-circuit-id", b"666")


text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=200)
paths = st.text(st.sampled_from("abcxyz0189/-._~%?=&"), max_size=40).map(lambda p: "/" + p)


@settings(max_examples=budget(300), deadline=None)
@given(value=text)
def test_rewriters_never_fail_on_any_header_value(value: str) -> None:
    for rules in (RULES, NO_MASTER):
        for rewrite in (
            rewrite_location,
            rewrite_set_cookie,
            rewrite_csp,
            rewrite_origin,
            rewrite_referer,
        ):
            assert isinstance(rewrite(value, rules), str)


@settings(max_examples=budget(200), deadline=None)
@given(path=paths)
def test_any_target_url_becomes_the_same_path_on_the_master(path: str) -> None:
    rewritten = rewrite_location(f"http://{TARGET_ONION}{path}", RULES)
    assert rewritten.startswith(f"http://{MASTER}/")
    assert TARGET_ONION not in rewritten
    referer = rewrite_referer(f"http://{MASTER}{path}", RULES)
    assert referer.startswith(f"http://{TARGET_ONION}/") and MASTER not in referer


header_names = st.sampled_from(
    [b"host", b"origin", b"referer", b"connection", b"upgrade", b"cookie", b"x-a", b"keep-alive"]
)
header_values = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))


@settings(max_examples=budget(300), deadline=None)
@given(headers=st.lists(st.tuples(header_names, header_values), max_size=12))
def test_request_headers_always_carry_exactly_one_target_host(
    headers: list[tuple[bytes, bytes]],
) -> None:
    out = _request(headers)
    assert _get(out, b"host") == [TARGET_ONION.encode()]
    assert not _get(out, b"keep-alive")
    listed = {t.strip().lower() for v in _get(headers, b"connection") for t in v.split(b",")}
    cookies = [] if b"cookie" in listed else _get(headers, b"cookie")
    assert _get(out, b"cookie") == cookies  # end-to-end fields pass, unless named hop-by-hop


# -- one function per direction, every message -------------------------------------------

_T = TARGET_ONION.encode()
_MB = MASTER.encode()
_names = st.sampled_from(
    [
        b"host", b"origin", b"referer", b"location", b"content-location", b"set-cookie",
        b"content-security-policy", b"content-security-policy-report-only",
        b"access-control-allow-origin", b"connection", b"keep-alive", b"te", b"trailer",
        b"upgrade", b"proxy-connection", b"proxy-authorization", b"transfer-encoding",
        b"content-length", b"x-drop", b"accept", b"cookie",
    ]
)  # fmt: skip
_values = st.one_of(
    st.sampled_from(
        [
            b"keep-alive", b"close", b"Keep-Alive", b"x-drop, accept", b"upgrade", b"chunked",
            b"http://" + _T + b"/p?q#f", b"http://" + _MB + b"/from", b"//" + _T + b"/s",
            b"https://" + _T + b":443/", b"sid=1; Domain=." + _T + b"; Path=/",
            b"default-src " + _T + b":80 x" + _T, b"http://" + _MB, b"0", b"12",
        ]
    ),
    st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)  # fmt: skip
_fields = st.lists(st.tuples(_names, _values), max_size=8)
_HOP = {
    b"connection", b"keep-alive", b"te", b"trailer", b"upgrade", b"proxy-connection",
    b"proxy-authorization", b"proxy-authenticate", b"transfer-encoding", b"content-length",
}  # fmt: skip


@settings(max_examples=budget(300))
@given(fields=_fields, rules=st.sampled_from([RULES, NO_MASTER]))
def test_responses_keep_end_to_end_fields_in_order_and_map_the_target(
    fields: list[tuple[bytes, bytes]], rules: RewriteRules
) -> None:
    out = _response(fields, rules)
    named = _tokens(fields)
    kept = [(n, v) for n, v in fields if n not in _HOP and n not in named]
    assert [n for n, _ in out] == [n for n, _ in kept]
    maps = {
        b"location": rewrite_location,
        b"content-location": rewrite_location,
        b"set-cookie": rewrite_set_cookie,
        b"content-security-policy": rewrite_csp,
        b"content-security-policy-report-only": rewrite_csp,
    }
    for (name, value), (_, original) in zip(out, kept, strict=True):
        func = maps.get(name)
        if func is not None:
            assert value == func(original.decode("latin-1"), rules).encode("latin-1")
        elif name != b"access-control-allow-origin":
            assert value == original


def test_a_response_location_is_rewritten_and_connection_named_fields_go() -> None:
    fields = [
        (b"location", b"http://" + _T + b"/next"),
        (b"connection", b"X-Secret"),
        (b"x-secret", b"1"),
        (b"content-length", b"0"),
    ]
    assert response_field_lines(fields, _tokens(fields), RULES) == (
        b"location: http://" + _MB + b"/next\r\n"
    )
