"""The join responder's pure core: every status path, idempotence, rate limit, addresses."""

from __future__ import annotations

import base64
import ipaddress
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.node.join import (
    JoinError,
    JoinRequest,
    JoinResponder,
    PeerInfo,
    parse_join_answer,
    parse_join_request,
)
from tests.budget import budget

SECRET = "S" * 20 + "ecret-join-path-value-43c"
TOKEN = "T" * 20 + "oken-cluster-value-000043"
NOW = 1_700_000_000.0


def wg_key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


SELF = PeerInfo("node-a", "10.99.0.1:51821", wg_key(1), "203.0.113.5:51820", "10.99.0.1")


def responder(**kwargs: object) -> JoinResponder:
    return JoinResponder(
        join_secret=SECRET,
        cluster_token=TOKEN,
        self_info=SELF,
        randbelow=lambda n: 0,
        **kwargs,  # type: ignore[arg-type]
    )


def body(node: str = "node-b", key: int = 2, token: str = TOKEN, t: float = NOW) -> bytes:
    return JoinRequest(node, token, wg_key(key), "198.51.100.7:51820", 51821, int(t)).to_json()


def headers(data: bytes) -> list[tuple[str, str]]:
    return [("Host", "x.onion"), ("Content-Length", str(len(data)))]


def post(r: JoinResponder, data: bytes, path: str = "/.rb/" + SECRET, now: float = NOW) -> int:
    return r.handle("POST", path, headers(data), data, now).status


def test_success_returns_address_and_peer_list() -> None:
    r = responder(
        known_peers=lambda: [
            PeerInfo("node-c", "10.99.0.2:51821", wg_key(3), "192.0.2.1:51820", "10.99.0.2")
        ]
    )
    data = body()
    decision = r.handle("POST", "/.rb/" + SECRET, headers(data), data, NOW)
    assert decision.status == 200
    answer = parse_join_answer(decision.body)
    assert answer.responder_node_id == "node-a"
    assert answer.tunnel_network == "10.99.0.0/24"
    # .1 is the responder's and .2 a known peer's: never handed out again.
    assert answer.tunnel_address == "10.99.0.3"
    assert [p.node_id for p in answer.peers] == ["node-a", "node-c"]
    assert decision.admitted is not None
    assert decision.admitted.coordination == "10.99.0.3:51821"
    assert decision.admitted.wg_public_key == wg_key(2)


def test_repeat_is_idempotent_and_not_counted() -> None:
    r = responder(max_joins=1)
    data = body()
    first = r.handle("POST", "/.rb/" + SECRET, headers(data), data, NOW)
    again = body(t=NOW + 30)
    second = r.handle("POST", "/.rb/" + SECRET, headers(again), again, NOW + 31)
    assert first.status == second.status == 200
    assert second.body == first.body and second.admitted is None
    # Same node, another WireGuard key: a conflict, not a silent re-assignment.
    assert post(r, body(key=9), now=NOW + 32) == 409


def test_wrong_secret_wrong_token_stale_and_future_are_identical_404s() -> None:
    r = responder()
    data = body()
    cases = [
        r.handle("POST", "/.rb/" + SECRET[:-1] + "x", headers(data), data, NOW),
        r.handle("POST", "/.rb/" + SECRET + "x", headers(data), data, NOW),
        r.handle("GET", "/.rb/" + SECRET, headers(data), data, NOW),
        r.handle(
            "POST",
            "/.rb/" + SECRET,
            headers(body(token=TOKEN[:-1] + "x")),
            body(token=TOKEN[:-1] + "x"),
            NOW,
        ),
        r.handle("POST", "/.rb/" + SECRET, headers(body(t=NOW - 301)), body(t=NOW - 301), NOW),
        r.handle("POST", "/.rb/" + SECRET, headers(body(t=NOW + 61)), body(t=NOW + 61), NOW),
    ]
    assert {d.status for d in cases} == {404}
    assert len({d.body for d in cases}) == 1
    assert all(d.admitted is None for d in cases)
    # The edges are still fresh.
    assert post(r, body(t=NOW - 300)) == 200
    assert post(r, body("node-c", 3, t=NOW + 60)) == 200


def test_sixth_join_in_five_minutes_is_a_silent_404() -> None:
    r = responder()
    for i in range(5):
        assert post(r, body(f"node-{i}", 10 + i), now=NOW + i) == 200
    sixth = body("node-x", 40, t=NOW + 10)
    decision = r.handle("POST", "/.rb/" + SECRET, headers(sixth), sixth, NOW + 10)
    assert decision.status == 404 and decision.admitted is None
    # A repeat of an admitted node still gets its answer while the limit holds.
    assert post(r, body("node-0", 10, t=NOW + 11), now=NOW + 11) == 200
    # Once the first join is 300 s old, there is room again.
    assert post(r, body("node-x", 40, t=NOW + 300), now=NOW + 300) == 200


