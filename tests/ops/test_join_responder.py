"""The join responder's pure core (issue 16): the grant it enforces, every status path,
idempotence, bounds, the answer the joiner checks, and the request-target normalisation."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.cluster.authority import AdmissionRecord, JoinPolicy, Statement
from rustbalance.cluster.identity import NodeKey
from rustbalance.cluster.membership import Membership
from rustbalance.node.join import (
    JOIN_PATH,
    JoinError,
    JoinInterceptor,
    JoinRequest,
    JoinResponder,
    join_route,
    parse_join_answer,
    parse_join_request,
)
from rustbalance.proxy.http import InterceptedRequest
from tests.budget import budget
from tests.trust import MASTER, OTHER_MASTER, grant, node_key, record, revocation, signed, wg_key

NOW = 1_700_000_000.0
NOW_MS = int(NOW * 1000)
SECRET = b"\x05" * 32
NETWORK = "10.99.0.0/24"
SELF = record("node-a", tunnel="10.99.0.1", coordination="10.99.0.1:51821",
              issued_at_ms=NOW_MS - 1000)  # fmt: skip


def fresh_membership(*extra: AdmissionRecord) -> Membership:
    m = Membership(MASTER.public_key)
    for content in (SELF, *extra):
        m.apply(signed(content), NOW_MS)
    return m


class Node:
    """A responder and the membership it reads; admit() is what the daemon's callback does."""

    def __init__(self, membership: Membership | None = None, **kwargs: object) -> None:
        self.membership = membership or fresh_membership()
        self.responder = JoinResponder(
            node_id="node-a",
            master_public=MASTER.public_key,
            sign=MASTER.sign,
            membership=lambda: self.membership,
            tunnel_network=str(kwargs.pop("network", NETWORK)),
            randbelow=lambda n: 0,
            **kwargs,  # type: ignore[arg-type]
        )

    def post(
        self, data: bytes, path: str = JOIN_PATH, now: float = NOW, method: str = "POST"
    ) -> tuple[int, bytes]:
        decision = self.responder.handle(method, path, headers(data), data, now)
        if decision.admitted is not None:
            self.membership.apply(decision.admitted, int(now * 1000))
        return decision.status, decision.body


GRANT = grant(SECRET, issued_at_ms=NOW_MS - 60_000, max_uses=3)


def request(
    name: str = "node-b",
    *,
    grant_statement: Statement = GRANT,
    secret: bytes = SECRET,
    t: float = NOW,
    key: NodeKey | None = None,
    wg: bytes | None = None,
) -> JoinRequest:
    return JoinRequest(
        node_id=name,
        node_key=(key or node_key(name)).public,
        wg_public_key=wg or wg_key(name),
        wg_endpoint="198.51.100.7:51820",
        coordination_port=51821,
        priority=20,
        request_time=int(t),
        grant=grant_statement.data,
        grant_secret=secret,
    )


def body(name: str = "node-b", key: NodeKey | None = None, **kwargs: object) -> bytes:
    key = key or node_key(name)
    return request(name, key=key, **kwargs).to_json(key)  # type: ignore[arg-type]


def headers(data: bytes) -> list[tuple[str, str]]:
    return [("Host", "x.onion"), ("Content-Length", str(len(data)))]


# -- admission ----------------------------------------------------------------------------------


def test_a_valid_grant_admits_with_a_signed_record_and_the_whole_membership() -> None:
    node = Node(fresh_membership(record("node-c", tunnel="10.99.0.7", issued_at_ms=NOW_MS - 5)))
    decision = node.responder.handle("POST", JOIN_PATH, headers(body()), body(), NOW)
    assert decision.status == 200 and decision.admitted is not None
    answer = parse_join_answer(decision.body, MASTER.public_key, request(), NOW_MS)
    own = answer.admission
    assert decision.admitted.content == own
    assert own.node_key == node_key("node-b").public and own.issuer == "node-a"
    assert own.wireguard is not None and own.wireguard.public_key == wg_key("node-b")
    assert own.wireguard.tunnel_address == "10.99.0.2"  # the first free one (randbelow = 0)
    assert own.coordination == "10.99.0.2:51821" and own.priority == 20
    assert not own.publisher_eligible and not own.holds_master_key  # the grant has no key
    assert own.grant_id == GRANT.content.grant_id  # type: ignore[union-attr]
    assert sorted(r.node_id for r in answer.peers()) == ["node-a", "node-c"]
    assert answer.tunnel_network == NETWORK and answer.responder_node_id == "node-a"


