"""Operator tools on top of the Tor layer: ``rustbalance debug tor|fetch|hsdirs|publish``.

``--control`` is ``HOST:PORT`` or a unix socket path. Authentication follows PROTOCOLINFO:
the cookie path comes from tor; a password, if tor wants one, comes from the environment
variable ``RUSTBALANCE_TOR_PASSWORD`` and never from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from rustbalance.cli.offline import decoded_json
from rustbalance.crypto.blinding import blind_public_key
from rustbalance.crypto.keys import load_identity_key
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.descriptor.builder import MAX_INTRO_POINTS
from rustbalance.descriptor.merge import merge_intro_points
from rustbalance.errors import RustBalanceError
from rustbalance.tor.control import ControlConnection, password_from_env
from rustbalance.tor.network import (
    NetworkView,
    fetch_descriptor,
    publish_master,
    read_network_view,
)

__all__ = ["register"]

# Intro points whose certs expire within this margin are left out of a master descriptor: a
# client that fetches it late must still find them valid (tor's own margin is hours).
INTRO_MIN_VALIDITY = 3600


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    debug_commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    tor = debug_commands.add_parser("tor", help="tor version, bootstrap, consensus age, HSDirs")
    _control_flag(tor)
    tor.set_defaults(func=_sync(_debug_tor))

    fetch = debug_commands.add_parser("fetch", help="HSFETCH and print the verified descriptor")
    _control_flag(fetch)
    fetch.add_argument("--address", required=True, help="onion address to fetch")
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    fetch.set_defaults(func=_sync(_debug_fetch))

    hsdirs = debug_commands.add_parser(
        "hsdirs", help="responsible HSDirs of both descriptors of an address"
    )
    _control_flag(hsdirs)
    hsdirs.add_argument("--address", required=True, help="onion address")
    hsdirs.set_defaults(func=_sync(_debug_hsdirs))

    publish = debug_commands.add_parser(
        "publish", help="one-shot: fetch instances, build and upload both master descriptors"
    )
    _control_flag(publish)
    publish.add_argument("--key", required=True, help="master key file")
    publish.add_argument(
        "--instance",
        action="append",
        required=True,
        metavar="ADDR",
        help="an instance's onion address (repeatable)",
    )
    publish.add_argument("--max-intro-points", type=int, default=MAX_INTRO_POINTS)
    publish.add_argument("--timeout", type=float, default=60.0, help="seconds per step")
    publish.set_defaults(func=_sync(_debug_publish))


def _control_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control", required=True, help="tor control port: HOST:PORT or a unix socket path"
    )


def _sync(
    func: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(func(args))

    return run


async def _connect(args: argparse.Namespace) -> ControlConnection:
    return await ControlConnection.connect(args.control, password=password_from_env())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


async def _debug_tor(args: argparse.Namespace) -> int:
    async with await _connect(args) as conn:
        info = await conn.get_info("version", "status/bootstrap-phase")
        view = await read_network_view(conn)
    now = int(time.time())
    out = {
        "version": info["version"],
        "bootstrap": info["status/bootstrap-phase"],
        "consensus_valid_after": view.valid_after,
        "consensus_age_seconds": now - view.valid_after,
        "voting_interval_seconds": view.consensus.voting_interval,
        "time_period_length_minutes": view.period_length,
        "time_period": view.current_time_period(),
        "hsdir_count": len(view.hsdirs),
        "hsdir_n_replicas": view.hsdir_params.n_replicas,
        "hsdir_spread_store": view.hsdir_params.spread_store,
        "hsdir_spread_fetch": view.hsdir_params.spread_fetch,
    }
    print(json.dumps(out, indent=2))
    return 0


async def _debug_fetch(args: argparse.Namespace) -> int:
    async with await _connect(args) as conn:
        view = await read_network_view(conn)
        decoded = await fetch_descriptor(conn, args.address, view, timeout=args.timeout)
    print(json.dumps(decoded_json(decoded), indent=2))
    return 0


def _hsdirs_json(view: NetworkView, address: str) -> dict[str, Any]:
    public_key = decode_onion_address(address)
    out: dict[str, Any] = {"address": address, "period_length_minutes": view.period_length}
    for label, target in zip(("first", "second"), view.descriptor_targets(), strict=True):
        blinded = blind_public_key(public_key, target.time_period, view.period_length)
        out[label] = {
            "time_period": target.time_period,
            "srv": _b64(target.srv),
            "blinded_key": _b64(blinded),
            "hsdirs": [
                {"fingerprint": relay.fingerprint, "nickname": relay.nickname}
                for relay in view.store_hsdirs(blinded, target)
            ],
        }
    return out


async def _debug_hsdirs(args: argparse.Namespace) -> int:
    async with await _connect(args) as conn:
        view = await read_network_view(conn)
    print(json.dumps(_hsdirs_json(view, args.address), indent=2))
    return 0


async def _debug_publish(args: argparse.Namespace) -> int:
    key = load_identity_key(args.key)
    async with await _connect(args) as conn:
        view = await read_network_view(conn)
        instances = []
        flow_control: str | None = None
        for address in args.instance:
            decoded = await fetch_descriptor(conn, address, view, timeout=args.timeout)
            print(
                f"fetched {address}: {len(decoded.intro_points)} intro points",
                file=sys.stderr,
            )
            instances.append(decoded.intro_points)
            # Every instance advertises flow-control when its tor runs congestion control;
            # carry it over only when all of them do (rend-spec-v3 [FLOW-CONTROL]).
            flow_control = decoded.flow_control if address == args.instance[0] else flow_control
            if decoded.flow_control != flow_control:
                flow_control = None
        now = int(time.time())
        points = merge_intro_points(instances, args.max_intro_points, now, INTRO_MIN_VALIDITY)
        if not points:
            raise RustBalanceError("no usable intro points in the instances' descriptors")
        results = await publish_master(
            conn,
            key,
            points,
            view,
            now=now,
            flow_control=flow_control,
            upload_timeout=args.timeout,
        )
    out = {
        "address": key.onion_address,
        "intro_points": len(points),
        "descriptors": {
            label: {
                "time_period": result.time_period,
                "revision_counter": result.revision_counter,
                "error": result.error,
                "hsdirs": [upload.to_dict() for upload in result.hsdirs],
            }
            for label, result in results.items()
        },
    }
    print(json.dumps(out, indent=2))
    return 0 if all(result.ok for result in results.values()) else 1
