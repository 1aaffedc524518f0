"""v3 onion addresses (rend-spec-v3 [ONIONADDRESS])."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_core_ed25519_add, crypto_scalarmult_ed25519_base_noclamp
from stem.descriptor.hidden_service import HiddenServiceDescriptorV3

from rustbalance.crypto.keys import IdentityKey
from rustbalance.crypto.onion_address import decode_onion_address, encode_onion_address
from rustbalance.errors import InvalidKeyError
from tests.budget import budget

# tor src/test/test_hs_common.c test_build_address / test_validate_address: the RFC 8032
# section 7.1 test-1 public key and the address tor's hs_build_address.py made from it.
TOR_PUBKEY = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
TOR_ADDRESS = "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkenl5sid"
# tor test_validate_address: addresses with an invalid checksum (taken from prop224).
TOR_BAD_CHECKSUMS = [
    "l5satjgud6gucryazcyvyvhuxhr74u6ygigiuyixe3a6ysis67ororad",
    "btojiu7nu5y5iwut64eufevogqdw4wmqzugnoluw232r4t3ecsfv37ad",
]
# /work/shared/reference/system.md section 9.3.
SYSTEM_PUBKEY = bytes.fromhex("e33734887a0d09abdf3470ca9839814b5813e29844f05feaff0609899f8ce633")
SYSTEM_ADDRESS = "4m3tjcd2bue2xxzuodfjqombjnmbhyuyityf72x7ayeyth4m4yzr5nad.onion"

# A point of order 8 (Bernstein et al. small-order list; libsodium blocklist entry).
ORDER_8_POINT = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")


def _address_for(raw_key: bytes, version: int = 3) -> str:
    checksum = hashlib.sha3_256(b".onion checksum" + raw_key + bytes([version])).digest()[:2]
    body = raw_key + checksum + bytes([version])
    return base64.b32encode(body).decode().lower() + ".onion"


def test_tor_vector_encodes_and_decodes() -> None:
    assert encode_onion_address(TOR_PUBKEY) == TOR_ADDRESS + ".onion"
    assert decode_onion_address(TOR_ADDRESS) == TOR_PUBKEY


def test_system_vector() -> None:
    assert encode_onion_address(SYSTEM_PUBKEY) == SYSTEM_ADDRESS
    assert decode_onion_address(SYSTEM_ADDRESS) == SYSTEM_PUBKEY


def test_decode_accepts_upper_case_and_missing_suffix() -> None:
    assert decode_onion_address(TOR_ADDRESS.upper() + ".ONION") == TOR_PUBKEY
    assert decode_onion_address(TOR_ADDRESS + ".Onion") == TOR_PUBKEY


@pytest.mark.parametrize("address", TOR_BAD_CHECKSUMS)
def test_tor_bad_checksum_vectors_rejected(address: str) -> None:
    with pytest.raises(InvalidKeyError, match="checksum"):
        decode_onion_address(address)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("blah", "56 base32 characters"),
        (TOR_ADDRESS + "b", "56 base32 characters"),
        (TOR_ADDRESS[:-1], "56 base32 characters"),
        ("?" * 56, "alphabet"),
        (TOR_ADDRESS[:10] + "0" + TOR_ADDRESS[11:], "alphabet"),
        (TOR_ADDRESS[:10] + "1" + TOR_ADDRESS[11:], "alphabet"),
        (TOR_ADDRESS + ".onion.onion", "56 base32 characters"),
        ("www." + TOR_ADDRESS + ".onion", "56 base32 characters"),
        (" " + TOR_ADDRESS, "56 base32 characters"),
        ("é" * 56, "alphabet"),
    ],
)
def test_malformed_addresses_rejected(address: str, problem: str) -> None:
    with pytest.raises(InvalidKeyError, match=problem):
        decode_onion_address(address)


def test_wrong_version_rejected_even_with_matching_checksum() -> None:
    with pytest.raises(InvalidKeyError, match="version 2"):
        decode_onion_address(_address_for(TOR_PUBKEY, version=2))


def test_tampered_key_fails_checksum() -> None:
    flipped = ("a" if TOR_ADDRESS[0] != "a" else "b") + TOR_ADDRESS[1:]
    with pytest.raises(InvalidKeyError, match="checksum"):
        decode_onion_address(flipped)


def test_torsion_component_rejected() -> None:
    # A valid key plus a point of order 8: correct checksum, but not in the prime-order
    # subgroup, which rend-spec-v3 [ONIONADDRESS] requires rejecting.
    torsioned = bytes(crypto_core_ed25519_add(TOR_PUBKEY, ORDER_8_POINT))
    with pytest.raises(InvalidKeyError, match="torsion"):
        decode_onion_address(_address_for(torsioned))
    with pytest.raises(InvalidKeyError, match="torsion"):
        encode_onion_address(torsioned)


@pytest.mark.parametrize(
    "raw_key",
    [
        bytes(32),  # not a valid encoding of a usable point
        bytes([1]) + bytes(31),  # the neutral element (small order)
        ORDER_8_POINT,
        bytes([0xFF] * 31 + [0x7F]),  # non-canonical y >= p
    ],
)
def test_small_order_and_non_canonical_keys_rejected(raw_key: bytes) -> None:
    with pytest.raises(InvalidKeyError):
        decode_onion_address(_address_for(raw_key))


def test_encode_rejects_wrong_length() -> None:
    with pytest.raises(InvalidKeyError, match="32 bytes"):
        encode_onion_address(b"\x01" * 31)


def test_matches_stem_for_generated_keys() -> None:
    for seed_byte in range(5):
        key = IdentityKey.from_seed(bytes([seed_byte]) * 32)
        stem_address = HiddenServiceDescriptorV3.address_from_identity_key(key.public_key)
        assert key.onion_address == stem_address
        assert HiddenServiceDescriptorV3.identity_key_from_address(key.onion_address) == (
            key.public_key
        )


@settings(max_examples=budget(300), deadline=None)
@given(st.text(max_size=80))
def test_decode_arbitrary_text_only_raises_invalid_key(text: str) -> None:
    try:
        key = decode_onion_address(text)
    except InvalidKeyError:
        return
    assert encode_onion_address(key).removesuffix(".onion") == text.lower().removesuffix(".onion")


@settings(max_examples=budget(300), deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", min_size=56, max_size=56))
def test_decode_arbitrary_base32_only_raises_invalid_key(body: str) -> None:
    try:
        key = decode_onion_address(body)
    except InvalidKeyError:
        return
    assert encode_onion_address(key) == body + ".onion"


@settings(max_examples=budget(200), deadline=None)
@given(st.integers(min_value=1, max_value=2**252))
def test_round_trip_for_valid_keys(scalar: int) -> None:
    public = bytes(crypto_scalarmult_ed25519_base_noclamp(scalar.to_bytes(32, "little")))
    address = encode_onion_address(public)
    assert len(address) == 62 and address == address.lower()
    assert decode_onion_address(address) == public
