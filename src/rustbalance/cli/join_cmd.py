"""``rustbalance join``: set up a further node from a join token.

Decrypts the token (system.md §5, W1, W3, W13) and writes this node's config, the cluster
token, the join secret, a fresh WireGuard key and, only when the token carries it (a
publisher-eligible joiner), the master key. The actual join (tunnel address, peer list) happens
when the daemon starts: it POSTs to the master onion with :func:`rustbalance.node.join.
join_via_onion`.

Where the token may come from:

- ``--token-file FILE`` or ``--token-file -`` (stdin): any token;
- a positional ``TOKEN``: only a passphrase-protected one. It is useless without the passphrase,
  while a raw token *is* the secret, and argv is readable by every user in ``/proc`` and lands
  in shell history.

A wrong passphrase or a damaged token is a one-line error, exit 1, and nothing is written: the
token is decoded before anything touches the disk, and the files are written under temporary
names and renamed only at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rustbalance.cli.init_cmd import (
    CLUSTER_FILE,
    CLUSTER_TOKEN_FILE,
    CONFIG_FILE,
    DEFAULT_COORDINATION_PORT,
    DEFAULT_TUNNEL_NETWORK,
    JOIN_SECRET_FILE,
    MASTER_KEY_FILE,
    WIREGUARD_KEY_FILE,
    CliError,
    Io,
    StagedFiles,
    add_common_arguments,
    check_endpoint,
    check_node_id,
    cluster_sidecar,
    default_node_id,
    ensure_private_dir,
    generate_wireguard_key,
    obtain_passphrase,
    read_secret_file,
    validated_config,
)
from rustbalance.config import parse_endpoint
from rustbalance.deploy.join_token import JoinPayload, decode, token_needs_passphrase
from rustbalance.errors import ConfigError

__all__ = ["register", "run_join"]

SubParsers = Any

# A target must be named somewhere; the token does not carry it and deploy.sh does not pass
# one on --join, so the common local web server is the default (printed, easy to edit).
DEFAULT_JOIN_TARGET = "127.0.0.1:80"


def register(commands: SubParsers, debug_commands: SubParsers) -> None:
    """Add ``rustbalance join`` (``debug_commands`` is not used)."""
    del debug_commands
    parser = commands.add_parser(
        "join",
        help="set up a further node from a join token",
        description=(
            "Decrypt a join token and write this node's config and secrets. Raw tokens must "
            "come from --token-file FILE or --token-file - (stdin), never from argv."
        ),
    )
    parser.add_argument(
        "token",
        nargs="?",
        metavar="TOKEN",
        help="a passphrase-protected token (raw tokens only via --token-file)",
    )
    parser.add_argument("--token-file", metavar="FILE|-", help="read the token from FILE or stdin")
    add_common_arguments(parser, default_priority=20)
    parser.add_argument(
        "--target",
        help=f"HOST:PORT of the service on this node (default {DEFAULT_JOIN_TARGET})",
    )
    parser.add_argument(
        "--coordination-listen",
        default=f"0.0.0.0:{DEFAULT_COORDINATION_PORT}",
        help=(
            "HOST:PORT for coordination (default 0.0.0.0:51821: the tunnel address is "
            "assigned when the daemon joins)"
        ),
    )
    parser.set_defaults(func=lambda args: run_join(args, Io()))


def _read_token(args: argparse.Namespace) -> str:
    if args.token is not None and args.token_file is not None:
        raise CliError("give the token either as TOKEN or with --token-file, not both")
    if args.token_file is not None:
        return read_secret_file(args.token_file, "join token").strip()
    if args.token is None:
        raise CliError("no join token: use --token-file FILE or --token-file - (stdin)")
    if not token_needs_passphrase(args.token):
        # Too late for this copy (it is in argv now), but say so and do not use it.
        raise CliError(
            "a raw token is a secret by itself and must not be on the command line: pass it "
            "with --token-file FILE or --token-file - (stdin), and issue a new one"
        )
    return str(args.token)


def _decode(args: argparse.Namespace, token: str, io: Io) -> JoinPayload:
    passphrase = (
        obtain_passphrase(args, io, confirm=False) if token_needs_passphrase(token) else None
    )
    return decode(token, passphrase, now=int(time.time()))


def run_join(args: argparse.Namespace, io: Io) -> int:
    interactive = not args.non_interactive and io.stdin_is_tty()
    config_dir = Path(args.config_dir).absolute()
    # Decode first: a wrong passphrase or a damaged token must leave no trace on disk.
    payload = _decode(args, _read_token(args), io)

    node_id = check_node_id(args.node_id or default_node_id())
    if node_id == payload.issuer_node_id:
        raise CliError(f"node id {node_id!r} is the issuing node's; choose one with --node-id")
    endpoint_text = args.endpoint
    if not endpoint_text and interactive:
        endpoint_text = io.ask("Public WireGuard endpoint (IP:PORT): ").strip()
    if not endpoint_text:
        raise CliError("--endpoint is required")
    endpoint = check_endpoint(endpoint_text, "--endpoint")
    target_text = args.target
    if not target_text:
        target_text = DEFAULT_JOIN_TARGET
        print(f"note: no --target given, using {target_text}", file=sys.stderr)
    target = check_endpoint(target_text, "--target", allow_onion=True)
    listen = check_endpoint(args.coordination_listen, "--coordination-listen")
    # Coordination runs over UDP between tunnel addresses: onion seed peers cannot be used.
    peers = []
    for peer in payload.seed_peers:
        try:
            endpoint_obj = parse_endpoint(peer)
        except ConfigError:
            continue
        if str(endpoint_obj) != listen:
            peers.append(str(endpoint_obj))
    if not peers:
        raise CliError("the join token names no usable coordination peer")

    state_dir = Path(args.state_dir).absolute()
    config: dict[str, Any] = {
        "node": {
            "id": node_id,
            "priority": args.priority,
            "publisher_eligible": payload.publisher_eligible,
            "state_dir": str(state_dir),
        },
        "master": {
            # Required by the schema; the file exists only on publisher-eligible nodes.
            "identity_key_path": str(config_dir / MASTER_KEY_FILE),
            "onion_address": payload.master_onion,
        },
        "target": {"address": target},
        "tor": {"mode": args.tor_mode},
        "proxy": {"listen_port": args.proxy_port},
        "coordination": {
            "cluster_token_path": str(config_dir / CLUSTER_TOKEN_FILE),
            "listen": listen,
            "peers": peers,
        },
    }
    if args.tor_mode == "managed":
        config["tor"]["data_dir"] = str(state_dir / "tor")
    config_text = validated_config(config, config_dir)
    wg_private, wg_public = generate_wireguard_key()

    ensure_private_dir(config_dir)
    staged = StagedFiles(config_dir)
    try:
        if payload.master_key_seed is not None:
            staged.add(MASTER_KEY_FILE, payload.master_key_seed)
        staged.add(CLUSTER_TOKEN_FILE, payload.cluster_token.encode("ascii") + b"\n")
        staged.add(JOIN_SECRET_FILE, payload.join_secret.encode("ascii") + b"\n")
        staged.add(WIREGUARD_KEY_FILE, wg_private)
        # The tunnel network is the default one; the responder's answer confirms it.
        staged.add(
            CLUSTER_FILE, cluster_sidecar(config_dir, endpoint, DEFAULT_TUNNEL_NETWORK, None)
        )
        staged.add(CONFIG_FILE, config_text)
        staged.commit()
    except BaseException:
        staged.abort()
        raise

    role = "publisher-eligible" if payload.publisher_eligible else "standby (no master key)"
    print(f"Master onion address: {payload.master_onion}")
    print(f"Node: {node_id}, priority {args.priority}, {role}, WireGuard public key {wg_public}")
    print(f"Config written to {config_dir / CONFIG_FILE}")
    print("Start the daemon: it joins the cluster through the master onion.")
    return 0