def test_a_grant_with_the_master_key_admits_a_publisher_eligible_node() -> None:
    keyed = grant(SECRET, issued_at_ms=NOW_MS - 60_000, with_master_key=True)
    node = Node()
    status, data = node.post(body(grant_statement=keyed))
    assert status == 200
    own = parse_join_answer(data, MASTER.public_key, request(grant_statement=keyed), NOW_MS)
    assert own.admission.publisher_eligible and own.admission.holds_master_key


def test_a_repeat_is_answered_again_and_uses_nothing() -> None:
    node = Node()
    assert node.post(body())[0] == 200
    status, data = node.post(body(t=NOW + 5), now=NOW + 5)
    assert status == 200
    assert parse_join_answer(data, MASTER.public_key, request(t=NOW + 5), NOW_MS).admission
    assert node.responder.admitted == 1
    assert node.membership.grant_uses(GRANT.content.grant_id) == {"node-b"}  # type: ignore[union-attr]


# -- refusals: all the same 404 before the grant checks out -------------------------------------


def test_every_refusal_without_a_valid_grant_is_the_same_404() -> None:
    """Finding 4 of issue 16: an expired token was admitted (expiry was checked only by the
    joiner). Now the responder refuses it, and every other refusal, with identical bytes."""
    node = Node()
    expired = grant(SECRET, issued_at_ms=NOW_MS - 7_200_000, expires_at=int(NOW) - 1)
    foreign = grant(SECRET, issued_at_ms=NOW_MS - 60_000, master=OTHER_MASTER)
    refusals = {
        "expired grant": body(grant_statement=expired),
        "grant of another master key": body(grant_statement=foreign),
        "wrong grant secret": body(secret=b"\x06" * 32),
        "stale request": body(t=NOW - 301),
        "request from the future": body(t=NOW + 61),
        "not JSON": b"{not json",
        "no grant at all": json.dumps({"node_id": "node-b"}).encode(),
        "a revocation as the grant": body(grant_statement=revocation("x")),
    }
    answers = {name: node.post(data) for name, data in refusals.items()}
    answers["wrong path"] = node.post(body(), path="/.rb/other")
    answers["GET"] = node.post(body(), method="GET")
    assert {a for a in answers.values()} == {(404, b'{"error":"not found"}')}, answers
    assert node.membership.members() == [SELF] and node.responder.admitted == 0


def test_a_grant_is_used_up_and_admissions_are_bounded() -> None:
    """Finding 4 of issue 16: one token holder filled the tunnel network with 250 bogus
    admissions. A grant admits at most its max_uses nodes, counted over the membership."""
    node = Node(max_joins=1000)
    statuses = [node.post(body(f"bogus-{i}"))[0] for i in range(250)]
    assert statuses.count(200) == 3 and statuses.count(404) == 247
    assert len(node.membership.members()) == 4
    # Still used up after the admitted nodes are revoked (counts live until the grant expires).
    for i in range(3):
        node.membership.apply(revocation(f"bogus-{i}", at_ms=NOW_MS + 1), NOW_MS + 1)
    assert node.post(body("latecomer"))[0] == 404


def test_rotating_the_join_secret_voids_outstanding_grants() -> None:
    node = Node()
    node.membership.apply(signed(JoinPolicy(NOW_MS - 1000, "node-a")), NOW_MS)
    assert node.post(body())[0] == 404
    newer = grant(SECRET, issued_at_ms=NOW_MS - 500, grant_id=b"\x09" * 16)
    assert node.post(body(grant_statement=newer))[0] == 200


def test_the_rate_limit_is_silent() -> None:
    node = Node(max_joins=2, window_secs=300)
    many = grant(SECRET, issued_at_ms=NOW_MS - 60_000, max_uses=10)
    results = [node.post(body(f"n{i}", grant_statement=many))[0] for i in range(3)]
    assert results == [200, 200, 404]
    assert node.post(body("n3", grant_statement=many, t=NOW + 300), now=NOW + 300)[0] == 200


# -- with a valid grant: details --------------------------------------------------------------


def test_a_request_not_signed_by_its_node_key_is_400() -> None:
    req = request()
    forged = json.loads(req.to_json(node_key("node-b")))
    forged["priority"] = 0  # changed after signing
    data = json.dumps(forged).encode()
    status, answer = Node().post(data)
    assert (status, json.loads(answer)) == (
        400,
        {"error": "the request is not signed with its node key"},
    )


