"""``rustbalance join``: set up a further node from a join token.

Decrypts the token (system.md §5, W1, W3, W13) and writes this node's config, the cluster
token, the join secret, a fresh WireGuard key and, only when the token carries it (a
publisher-eligible joiner), the master key; then it joins: it POSTs the join request to the
master onion through a running tor's SOCKS port (``--tor-socks``, default the system tor's
127.0.0.1:9050) with :func:`rustbalance.node.join.join_via_onion` (5 tries, 15 s apart), and
writes the answer into the config (``wireguard.address`` = the assigned tunnel address,
``coordination.listen`` on it, ``coordination.peers`` = the cluster's nodes) and the mesh peers
file (``wireguard.peers_path``). ``rustbalance run`` then forms the cluster at once. The join
happens here and not at the daemon's first start because its answer *is* the configuration
(the tunnel address the interface and the coordination socket bind to): an operator sees a
failed join as this command's error, with nothing half-configured on disk.

Where the token may come from:

- ``--token-file FILE`` or ``--token-file -`` (stdin): any token;
- a positional ``TOKEN``: only a passphrase-protected one. It is useless without the passphrase,
  while a raw token *is* the secret, and argv is readable by every user in ``/proc`` and lands
  in shell history.

A wrong passphrase or a damaged token is a one-line error with exit 2 (an input problem), a
failed join one with exit 1 (run time: tor, the network, the cluster), and nothing is written:
the token is decoded and the join answered before anything touches the disk, and the files are
written under temporary names and renamed only at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rustbalance.cli.init_cmd import (
    CLUSTER_TOKEN_FILE,
    CONFIG_FILE,
    DEFAULT_COORDINATION_PORT,
    EXIT_RUNTIME,
    JOIN_SECRET_FILE,
    MASTER_KEY_FILE,
    WIREGUARD_KEY_FILE,
    CliError,
    Io,
    StagedFiles,
    add_common_arguments,
    check_endpoint,
    check_node_id,
    default_node_id,
    ensure_private_dir,
    generate_wireguard_key,
    mesh_sections,
    obtain_passphrase,
    read_secret_file,
    validated_config,
)
from rustbalance.deploy.join_token import (
    JoinPayload,
    JoinTokenError,
    decode,
    token_needs_passphrase,
)
from rustbalance.node.join import JoinAnswer, JoinError, JoinRequest, join_via_onion
from rustbalance.node.mesh import mesh_peers_json
from rustbalance.rules import parse_endpoint

__all__ = ["JoinSettings", "joined_config", "register", "run_join"]

SubParsers = Any

# A target must be named somewhere; the token does not carry it and deploy.sh does not pass
# one on --join, so the common local web server is the default (printed, easy to edit).
DEFAULT_JOIN_TARGET = "127.0.0.1:80"
# The system tor deploy.sh sets up (SocksPort 9050).
DEFAULT_TOR_SOCKS = "127.0.0.1:9050"
MESH_PEERS_FILE = "wireguard_peers.json"


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
        "--coordination-port",
        type=int,
        default=DEFAULT_COORDINATION_PORT,
        help=(
            f"UDP port for coordination on the assigned tunnel address "
            f"(default {DEFAULT_COORDINATION_PORT})"
        ),
    )
    parser.add_argument(
        "--tor-socks",
        default=DEFAULT_TOR_SOCKS,
        help=f"HOST:PORT of a running tor's SOCKS port to join through ({DEFAULT_TOR_SOCKS})",
    )
    parser.add_argument(
        "--join-attempts",
        type=int,
        default=5,
        help="tries to reach the cluster through tor, 15 s apart (1-20, default 5)",
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
    try:
        passphrase = (
            obtain_passphrase(args, io, confirm=False) if token_needs_passphrase(token) else None
        )
        return decode(token, passphrase, now=int(time.time()))
    except JoinTokenError as exc:
        # A wrong passphrase or a damaged token: input the operator must fix (exit 2).
        raise CliError(str(exc)) from None


@dataclass(frozen=True)
class JoinSettings:
    """What the operator chose for the new node (flags), apart from the token."""

    config_dir: Path
    state_dir: Path
    node_id: str
    priority: int
    endpoint: str
    target: str
    tor_mode: str
    proxy_port: int | None  # None: the proxy's unix socket (proxy.listen_unix)
    coordination_port: int
    wireguard: bool


def joined_config(
    settings: JoinSettings, payload: JoinPayload, answer: JoinAnswer
) -> dict[str, Any]:
    """The new node's config (pure): the token's cluster plus the join answer's tunnel address
    and peers. It answers joins itself (same join secret), so any node can admit the next."""
    network = ipaddress.IPv4Network(answer.tunnel_network)
    config_dir = settings.config_dir
    config: dict[str, Any] = {
        "node": {
            "id": settings.node_id,
            "priority": settings.priority,
            "publisher_eligible": payload.publisher_eligible,
            "state_dir": str(settings.state_dir),
        },
        "master": {
            # Required by the schema; the file exists only on publisher-eligible nodes.
            "identity_key_path": str(config_dir / MASTER_KEY_FILE),
            "onion_address": payload.master_onion,
        },
        "target": {"address": settings.target},
        "tor": {"mode": settings.tor_mode},
        **(
            {"proxy": {"listen_port": settings.proxy_port}}
            if settings.proxy_port is not None
            else {}
        ),
        "coordination": {
            "cluster_token_path": str(config_dir / CLUSTER_TOKEN_FILE),
            "listen": f"{answer.tunnel_address}:{settings.coordination_port}",
            "peers": sorted({peer.coordination for peer in answer.peers}),
        },
    }
    if settings.tor_mode == "managed":
        config["tor"]["data_dir"] = str(settings.state_dir / "tor")
    config.update(
        mesh_sections(
            config_dir,
            endpoint=settings.endpoint,
            tunnel_network=network,
            tunnel_address=answer.tunnel_address,
            wireguard=settings.wireguard,
        )
    )
    config["wireguard"]["peers_path"] = str(settings.state_dir / MESH_PEERS_FILE)
    return config


def _settings(args: argparse.Namespace, payload: JoinPayload, io: Io) -> JoinSettings:
    interactive = not args.non_interactive and io.stdin_is_tty()
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
    if not 1 <= args.coordination_port <= 65535:
        raise CliError("--coordination-port must be 1-65535")
    if args.proxy_port is not None and not 1 <= args.proxy_port <= 65535:
        raise CliError("--proxy-port must be 1-65535")
    return JoinSettings(
        config_dir=Path(args.config_dir).absolute(),
        state_dir=Path(args.state_dir).absolute(),
        node_id=node_id,
        priority=args.priority,
        endpoint=endpoint,
        target=target,
        tor_mode=args.tor_mode,
        proxy_port=args.proxy_port,
        coordination_port=args.coordination_port,
        wireguard=not args.no_wireguard,
    )


def run_join(args: argparse.Namespace, io: Io) -> int:
    # Decode first: a wrong passphrase or a damaged token must leave no trace on disk.
    payload = _decode(args, _read_token(args), io)
    settings = _settings(args, payload, io)
    socks = parse_endpoint(check_endpoint(args.tor_socks, "--tor-socks"))
    if not 1 <= args.join_attempts <= 20:
        raise CliError("--join-attempts must be 1-20")
    # Refuse before joining, not after: a join admits this node's new WireGuard key, and a
    # second join with another key would be a conflict (409) for the cluster.
    for existing in (
        settings.config_dir / CONFIG_FILE,
        settings.config_dir / WIREGUARD_KEY_FILE,
        settings.state_dir / MESH_PEERS_FILE,
    ):
        if existing.exists() or existing.is_symlink():
            raise CliError(f"{existing} already exists; refusing to overwrite it")
    wg_private, wg_public = generate_wireguard_key()
    request = JoinRequest(
        node_id=settings.node_id,
        cluster_token=payload.cluster_token,
        wg_public_key=wg_public,
        wg_endpoint=settings.endpoint,
        coordination_port=settings.coordination_port,
        request_time=int(time.time()),
    )
    print(f"Joining {payload.master_onion} through tor at {socks} ...", file=sys.stderr)
    try:
        answer = asyncio.run(
            join_via_onion(
                (socks.host, socks.port),
                payload.master_onion,
                payload.join_secret,
                request,
                attempts=args.join_attempts,
            )
        )
    except JoinError as exc:
        # JoinError never carries the join secret or the cluster token.
        raise CliError(str(exc), exit_code=EXIT_RUNTIME) from None
    config_text = validated_config(joined_config(settings, payload, answer), settings.config_dir)

    ensure_private_dir(settings.config_dir)
    ensure_private_dir(settings.state_dir)
    staged = StagedFiles(settings.config_dir)
    state = StagedFiles(settings.state_dir)
    try:
        if payload.master_key_seed is not None:
            staged.add(MASTER_KEY_FILE, payload.master_key_seed)
        staged.add(CLUSTER_TOKEN_FILE, payload.cluster_token.encode("ascii") + b"\n")
        staged.add(JOIN_SECRET_FILE, payload.join_secret.encode("ascii") + b"\n")
        staged.add(WIREGUARD_KEY_FILE, wg_private)
        staged.add(CONFIG_FILE, config_text)
        state.add(MESH_PEERS_FILE, mesh_peers_json(answer.peers).encode("utf-8"))
        state.commit()
        staged.commit()
    except BaseException:
        staged.abort()
        state.abort()
        raise

    role = "publisher-eligible" if payload.publisher_eligible else "standby (no master key)"
    print(f"Master onion address: {payload.master_onion}")
    print(
        f"Node: {settings.node_id}, priority {settings.priority}, {role}, "
        f"WireGuard public key {wg_public}"
    )
    print(
        f"Joined through {answer.responder_node_id}: tunnel address {answer.tunnel_address}, "
        f"{len(answer.peers)} peers"
    )
    print(f"Config written to {settings.config_dir / CONFIG_FILE}")
    print("Start the daemon (rustbalance run): it forms the cluster with these peers.")
    return 0
