"""tor's ``.auth_private`` client key files, read by the rules of tor and arti.

Vectors: tor ``src/test/test_hs_client.c`` ``test_parse_auth_file_content`` (the parser is
``parse_auth_file_content`` in ``src/feature/hs/hs_client.c``) and arti
``crates/tor-keymgr/testdata/{alice,bob,dan}.auth_private`` (the parser is
``parse_client_keypair`` in ``crates/tor-keymgr/src/keystore/ctor/client.rs``).
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.descriptor.client_auth import ClientAuthPrivateKey, parse_auth_private
from rustbalance.errors import InvalidKeyError
from tests.descriptor.helpers import make_key

TOR_ADDRESS = "4acth47i6kxnvkewtm6q7ib2s3ufpo5sqbsnzjpbi7utijcltosqemad"
TOR_KEY = "zdsyvn2jq534ugyiuzgjy4267jbtzcjbsgedhshzx5mforyxtryq"
ARTI_ALICE = (
    "zvhlds7ttyx5bvffeiy3elw37gdlyoyojima6sux6urzifpmw334cpid:descriptor:x25519:"
    "YCTT7J5LWVLMW56PRYHOURPBLARFTFFTQMACKNHD7YLEKMVAXJYA\n"
)
ARTI_DAN = (
    "meh3ekl7vwof7chx47wepo4gyh5hvgxfrz5bxbfgceqku3emqkbocnid:descriptor:x25519:"
    "ABDYZCSRAX4U37RBFUSXE2MDSVPAYVI2LTXTWHYU4ZYU7LJDFZ4A\n"
)


@pytest.mark.parametrize(
    ("text", "address", "key_b32"),
    [
        (f"{TOR_ADDRESS}:descriptor:x25519:{TOR_KEY}", TOR_ADDRESS, TOR_KEY),
        (ARTI_ALICE, ARTI_ALICE[:56], ARTI_ALICE.split(":")[3].strip()),
        (ARTI_DAN, ARTI_DAN[:56], ARTI_DAN.split(":")[3].strip()),
        # tor splits with SPLIT_SKIP_SPACE: blanks around a field do not count.
        (f" {TOR_ADDRESS} : descriptor :x25519: {TOR_KEY}\r\n", TOR_ADDRESS, TOR_KEY),
    ],
    ids=["tor-valid", "arti-alice", "arti-dan", "tor-blanks"],
)
def test_valid_files_of_tor_and_arti(text: str, address: str, key_b32: str) -> None:
    parsed = parse_auth_private(text)
    assert parsed.onion_address == address + ".onion"
    assert parsed.secret_key == base64.b32decode(key_b32.upper() + "====")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # tor test_parse_auth_file_content, in its order.
        ("a:b", "exactly 4 fields"),
        (f"{TOR_ADDRESS}:x:x25519:{TOR_KEY}", "auth type must be 'descriptor'"),
        (f"{TOR_ADDRESS}:descriptor:x:{TOR_KEY}", "key type must be 'x25519'"),
        ("xx:descriptor:x25519:aa==", "address"),
        (
            "xx:descriptor:x25519:vjqea4jbhwwc4hto7ekyvqfbeodghbaq6nxi45hz4wr3qvhqv3yqa",
            "address",
        ),
        (f"{TOR_ADDRESS}:descriptor:x25519:" + "a" * 52, "all zero"),
        (f"{TOR_ADDRESS}:descriptor:x25519:aa==", "52 base32 characters"),
        (
            f"{TOR_ADDRESS}:descriptor:x25519:"
            "vjqea4jbhwwc4hto7ekyvqfbeodghbaq6nxi45hz4wr3qvhqv3yqa",
            "52 base32 characters",
        ),
        # arti bob.auth_private (auth type "notdescriptor") and alice cut at 100 characters.
        (ARTI_ALICE.replace(":descriptor:", ":notdescriptor:"), "auth type"),
        (ARTI_ALICE[:100], "52 base32 characters"),
        # The four the old reader took: wrong auth type, 5 fields, 3 fields, zero key.
        (f"extra:{TOR_ADDRESS}:descriptor:x25519:{TOR_KEY}", "exactly 4 fields"),
        (f"descriptor:x25519:{TOR_KEY}", "exactly 4 fields"),
        (f"{TOR_ADDRESS}:descriptor:x25519:{TOR_KEY}:", "exactly 4 fields"),
        # A second line is part of the last field, as in tor.
        (f"{TOR_ADDRESS}:descriptor:x25519:{TOR_KEY}\n{TOR_KEY}", "52 base32 characters"),
        (f"{TOR_ADDRESS}.onion:descriptor:x25519:{TOR_KEY}", "address"),
        (f"{TOR_ADDRESS[:-1]}b:descriptor:x25519:{TOR_KEY}", "address"),
        (f"{TOR_ADDRESS}:descriptor:x25519:{TOR_KEY[:-1]}1", "base32"),
        # 52 characters carry 260 bits: a non-zero tail is a mistyped last character (arti).
        (f"{TOR_ADDRESS}:descriptor:x25519:{TOR_KEY[:-1]}z", "canonical"),
        ("", "exactly 4 fields"),
    ],
)
def test_files_tor_or_arti_reject_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidKeyError, match=reason) as caught:
        parse_auth_private(text)
    assert TOR_KEY not in str(caught.value).lower()


def test_the_secret_is_not_in_the_repr() -> None:
    parsed = parse_auth_private(f"{TOR_ADDRESS}:descriptor:x25519:{TOR_KEY}")
    assert TOR_KEY.upper() not in repr(parsed).upper()
    assert parsed.secret_key.hex() not in repr(parsed)
    assert TOR_ADDRESS in repr(parsed)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_gives_a_key_or_invalid_key_error(text: str) -> None:
    try:
        parsed = parse_auth_private(text)
    except InvalidKeyError:
        return
    assert isinstance(parsed, ClientAuthPrivateKey) and len(parsed.secret_key) == 32


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32).filter(any), st.integers(1, 200))
def test_every_key_tor_writes_reads_back(secret: bytes, seed: int) -> None:
    address = make_key(seed).onion_address
    body = base64.b32encode(secret).decode().rstrip("=").lower()
    parsed = parse_auth_private(f"{address.removesuffix('.onion')}:descriptor:x25519:{body}\n")
    assert parsed == ClientAuthPrivateKey(address, secret)