@pytest.mark.parametrize(
    ("change", "error"),
    [({"coordination_port": 0}, "coordination_port"), ({"v": 1}, "version"),
     ({"extra": 1}, "unknown field"), ({"wg_endpoint": "nowhere"}, "HOST:PORT")],
)  # fmt: skip
def test_malformed_requests_with_a_valid_grant_are_400(
    change: dict[str, object], error: str
) -> None:
    obj = json.loads(body())
    obj.update(change)
    status, answer = Node().post(json.dumps(obj).encode())
    assert status == 400 and error in json.loads(answer)["error"]


def test_conflicts_are_409() -> None:
    node = Node()
    assert node.post(body())[0] == 200
    # node-b again, with another node key: not a repeat.
    assert node.post(body(key=node_key("node-b", 1)))[0] == 409
    # Another node with node-b's WireGuard key, or with node-b's node key.
    assert node.post(body("node-c", wg=wg_key("node-b")))[0] == 409
    assert node.post(body("node-d", key=node_key("node-b")))[0] == 409
    # A revoked node key cannot come back.
    node.membership.apply(revocation("node-x", node_key("node-x"), NOW_MS), NOW_MS)
    assert node.post(body("node-y", key=node_key("node-x")))[0] == 409


def test_exhausted_tunnel_network_and_a_full_membership_are_503() -> None:
    small = Node(network="10.99.0.0/30", max_joins=10)  # hosts .1 (node-a) and .2
    many = grant(SECRET, issued_at_ms=NOW_MS - 60_000, max_uses=10)
    assert small.post(body("n1", grant_statement=many))[0] == 200
    assert small.post(body("n2", grant_statement=many)) == (
        503,
        b'{"error":"no free tunnel address"}',
    )
    full = Node(Membership(MASTER.public_key, max_members=1), max_joins=10)
    full.membership.apply(signed(SELF), NOW_MS)
    assert full.post(body("n1", grant_statement=many))[0] == 503


def test_a_revoked_nodes_tunnel_address_is_free_again() -> None:
    node = Node(network="10.99.0.0/30")
    assert node.post(body("n1"))[0] == 200
    node.membership.apply(revocation("n1", at_ms=NOW_MS + 1), NOW_MS + 1)
    assert node.post(body("n2"))[0] == 200


# -- the joiner's checks (finding 5) -----------------------------------------------------------


def _answer(
    statements: list[Statement], record_statement: Statement, network: str = NETWORK
) -> bytes:
    import base64

    obj = {
        "v": 2,
        "responder_node_id": "node-a",
        "tunnel_network": network,
        "record": base64.b64encode(record_statement.data).decode(),
        "statements": [base64.b64encode(s.data).decode() for s in statements],
    }
    return json.dumps(obj).encode()


def _own(tunnel: str = "10.99.0.2") -> Statement:
    return signed(record("node-b", eligible=False, tunnel=tunnel, endpoint="198.51.100.7:51820",
                         coordination=f"{tunnel}:51821", issued_at_ms=NOW_MS))  # fmt: skip


def test_the_joiner_refuses_a_peer_outside_the_tunnel_network() -> None:
    """Finding 5 of issue 16: 192.168.1.1 became a WireGuard allowed-ips entry."""
    outside = signed(record("node-c", tunnel="192.168.1.1", issued_at_ms=NOW_MS))
    with pytest.raises(JoinError, match=r"node-c: tunnel address 192.168.1.1 is not a host"):
        parse_join_answer(_answer([signed(SELF), outside], _own()), MASTER.public_key, request(),
                          NOW_MS)  # fmt: skip
    with pytest.raises(JoinError, match="not a host"):
        parse_join_answer(_answer([signed(SELF)], _own("10.99.0.255")), MASTER.public_key,
                          request(), NOW_MS)  # fmt: skip


@pytest.mark.parametrize(
    ("statements", "own", "error"),
    [
        ([signed(SELF, OTHER_MASTER)], _own(), "not signed by the master key"),
        ([signed(SELF)], signed(record("node-z", tunnel="10.99.0.2")), "not this node's"),
        ([signed(SELF)], signed(record("node-b", key=node_key("node-b"), tunnel="10.99.0.2",
                                       endpoint="192.0.2.9:1")), "WireGuard"),
        ([signed(SELF)], signed(record("node-b", key=node_key("node-b"))), "WireGuard"),
    ],
)  # fmt: skip
def test_the_joiner_checks_every_statement(
    statements: list[Statement], own: Statement, error: str
) -> None:
    with pytest.raises(JoinError, match=error):
        parse_join_answer(_answer(statements, own), MASTER.public_key, request(), NOW_MS)


