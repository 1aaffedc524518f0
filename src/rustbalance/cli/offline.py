"""Offline commands: key generation and descriptor debugging (no Tor, no network).

* ``rustbalance keygen --out FILE``
* ``rustbalance debug show-onion --key FILE``
* ``rustbalance debug decode-descriptor --address ADDR [FILE|-]``
* ``rustbalance debug build-descriptor --key FILE [--period current|next]
  [--client-auth FILE ...] --instance ADDR=DESCRIPTOR_FILE ...``

Without a consensus the time parameters default to the live network's (period 1440 min,
offset 720 min; rend-spec-v3 [TIME-PERIODS]); ``--period-length`` / ``--period-offset``
override them (a test network with voting interval V uses 24·V and 12·V, tor.md 3.1).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rustbalance.config.addresses import parse_client_auth_key
from rustbalance.crypto.blinding import blind_identity
from rustbalance.crypto.keys import IdentityKey, load_identity_key, write_seed_key_file
from rustbalance.crypto.onion_address import decode_onion_address, encode_onion_address
from rustbalance.crypto.revision import revision_counter
from rustbalance.crypto.time_period import (
    TimeParams,
    descriptor_targets,
    srv_run_start,
    time_period_num,
)
from rustbalance.descriptor.builder import MAX_INTRO_POINTS, build_descriptor
from rustbalance.descriptor.client_auth import parse_auth_private
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.merge import merge_intro_points
from rustbalance.descriptor.parser import DecodedDescriptor, decode_descriptor
from rustbalance.errors import ConfigError, DescriptorError, InvalidKeyError, RustBalanceError

__all__ = ["register"]

# rend-spec-v3 [TIME-PERIODS]: live network defaults.
_DEFAULT_PERIOD_LENGTH = 1440
_DEFAULT_PERIOD_OFFSET = 720
# tor.md 3.1: period = 24 voting intervals (one SR protocol run).
_ROUNDS_PER_PERIOD = 24
# Intro points must stay valid a while after publication (a descriptor lives 3 h at least
# on HSDirs, hs_descriptor.h HS_DESC_DEFAULT_LIFETIME); drop ones expiring within 1 h.
_MIN_REMAINING_VALIDITY = 3600
_MAX_INPUT = 1 << 20


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    debug_commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    keygen = commands.add_parser("keygen", help="create a new master key (seed file, 0600)")
    keygen.add_argument("--out", required=True, help="key file to create (never overwritten)")
    keygen.set_defaults(func=_keygen)

    show = debug_commands.add_parser("show-onion", help="print the onion address of a key")
    show.add_argument("--key", required=True, help="key file (seed, tor secret key, PEM)")
    show.set_defaults(func=_show_onion)

    decode = debug_commands.add_parser(
        "decode-descriptor", help="verify and decrypt a v3 descriptor, print JSON"
    )
    decode.add_argument("--address", required=True, help="onion address it must belong to")
    decode.add_argument("file", nargs="?", default="-", help="descriptor file, or - for stdin")
    decode.add_argument(
        "--client-auth-key",
        help="client key file (tor .auth_private '<addr>:descriptor:x25519:<base32>')",
    )
    _time_flags(decode)
    decode.set_defaults(func=_decode_descriptor)

    build = debug_commands.add_parser(
        "build-descriptor", help="merge instance descriptors into a signed master descriptor"
    )
    build.add_argument("--key", required=True, help="master key file")
    build.add_argument("--period", choices=("current", "next"), default="current")
    build.add_argument(
        "--client-auth",
        action="append",
        default=[],
        metavar="FILE",
        help="authorized client public key (tor .auth file 'descriptor:x25519:<base32>')",
    )
    build.add_argument(
        "--instance",
        action="append",
        required=True,
        metavar="ADDR=DESCRIPTOR_FILE",
        help="an instance's address and its descriptor (repeatable)",
    )
    build.add_argument("--max-intro-points", type=int, default=MAX_INTRO_POINTS)
    build.add_argument("--flow-control", help="flow-control value, e.g. '1-2 31'")
    _time_flags(build)
    build.set_defaults(func=_build_descriptor)


def _time_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--period-length", type=int, default=_DEFAULT_PERIOD_LENGTH, help="minutes (1440)"
    )
    parser.add_argument(
        "--period-offset", type=int, default=_DEFAULT_PERIOD_OFFSET, help="minutes (720)"
    )
    parser.add_argument("--now", type=int, help="Unix time to use instead of the clock")


def _params(args: argparse.Namespace) -> TimeParams:
    length, offset = args.period_length, args.period_offset
    if length < _ROUNDS_PER_PERIOD or (length * 60) % _ROUNDS_PER_PERIOD or offset < 0:
        raise ConfigError("--period-length must be a multiple of 24 s worth of minutes >= 24")
    return TimeParams(length, offset, length * 60 // _ROUNDS_PER_PERIOD)


def _now(args: argparse.Namespace) -> int:
    return int(time.time()) if args.now is None else int(args.now)


def _read_text(name: str) -> str:
    try:
        if name == "-":
            data = sys.stdin.buffer.read(_MAX_INPUT)
        else:
            with open(name, "rb") as handle:
                data = handle.read(_MAX_INPUT)
    except OSError as exc:
        raise DescriptorError(f"cannot read {name}: {exc.strerror or exc}") from exc
    try:
        # Control-port and HTTP transports may deliver CRLF; tor's documents use LF.
        return data.decode("ascii").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise DescriptorError(f"{name} is not an ASCII descriptor") from exc


def _iso(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _keygen(args: argparse.Namespace) -> int:
    key = IdentityKey.generate(os.urandom)
    write_seed_key_file(key, args.out)
    print(key.onion_address)
    return 0


def _show_onion(args: argparse.Namespace) -> int:
    print(load_identity_key(args.key).onion_address)
    return 0


def _b32_key(text: str, what: str) -> bytes:
    body = text.strip().upper()
    try:
        key = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what}: key is not base32") from exc
    if len(key) != 32:
        raise ConfigError(f"{what}: key must be 32 bytes")
    return key


def _read_small(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii")[:4096]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}") from exc


def _client_public_key(path: str) -> bytes:
    # tor <HiddenServiceDir>/authorized_clients/<name>.auth: "descriptor:x25519:<base32 pk>".
    text = _read_small(path, "client auth file").strip()
    try:
        return parse_client_auth_key(text)
    except ConfigError as exc:
        raise ConfigError(f"client auth file {path}: {exc}") from None


def _client_private_key(path: str, address: str) -> bytes:
    # tor ClientOnionAuthDir/<name>.auth_private, read by tor's and arti's rules.
    text = _read_small(path, "client auth key file")
    try:
        parsed = parse_auth_private(text)
    except InvalidKeyError as exc:
        raise ConfigError(f"client auth key file {path}: {exc}") from None
    if parsed.onion_address != _canonical_address(address):
        raise ConfigError(
            f"client auth key file {path} is for {parsed.onion_address}, not {address}"
        )
    return parsed.secret_key


def _canonical_address(address: str) -> str:
    """``address`` in canonical form (lower case, with ``.onion``); checks it."""
    return encode_onion_address(decode_onion_address(address))


def _candidates(now: int, params: TimeParams) -> list[int]:
    tp = time_period_num(now, params)
    return [tp, tp - 1, tp + 1]


def intro_json(point: IntroPoint) -> dict[str, Any]:
    return {
        "link_specifiers": [spec.describe() for spec in point.link_specifiers],
        "onion_key": base64.b64encode(point.onion_key).decode("ascii"),
        "auth_key": base64.b64encode(point.auth_key).decode("ascii"),
        "auth_key_cert_expiry": _iso(point.auth_key_cert.expires_at),
        "enc_key": base64.b64encode(point.enc_key).decode("ascii"),
        "enc_key_cert_expiry": _iso(point.enc_key_cert.expires_at),
    }


def decoded_json(decoded: DecodedDescriptor) -> dict[str, Any]:
    pow_params = decoded.pow_params
    return {
        "lifetime_minutes": decoded.lifetime,
        "revision_counter": decoded.revision_counter,
        "signing_cert_expiry": _iso(decoded.signing_cert_expiry),
        "time_period": decoded.time_period,
        "blinded_key": base64.b64encode(decoded.blinded_key).decode("ascii").rstrip("="),
        "flow_control": decoded.flow_control,
        "pow_params": None
        if pow_params is None
        else {
            "type": pow_params.type,
            "seed": base64.b64encode(pow_params.seed).decode("ascii"),
            "suggested_effort": pow_params.suggested_effort,
            "expiration": _iso(pow_params.expiration),
        },
        "single_onion_service": decoded.single_onion,
        "intro_auth_required": list(decoded.intro_auth_required),
        "client_authorization": decoded.client_auth,
        "intro_points": [intro_json(point) for point in decoded.intro_points],
        "dropped_intro_points": list(decoded.dropped_intro_points),
    }


def _decode_descriptor(args: argparse.Namespace) -> int:
    params = _params(args)
    now = _now(args)
    client_key = None
    if args.client_auth_key:
        client_key = _client_private_key(args.client_auth_key, args.address)
    decoded = decode_descriptor(
        _read_text(args.file),
        args.address,
        now=now,
        period_length=params.period_length_minutes,
        time_periods=_candidates(now, params),
        client_auth_key=client_key,
    )
    print(json.dumps(decoded_json(decoded), indent=2))
    return 0


def _build_descriptor(args: argparse.Namespace) -> int:
    params = _params(args)
    now = _now(args)
    key = load_identity_key(args.key)
    instances: list[tuple[IntroPoint, ...]] = []
    flow_control = args.flow_control
    for spec in args.instance:
        address, sep, path = spec.partition("=")
        if not sep or not path:
            raise ConfigError(f"--instance must be ADDR=DESCRIPTOR_FILE, got {spec!r}")
        decode_onion_address(address)
        try:
            decoded = decode_descriptor(
                _read_text(path),
                address,
                now=now,
                period_length=params.period_length_minutes,
                time_periods=_candidates(now, params),
            )
        except RustBalanceError as exc:
            raise DescriptorError(f"instance {address}: {exc}") from exc
        instances.append(decoded.intro_points)
        if flow_control is None:
            flow_control = decoded.flow_control
    points = merge_intro_points(
        instances,
        max_points=args.max_intro_points,
        now=now,
        min_remaining_validity=_MIN_REMAINING_VALIDITY,
    )
    if not points:
        raise DescriptorError("no usable intro points in the instance descriptors")
    tp = time_period_num(now, params) + (1 if args.period == "next" else 0)
    first, second = descriptor_targets(now, params, None, None)
    run_start = srv_run_start(now, params)
    for target in (first, second):
        if target.time_period == tp:
            run_start = target.srv_run_start
    blinded = blind_identity(key, tp, params.period_length_minutes)
    text = build_descriptor(
        identity_public_key=key.public_key,
        blinded=blinded,
        intro_points=points,
        revision_counter=revision_counter(blinded, run_start, now),
        now=now,
        randbytes=os.urandom,
        client_auth_keys=[_client_public_key(path) for path in args.client_auth],
        flow_control=flow_control,
    )
    sys.stdout.write(text)
    return 0
