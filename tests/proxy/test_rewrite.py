"""Header rewriting rules, by example and by fuzzing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.proxy.rewrite import (
    RewriteRules,
    request_fields_bytes,
    response_fields_bytes,
    rewrite_csp,
    rewrite_location,
    rewrite_origin,
    rewrite_referer,
    rewrite_request_headers,
    rewrite_response_headers,
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


def test_host_is_the_target_with_the_default_port_left_out() -> None:
    headers = [(b"host", MASTER.encode()), (b"accept", b"*/*")]
    assert _get(rewrite_request_headers(headers, RULES), b"host") == [TARGET_ONION.encode()]
    tls = RewriteRules(TARGET_ONION, 443, True, MASTER)
    assert _get(rewrite_request_headers(headers, tls), b"host") == [TARGET_ONION.encode()]
    odd = RewriteRules(TARGET_ONION, 8443, True, MASTER)
    assert _get(rewrite_request_headers(headers, odd), b"host") == [f"{TARGET_ONION}:8443".encode()]


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


def test_hop_by_hop_fields_are_dropped_but_upgrade_survives_an_upgrade() -> None:
    headers = [
        (b"host", b"x"),
        (b"connection", b"keep-alive, x-secret-hop"),
        (b"x-secret-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-authorization", b"Basic Zm9v"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"10"),
    ]
    out = rewrite_request_headers(headers, RULES)
    names = [n for n, _ in out]
    assert names == [b"host", b"transfer-encoding"]  # RFC 9112 §6.3: TE wins over CL
    upgrade = [(b"host", b"x"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    out = rewrite_request_headers(upgrade, RULES)
    assert (b"upgrade", b"websocket") in out and (b"connection", b"upgrade") in out
    response = rewrite_response_headers(
        [(b"connection", b"close"), (b"upgrade", b"h2c")], RULES, switching=False
    )
    assert response == []


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
    out = rewrite_request_headers(headers, RULES)
    assert _get(out, b"host") == [TARGET_ONION.encode()]
    assert not _get(out, b"keep-alive")
    listed = {t.strip().lower() for v in _get(headers, b"connection") for t in v.split(b",")}
    cookies = [] if b"cookie" in listed else _get(headers, b"cookie")
    assert _get(out, b"cookie") == cookies  # end-to-end fields pass, unless named hop-by-hop


# -- the fast path's one-pass versions agree with the general functions --------------------

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


def _serialize(fields: list[tuple[bytes, bytes]]) -> bytes:
    """How h11 writes field lines: Host first, then the others in order."""
    lines = [b"%s: %s\r\n" % f for f in fields if f[0] == b"host"]
    lines += [b"%s: %s\r\n" % f for f in fields if f[0] != b"host"]
    return b"".join(lines) + b"\r\n"


@settings(max_examples=budget(400))
@given(fields=_fields, rules=st.sampled_from([RULES, NO_MASTER]))
def test_one_pass_request_fields_match_the_general_rewrite(
    fields: list[tuple[bytes, bytes]], rules: RewriteRules
) -> None:
    host_line = b"host: %s\r\n" % rules.target_authority.encode()
    fast = request_fields_bytes(fields, rules, host_line)
    if fast is not None:
        assert fast == _serialize(rewrite_request_headers(fields, rules))
    # It refuses exactly what the fast path must not handle alone (a plain keep-alive or
    # close is the fast path's: it answers a close itself, as h11 would).
    unusual = any(
        (n == b"connection" and v.lower() not in (b"keep-alive", b"close"))
        or n == b"transfer-encoding"
        for n, v in fields
    )
    assert (fast is None) == unusual


@settings(max_examples=budget(400))
@given(fields=_fields, rules=st.sampled_from([RULES, NO_MASTER]))
def test_one_pass_response_fields_match_the_general_rewrite(
    fields: list[tuple[bytes, bytes]], rules: RewriteRules
) -> None:
    fast = response_fields_bytes(fields, rules)
    if fast is not None:
        assert fast == _serialize(rewrite_response_headers(fields, rules))
    unusual = any(n in (b"host", b"transfer-encoding") for n, _ in fields)
    assert (fast is None) == unusual


def test_one_pass_response_rewrites_location_and_drops_connection_named_fields() -> None:
    fields = [
        (b"location", b"http://" + _T + b"/next"),
        (b"connection", b"X-Secret"),
        (b"x-secret", b"1"),
        (b"content-length", b"0"),
    ]
    assert response_fields_bytes(fields, RULES) == (
        b"location: http://" + _MB + b"/next\r\ncontent-length: 0\r\n\r\n"
    )
