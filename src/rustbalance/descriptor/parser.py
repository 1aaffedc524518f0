"""Parse, verify and decrypt a v3 onion-service descriptor (rend-spec-v3 section 2.4-2.5;
tor ``src/feature/hs/hs_descriptor.c`` ``hs_desc_decode_plaintext``,
``desc_decode_superencrypted_v3``, ``desc_decode_encrypted_v3``).

:func:`decode_descriptor` parameters:

* ``text``: the descriptor (from tor's ``hs/service/desc/id``, ``HS_DESC_CONTENT``, a file);
* ``onion_address``: the service it must belong to;
* ``now`` (Unix seconds) for certificate expiry;
* ``period_length`` (minutes) and ``time_periods``: candidate periods; the 08 cert's
  signing key (extension 04) must equal the blinded key of the address for one of them
  (tor.md section 6.6: code that obtains descriptors itself must check this);
* ``client_auth_key``: optional x25519 private key of an authorized client.

Grammar strictness follows tor's token tables: ``hs-descriptor`` first, ``signature`` last,
the other outer items exactly once; unknown items are ignored. Tor skips an intro point
that fails to decode ("New or unknown fields are possible for forward compatibility"); so do
we, and the reason is reported in ``DecodedDescriptor.dropped_intro_points``.

Every failure raises :class:`DescriptorError` (nothing else escapes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from rustbalance.crypto.blinding import blind_public_key, subcredential
from rustbalance.crypto.certs import CERT_TYPE_HS_V_SIGNING, parse_cert
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.descriptor.builder import (
    MAX_DESCRIPTOR_SIZE,
    MAX_INTRO_POINTS,
    MAX_LIFETIME_MINUTES,
    POW_SEED_LENGTH,
    SIGNATURE_PREFIX,
    PowParams,
)
from rustbalance.descriptor.client_auth import AuthClient, find_descriptor_cookie
from rustbalance.descriptor.document import (
    Item,
    b64decode,
    optional_once,
    require_no_object,
    require_object,
    require_once,
    tokenize,
)
from rustbalance.descriptor.intro_point import IntroPoint, parse_intro_point
from rustbalance.descriptor.layers import (
    ENCRYPTED_CONSTANT,
    SUPERENCRYPTED_CONSTANT,
    decrypt_layer,
)
from rustbalance.errors import CertificateError, DescriptorError, RustBalanceError

__all__ = ["DecodedDescriptor", "decode_descriptor"]

_DIGITS = re.compile(r"[0-9]+")
# tor ED25519_SIG_BASE64_LEN: 64 bytes in base64 without padding.
_SIG_B64_LEN = 86
_ISO_NOSPACE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}")


@dataclass(frozen=True, slots=True)
class DecodedDescriptor:
    """What a verified, decrypted descriptor says."""

    lifetime: int  # minutes
    revision_counter: int
    signing_key: bytes
    signing_cert_expiry: int  # Unix seconds
    blinded_key: bytes
    time_period: int
    intro_points: tuple[IntroPoint, ...]
    flow_control: str | None
    pow_params: PowParams | None
    single_onion: bool
    intro_auth_required: tuple[str, ...]
    client_auth: bool  # True if the inner layer needed a descriptor cookie
    dropped_intro_points: tuple[str, ...]  # reasons, one per skipped intro point


def _uint(text: str, bits: int, what: str) -> int:
    if not _DIGITS.fullmatch(text) or len(text) > 20:
        raise DescriptorError(f"{what} is not a decimal number")
    value = int(text)
    if value >= 1 << bits:
        raise DescriptorError(f"{what} is out of range")
    return value


def _decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DescriptorError(f"{what} is not ASCII text") from exc


def _check_args(item: Item, *, exactly: int | None = None, at_least: int = 0, what: str) -> None:
    if exactly is not None and len(item.args) != exactly:
        raise DescriptorError(f"{what}: {item.keyword!r} needs exactly {exactly} argument(s)")
    if len(item.args) < at_least:
        raise DescriptorError(f"{what}: {item.keyword!r} needs at least {at_least} argument(s)")


def _outer(text: str, now: int) -> tuple[int, int, bytes, int, bytes, bytes]:
    """Verify the outer document; return lifetime, revision, signing key, cert expiry,
    blinded key, superencrypted blob."""
    what = "descriptor"
    items = tokenize(text, what)
    if not items or items[0].keyword != "hs-descriptor":
        raise DescriptorError("descriptor must start with 'hs-descriptor'")
    head = require_once(items, "hs-descriptor", what)
    _check_args(head, exactly=1, what=what)
    require_no_object(head, what)
    if head.args[0] != "3":
        raise DescriptorError(f"unsupported descriptor version {head.args[0][:10]!r}")
    if items[-1].keyword != "signature":
        raise DescriptorError("descriptor must end with the 'signature' line")
    sig_item = require_once(items, "signature", what)
    _check_args(sig_item, exactly=1, what=what)
    require_no_object(sig_item, what)

    lifetime_item = require_once(items, "descriptor-lifetime", what)
    _check_args(lifetime_item, exactly=1, what=what)
    require_no_object(lifetime_item, what)
    lifetime = _uint(lifetime_item.args[0], 32, "descriptor-lifetime")
    if lifetime > MAX_LIFETIME_MINUTES:  # hs_descriptor.c: HS_DESC_MAX_LIFETIME
        raise DescriptorError(f"descriptor-lifetime {lifetime} exceeds {MAX_LIFETIME_MINUTES}")

    cert_item = require_once(items, "descriptor-signing-key-cert", what)
    _check_args(cert_item, exactly=0, what=what)
    try:
        cert = parse_cert(require_object(cert_item, "ED25519 CERT", what))
        if cert.cert_type != CERT_TYPE_HS_V_SIGNING:
            raise DescriptorError(f"signing-key cert has type {cert.cert_type:#04x}, not 08")
        blinded_key = cert.signing_key
        if blinded_key is None:
            raise DescriptorError("signing-key cert does not include the blinded key")
        cert.verify(blinded_key, now)
    except CertificateError as exc:
        raise DescriptorError(f"descriptor-signing-key-cert: {exc}") from exc

    rev_item = require_once(items, "revision-counter", what)
    _check_args(rev_item, exactly=1, what=what)
    require_no_object(rev_item, what)
    revision = _uint(rev_item.args[0], 64, "revision-counter")

    super_item = require_once(items, "superencrypted", what)
    _check_args(super_item, exactly=0, what=what)
    blob = require_object(super_item, "MESSAGE", what)

    b64_sig = sig_item.args[0]
    if len(b64_sig) != _SIG_B64_LEN:
        raise DescriptorError("descriptor signature has the wrong length")
    signature = b64decode(b64_sig, "descriptor signature", 64)
    start = sig_item.start
    if start == 0 or text[start - 1] != "\n":
        raise DescriptorError("descriptor signature line is malformed")
    signed = SIGNATURE_PREFIX + text[:start].encode("ascii")
    try:
        Ed25519PublicKey.from_public_bytes(cert.certified_key).verify(signature, signed)
    except (InvalidSignature, ValueError) as exc:
        raise DescriptorError("descriptor signature does not verify") from exc
    return lifetime, revision, cert.certified_key, cert.expires_at, blinded_key, blob


def _middle(plaintext: str) -> tuple[bytes, list[AuthClient], bytes]:
    what = "superencrypted layer"
    items = tokenize(plaintext, what)
    if not items or items[0].keyword != "desc-auth-type":
        raise DescriptorError(f"{what} must start with 'desc-auth-type'")
    auth_type = require_once(items, "desc-auth-type", what)
    _check_args(auth_type, at_least=1, what=what)
    if auth_type.args[0] != "x25519":
        raise DescriptorError(f"{what}: unknown desc-auth-type {auth_type.args[0][:20]!r}")
    eph_item = require_once(items, "desc-auth-ephemeral-key", what)
    _check_args(eph_item, at_least=1, what=what)
    ephemeral = b64decode(eph_item.args[0], "desc-auth-ephemeral-key", 32)
    clients: list[AuthClient] = []
    for item in items:
        if item.keyword == "auth-client":
            _check_args(item, at_least=3, what=what)
            clients.append(
                AuthClient(
                    b64decode(item.args[0], "auth-client id", 8),
                    b64decode(item.args[1], "auth-client iv", 16),
                    b64decode(item.args[2], "auth-client cookie", 16),
                )
            )
    if not clients:  # tor T1N: auth-client appears one or more times
        raise DescriptorError(f"{what} has no auth-client line")
    encrypted = require_once(items, "encrypted", what)
    _check_args(encrypted, exactly=0, what=what)
    for item in items:
        if item.keyword in ("desc-auth-type", "desc-auth-ephemeral-key", "auth-client"):
            require_no_object(item, what)
    return ephemeral, clients, require_object(encrypted, "MESSAGE", what)


def _pow(item: Item) -> PowParams:
    _check_args(item, at_least=4, what="encrypted layer")
    kind, seed_b64, effort, expires = item.args[:4]
    if kind != "v1":
        raise DescriptorError(f"unknown PoW type {kind[:20]!r}")
    seed = b64decode(seed_b64, "pow-params seed", POW_SEED_LENGTH)
    if not _ISO_NOSPACE.fullmatch(expires):
        raise DescriptorError("pow-params expiration is not YYYY-MM-DDTHH:MM:SS")
    try:
        when = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError as exc:
        raise DescriptorError("pow-params expiration is not a valid time") from exc
    return PowParams(seed, _uint(effort, 32, "pow-params effort"), int(when.timestamp()))


def _split_intro_points(items: Sequence[Item]) -> tuple[list[Item], list[list[Item]]]:
    header: list[Item] = []
    blocks: list[list[Item]] = []
    for item in items:
        if item.keyword == "introduction-point":
            blocks.append([item])
        elif blocks:
            blocks[-1].append(item)
        else:
            header.append(item)
    return header, blocks


def _inner(
    plaintext: str, signing_key: bytes, now: int
) -> tuple[
    tuple[IntroPoint, ...], str | None, PowParams | None, bool, tuple[str, ...], tuple[str, ...]
]:
    what = "encrypted layer"
    items = tokenize(plaintext, what)
    if not items or items[0].keyword != "create2-formats":
        raise DescriptorError(f"{what} must start with 'create2-formats'")
    create2 = require_once(items, "create2-formats", what)
    if "2" not in create2.args:  # ONION_HANDSHAKE_TYPE_NTOR is mandatory
        raise DescriptorError(f"{what}: create2-formats does not include ntor (2)")
    header, blocks = _split_intro_points(items)
    auth_required: tuple[str, ...] = ()
    auth_item = optional_once(items, "intro-auth-required", what)
    if auth_item is not None:
        _check_args(auth_item, at_least=1, what=what)
        if not any(arg.startswith("ed25519") for arg in auth_item.args):
            raise DescriptorError(f"{what}: intro-auth-required has no known type")
        auth_required = auth_item.args
    single = optional_once(items, "single-onion-service", what) is not None
    flow_control: str | None = None
    flow_item = optional_once(items, "flow-control", what)
    if flow_item is not None:
        _check_args(flow_item, at_least=2, what=what)
        sendme = _uint(flow_item.args[1], 8, "flow-control sendme increment")
        if sendme == 0:
            raise DescriptorError("flow-control sendme increment must not be 0")
        flow_control = f"{flow_item.args[0]} {sendme}"
    pow_item = optional_once(items, "pow-params", what)
    pow_params = _pow(pow_item) if pow_item is not None else None
    for item in header:
        if item.keyword in ("create2-formats", "flow-control", "pow-params"):
            require_no_object(item, what)
    points: list[IntroPoint] = []
    dropped: list[str] = []
    for index, block in enumerate(blocks):
        try:
            points.append(parse_intro_point(block, signing_key, now))
        except RustBalanceError as exc:
            dropped.append(f"intro point {index}: {exc}")
    if len(points) > MAX_INTRO_POINTS:
        raise DescriptorError(
            f"descriptor has {len(points)} intro points; at most {MAX_INTRO_POINTS} allowed"
        )
    return tuple(points), flow_control, pow_params, single, auth_required, tuple(dropped)


def decode_descriptor(
    text: str,
    onion_address: str,
    *,
    now: int,
    period_length: int,
    time_periods: Iterable[int],
    client_auth_key: bytes | None = None,
) -> DecodedDescriptor:
    """Verify and decrypt ``text``; see the module docstring."""
    try:
        return _decode(text, onion_address, now, period_length, time_periods, client_auth_key)
    except DescriptorError:
        raise
    except RustBalanceError as exc:
        raise DescriptorError(str(exc)) from exc
    except (ValueError, TypeError, IndexError, KeyError, OverflowError) as exc:
        # Defensive: a parser bug must still surface as the one documented error type.
        raise DescriptorError(f"malformed descriptor ({type(exc).__name__})") from exc


def _decode(
    text: str,
    onion_address: str,
    now: int,
    period_length: int,
    time_periods: Iterable[int],
    client_auth_key: bytes | None,
) -> DecodedDescriptor:
    if not isinstance(text, str):
        raise DescriptorError("descriptor must be text")
    if len(text) >= MAX_DESCRIPTOR_SIZE:
        raise DescriptorError(f"descriptor is too big ({len(text)} bytes)")
    if not text.isascii() or "\0" in text:
        raise DescriptorError("descriptor contains non-ASCII or NUL characters")
    identity = decode_onion_address(onion_address)
    lifetime, revision, signing_key, cert_expiry, blinded, blob = _outer(text, now)
    period: int | None = None
    for candidate in time_periods:
        if blind_public_key(identity, candidate, period_length) == blinded:
            period = candidate
            break
    if period is None:
        raise DescriptorError(
            "descriptor is not signed by this address's blinded key for any candidate period"
        )
    subcred = subcredential(identity, blinded)
    middle = decrypt_layer(
        blob,
        secret_data=blinded,
        subcredential=subcred,
        revision_counter=revision,
        constant=SUPERENCRYPTED_CONSTANT,
        what="superencrypted layer",
    )
    ephemeral, clients, inner_blob = _middle(_decode_text(middle, "superencrypted layer"))
    cookie: bytes | None = None
    if client_auth_key is not None:
        cookie = find_descriptor_cookie(
            clients,
            subcredential=subcred,
            ephemeral_public=ephemeral,
            client_secret=client_auth_key,
        )
    try:
        inner = decrypt_layer(
            inner_blob,
            secret_data=blinded + (cookie or b""),
            subcredential=subcred,
            revision_counter=revision,
            constant=ENCRYPTED_CONSTANT,
            what="encrypted layer",
        )
    except DescriptorError as exc:
        if client_auth_key is None:
            raise DescriptorError(
                "cannot decrypt the inner layer: the descriptor requires client "
                "authorization (restricted discovery) or is corrupt"
            ) from exc
        raise DescriptorError(
            "cannot decrypt the inner layer: the client authorization key is not "
            "authorized for this descriptor"
        ) from exc
    points, flow, pow_params, single, auth_req, dropped = _inner(
        _decode_text(inner, "encrypted layer"), signing_key, now
    )
    return DecodedDescriptor(
        lifetime=lifetime,
        revision_counter=revision,
        signing_key=signing_key,
        signing_cert_expiry=cert_expiry,
        blinded_key=blinded,
        time_period=period,
        intro_points=points,
        flow_control=flow,
        pow_params=pow_params,
        single_onion=single,
        intro_auth_required=auth_req,
        client_auth=cookie is not None,
        dropped_intro_points=dropped,
    )
