"""Link specifier blocks (tor-spec 5.1.2 EXTEND2 link specifiers; rend-spec-v3
[HS-DESC-SECOND-LAYER] ``introduction-point``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustbalance.descriptor.link_specifiers import (
    LinkSpecifier,
    decode_link_specifiers,
    encode_link_specifiers,
)
from rustbalance.errors import DescriptorError
from tests.budget import budget


def test_known_encoding_of_ipv4_and_ed25519() -> None:
    # Hand-assembled from tor-spec 5.1.2: NSPEC=2, [00 06 7f000001 1388], [03 20 <32 x 0xab>].
    specs = (LinkSpecifier.ipv4("127.0.0.1", 5000), LinkSpecifier.ed25519_id(b"\xab" * 32))
    wire = bytes.fromhex("02" + "0006" + "7f000001" + "1388" + "0320") + b"\xab" * 32
    assert encode_link_specifiers(specs) == wire
    assert decode_link_specifiers(wire) == specs


def test_unknown_types_are_kept_verbatim_and_in_order() -> None:
    wire = bytes.fromhex("03" + "0901ff" + "0006c0a800010050" + "0400")
    specs = decode_link_specifiers(wire)
    assert [s.type for s in specs] == [9, 0, 4]
    assert specs[0].data == b"\xff" and specs[2].data == b""
    assert encode_link_specifiers(specs) == wire
    assert specs[0].describe() == {"type": 9, "value": "ff"}


def test_describe_known_types() -> None:
    assert LinkSpecifier.ipv6("::1", 443).describe() == {
        "type": "ipv6",
        "address": "::1",
        "port": 443,
    }
    assert LinkSpecifier.ipv4("10.0.0.1", 9001).describe()["address"] == "10.0.0.1"
    assert LinkSpecifier.legacy_id(b"\x01" * 20).describe() == {
        "type": "legacy_id",
        "value": "01" * 20,
    }


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"", "empty"),
        (bytes.fromhex("01"), "truncated"),
        (bytes.fromhex("010005"), "truncated"),
        (bytes.fromhex("0100057f00000113"), "must be 6 bytes"),
        (bytes.fromhex("00ff"), "trailing"),
        (bytes.fromhex("0109010000"), "trailing"),
    ],
)
def test_malformed_lists_raise_descriptor_error(wire: bytes, message: str) -> None:
    with pytest.raises(DescriptorError, match=message):
        decode_link_specifiers(wire)


def test_encoder_refuses_empty_list() -> None:
    with pytest.raises(DescriptorError):
        encode_link_specifiers(())


_spec = st.one_of(
    st.builds(LinkSpecifier, st.just(0), st.binary(min_size=6, max_size=6)),
    st.builds(LinkSpecifier, st.just(1), st.binary(min_size=18, max_size=18)),
    st.builds(LinkSpecifier, st.just(2), st.binary(min_size=20, max_size=20)),
    st.builds(LinkSpecifier, st.just(3), st.binary(min_size=32, max_size=32)),
    st.builds(LinkSpecifier, st.integers(4, 255), st.binary(max_size=255)),
)


@settings(max_examples=budget(300), deadline=None)
@given(st.lists(_spec, min_size=1, max_size=8))
def test_round_trip(specs: list[LinkSpecifier]) -> None:
    assert decode_link_specifiers(encode_link_specifiers(specs)) == tuple(specs)


@settings(max_examples=budget(500), deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_descriptor_error(data: bytes) -> None:
    try:
        specs = decode_link_specifiers(data)
    except DescriptorError:
        return
    assert encode_link_specifiers(specs) == data if specs else data == b"\x00"