@pytest.mark.parametrize(
    ("hdrs", "data"),
    [
        ([("Content-Length", "0")], b""),
        ([("Content-Length", "8193")], b"x" * 8193),
        ([], b"{}"),
        ([("Content-Length", "2"), ("Content-Length", "2")], b"{}"),
        ([("Transfer-Encoding", "chunked")], b"{}"),
        ([("Content-Length", "+2")], b"{}"),
        ([("Content-Length", "5")], b"{}"),
    ],
)
def test_bad_length_is_400(hdrs: list[tuple[str, str]], data: bytes) -> None:
    decision = responder().handle("POST", "/.rb/" + SECRET, hdrs, data, NOW)
    assert decision.status == 400
    assert json.loads(decision.body) == {"error": "Invalid content length"}


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b"[]",
        b'{"v":1}',
        b"\xff\xfe",
        body().replace(b'"v":1', b'"v":2'),
        body().replace(b'"coordination_port":51821', b'"coordination_port":0'),
        body().replace(b'"coordination_port":51821', b'"coordination_port":true'),
        body()[:-1] + b',"extra":1}',
        body().replace(b"node-b", b"node b"),
        body().replace(wg_key(2).encode(), b"AAAA"),
        body()[:-1] + b',"v":1}',
    ],
)
def test_bad_body_is_400(data: bytes) -> None:
    r = responder()
    assert post(r, data) == 400
    assert r.admitted == ()


def test_tunnel_addresses_are_unique_and_exhaustion_is_503() -> None:
    r = JoinResponder(
        join_secret=SECRET,
        cluster_token=TOKEN,
        self_info=PeerInfo(
            "node-a", "10.99.0.1:51821", wg_key(1), "203.0.113.5:51820", "10.99.0.1"
        ),
        tunnel_network="10.99.0.0/29",
        randbelow=lambda n: int.from_bytes(os.urandom(4), "big") % n,
        max_joins=100,
    )
    addresses = []
    for i in range(5):
        data = body(f"n{i}", 10 + i)
        decision = r.handle("POST", "/.rb/" + SECRET, headers(data), data, NOW)
        assert decision.status == 200
        addresses.append(parse_join_answer(decision.body).tunnel_address)
    assert len(set(addresses)) == 5 and "10.99.0.1" not in addresses
    assert all(ipaddress.IPv4Address(a) in ipaddress.IPv4Network("10.99.0.0/29") for a in addresses)
    assert post(r, body("n9", 30)) == 503
    # A released admission frees its address for the next joiner.
    r.release("n0")
    data = body("n9", 30)
    assert (
        parse_join_answer(
            r.handle("POST", "/.rb/" + SECRET, headers(data), data, NOW).body
        ).tunnel_address
        == addresses[0]
    )


def test_conflicts_with_the_responder_itself_are_409() -> None:
    r = responder()
    assert post(r, body("node-a", 2)) == 409
    assert post(r, body("node-b", 1)) == 409


def test_constructor_refuses_weak_secrets() -> None:
    with pytest.raises(JoinError):
        JoinResponder(join_secret="", cluster_token=TOKEN, self_info=SELF)
    with pytest.raises(JoinError):
        JoinResponder(join_secret=SECRET, cluster_token="short", self_info=SELF)


def test_request_repr_hides_the_token_and_parse_round_trips() -> None:
    request = parse_join_request(body())
    assert TOKEN not in repr(request)
    assert request.to_json() == body()
    with pytest.raises(JoinError):
        parse_join_request(b"{}")


_header_names = st.sampled_from(
    ["Content-Length", "content-length", "Transfer-Encoding", "Host", "X"]
)
_header_values = st.one_of(st.integers(min_value=-5, max_value=9000).map(str), st.text(max_size=12))


@settings(max_examples=budget(400), deadline=None)
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "post", ""]),
    path=st.one_of(st.just("/.rb/" + SECRET), st.text(max_size=80).map(lambda s: "/.rb/" + s)),
    hdrs=st.lists(st.tuples(_header_names, _header_values), max_size=4),
    data=st.one_of(st.binary(max_size=300), st.just(body())),
    now=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_fuzz_handle_never_raises(
    method: str, path: str, hdrs: list[tuple[str, str]], data: bytes, now: float
) -> None:
    r = responder()
    decision = r.handle(method, path, hdrs, data, now)
    assert decision.status in (200, 400, 404, 409, 503)
    if path != "/.rb/" + SECRET or method != "POST":
        assert decision.status == 404
    if decision.status != 200:
        assert decision.admitted is None and r.admitted == ()
    length = r.body_length(method, path, hdrs)
    if length is None:
        # The shell does not read the body then: the answer must not depend on it.
        assert r.handle(method, path, hdrs, b"", now).status == decision.status


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=budget(300), deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(
            [
                "v",
                "node_id",
                "cluster_token",
                "wg_public_key",
                "wg_endpoint",
                "coordination_port",
                "request_time",
                "x",
            ]
        ),
        _json_values,
    )
)
def test_fuzz_json_bodies_give_400_or_a_valid_request(fields: dict[str, object]) -> None:
    data = json.dumps(fields).encode()
    try:
        request = parse_join_request(data)
    except JoinError:
        assert responder().handle("POST", "/.rb/" + SECRET, headers(data), data, NOW).status in (
            400,
            404,
        )
        return
    assert parse_join_request(request.to_json()) == request