# -- the request target (finding 6) ------------------------------------------------------------

SPELLINGS = [
    "/.rb/join",
    "http://abc.onion/.rb/join",
    "HTTP://abc.onion:80/.rb/join?x=1",
    "//.rb/join",
    "/./.rb/join",
    "/x/../.rb/join",
    "/%2erb/join",
    "/%2Erb/%6Aoin",
    "/%252erb/join",
    "/.RB/JOIN",
    "/.rb;p=1/join",
    "/.rb./join",
    "\\.rb\\join",
    "/.rb",
    "/.rb/",
    "/.rb/something-else",
]


@pytest.mark.parametrize("target", SPELLINGS)
async def test_every_spelling_of_rb_is_answered_by_the_node(target: str) -> None:
    """Finding 6 of issue 16: absolute-form, //.rb/ and /./.rb/ reached the target."""

    async def read(n: int) -> bytes:
        return b""

    assert JoinInterceptor.wants(target.encode())
    assert join_route(target) is not None
    for responder in (Node().responder, None):  # joins on, and off
        reply = await JoinInterceptor(responder)(InterceptedRequest("POST", target, (), read))
        assert reply is not None and reply.status == 404, target


@pytest.mark.parametrize("target", ["/", "/index.html", "/rb/join", "/x/.rb/join", "/.rbx/"])
async def test_other_paths_go_to_the_target(target: str) -> None:
    async def read(n: int) -> bytes:
        return b""

    assert join_route(target) is None
    reply = await JoinInterceptor(None)(InterceptedRequest("GET", target, (), read))
    assert reply is None


@settings(max_examples=budget(400), deadline=None)
@given(st.text(max_size=60))
def test_the_pre_filter_has_no_false_negatives(target: str) -> None:
    if join_route(target) is not None:
        assert JoinInterceptor.wants(target.encode("utf-8", "surrogatepass"))


# -- fuzzing ------------------------------------------------------------------------------------

_header_names = st.sampled_from(["Content-Length", "content-length", "Transfer-Encoding", "X"])
_header_values = st.one_of(st.text(max_size=8), st.integers(0, 10000).map(str))


@settings(max_examples=budget(300), deadline=None)
@given(
    method=st.sampled_from(["POST", "GET", "post", ""]),
    path=st.one_of(st.just(JOIN_PATH), st.text(max_size=40).map(lambda s: "/.rb/" + s)),
    hdrs=st.lists(st.tuples(_header_names, _header_values), max_size=4),
    data=st.one_of(st.binary(max_size=300), st.just(body())),
    now=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_fuzz_handle_never_raises(
    method: str, path: str, hdrs: list[tuple[str, str]], data: bytes, now: float
) -> None:
    node = Node()
    decision = node.responder.handle(method, path, hdrs, data, now)
    assert decision.status in (200, 400, 404, 409, 503)
    if path != JOIN_PATH or method != "POST":
        assert decision.status == 404
    if decision.status != 200:
        assert decision.admitted is None and node.responder.admitted == 0
    if node.responder.body_length(method, path, hdrs) is None:
        # The shell does not read the body then: the answer must not depend on it.
        assert node.responder.handle(method, path, hdrs, b"", now).status == decision.status


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=budget(300), deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["v", "node_id", "node_key", "wg_public_key",
    "wg_endpoint", "coordination_port", "priority", "request_time", "signature", "x"]),
    _json_values))  # fmt: skip
def test_fuzz_json_bodies_with_a_valid_grant_give_400_or_a_valid_request(
    fields: dict[str, object],
) -> None:
    valid = json.loads(body())
    obj = {**fields, "grant": valid["grant"], "grant_secret": valid["grant_secret"]}
    data = json.dumps(obj).encode()
    try:
        parsed, _ = parse_join_request(data)
    except JoinError:
        assert Node().post(data)[0] in (400, 404)
        return
    assert parsed.node_id == obj["node_id"]


def test_request_repr_hides_the_secret() -> None:
    text = repr(request())
    assert SECRET.hex() not in text and "redacted" in text
    assert ipaddress.ip_network(NETWORK).prefixlen == 24
