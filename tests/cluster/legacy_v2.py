"""The protocol v2 datagram format (one shared cluster token), frozen for the upgrade tests.

This is the sealing and the version check of ``rustbalance/cluster/messages.py`` as released at
commit 35a2d46 (protocol v2), trimmed to what the tests need: a v2 node's datagrams, and how a
v2 node treats a datagram whose version byte it does not know. It is test code only: nothing in
the product speaks v2 any more (docs/security.md, "Upgrading from protocol v2").

    datagram = version(1)=2 ‖ id_len(1) ‖ sender_id ‖ nonce(12) ‖ ChaCha20-Poly1305(body) ‖ tag
    AAD      = version ‖ id_len ‖ sender_id; key = HKDF-SHA256(token, info="... v2")
    body     = seq(u64) ‖ timestamp_ms(u64) ‖ type(u8) ‖ payload
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

V2 = 2
_INFO = b"rustbalance cluster coordination v%d" % V2
LEASE_RELEASE = 4


def v2_key(token: bytes) -> ChaCha20Poly1305:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO)
    return ChaCha20Poly1305(hkdf.derive(token.strip()))


def v2_datagram(token: bytes, sender: str, seq: int, now_ms: int, nonce: bytes) -> bytes:
    """An authentic v2 lease_release (term 1) from ``sender``, sealed with the cluster token."""
    raw = sender.encode("ascii")
    header = bytes([V2, len(raw)]) + raw
    body = struct.pack(">QQBQ", seq, now_ms, LEASE_RELEASE, 1)
    return header + nonce + v2_key(token).encrypt(nonce, body, header)


def v2_receiver_verdict(token: bytes, datagram: bytes) -> str:
    """What a v2 node's ``open_datagram`` made of a datagram: the reason it rejected it, or
    ``"accepted"`` (its exact checks, in its order: size, version, header, AEAD)."""
    if len(datagram) < 2:
        return "malformed"
    version, id_len = datagram[0], datagram[1]
    if version != V2:
        return "unknown_version"
    id_end = 2 + id_len
    if len(datagram) < id_end + 12 + 16:
        return "malformed"
    try:
        v2_key(token).decrypt(
            datagram[id_end : id_end + 12], datagram[id_end + 12 :], datagram[:id_end]
        )
    except Exception:
        return "forged"
    return "accepted"
