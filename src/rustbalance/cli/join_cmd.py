"""``rustbalance join``: set up a further node from a join token.

Decrypts the token (system.md §5, W1, W3, W13), makes this node's own cluster key and WireGuard
key, and joins: it POSTs the join request (signed with the new node key, carrying the token's
master-signed join grant and its secret) to the master onion through a running tor's SOCKS port
(``--tor-socks``, default the system tor's 127.0.0.1:9050) with
:func:`rustbalance.node.join.join_via_onion` (12 tries, 5 s apart: only nodes that hold the
master key admit, and each try reaches a random node). It checks the answer (every statement
against the master key, every tunnel address in the tunnel network) and writes the node key,
the WireGuard key, the master key only when the token carries it, the config
(``wireguard.address`` = the assigned tunnel address, ``coordination.listen`` on it,
``coordination.peers`` = the members' addresses; ``identity_mode = "instance"`` and no
``[join]`` on a node without the master key) and the membership file
(``<state_dir>/cluster_members.json``). ``rustbalance run`` then forms the cluster at once. The join
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
import base64
import ipaddress
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rustbalance.cli.init_cmd import (
    CONFIG_FILE,
    DEFAULT_COORDINATION_PORT,
    EXIT_RUNTIME,
    MASTER_KEY_FILE,
    NODE_KEY_FILE,
    WIREGUARD_KEY_FILE,
    CliError,
    Io,
    StagedFiles,
    add_common_arguments,
    check_endpoint,
    check_identity_mode,
    check_node_id,
    default_node_id,
    ensure_private_dir,
    generate_wireguard_key,
    mesh_sections,
    obtain_passphrase,
    read_secret_file,
    validated_config,
)
from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME
from rustbalance.cluster.identity import NodeKey
from rustbalance.config.identity_mode import IdentityMode
from rustbalance.deploy.join_token import (
    JoinPayload,
    JoinTokenError,
    decode,
    token_needs_passphrase,
)
from rustbalance.node.join import (
    DEFAULT_JOIN_ATTEMPTS,
    JoinAnswer,
    JoinError,
    JoinRequest,
    join_via_onion,
)
from rustbalance.rules import parse_endpoint

__all__ = ["JoinSettings", "join_cluster", "joined_config", "read_token", "register", "run_join"]

SubParsers = Any

# A target must be named somewhere; the token does not carry it and deploy.sh does not pass
# one on --join, so the common local web server is the default (printed, easy to edit).
DEFAULT_JOIN_TARGET = "127.0.0.1:80"
# The system tor deploy.sh sets up (SocksPort 9050).
DEFAULT_TOR_SOCKS = "127.0.0.1:9050"


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
        default=DEFAULT_JOIN_ATTEMPTS,
        help=(
            "tries to reach a node that admits joins through tor, 5 s apart "
            f"(1-60, default {DEFAULT_JOIN_ATTEMPTS})"
        ),
    )
    parser.set_defaults(func=lambda args: run_join(args, Io()))


def read_token(args: argparse.Namespace) -> str:
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


def decode_token(args: argparse.Namespace, token: str, io: Io) -> JoinPayload:
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
    identity_mode: IdentityMode = "instance"


def joined_config(
    settings: JoinSettings, payload: JoinPayload, answer: JoinAnswer
) -> dict[str, Any]:
    """The new node's config (pure): the token's master address, the answer's tunnel address
    and members (as coordination seeds). A node that got the master key is publisher-eligible
    and answers joins itself; one without it is an instance that admits nobody."""
    network = ipaddress.IPv4Network(answer.tunnel_network)
    config_dir = settings.config_dir
    eligible = payload.publisher_eligible
    node: dict[str, Any] = {
        "id": settings.node_id,
        "priority": settings.priority,
        "publisher_eligible": eligible,
        "state_dir": str(settings.state_dir),
        "node_key_path": str(config_dir / NODE_KEY_FILE),
        # A cluster's mode (issue 14), written out; without the master key it is the only
        # one possible: the node's tor hosts its own key as an Onionbalance instance of the
        # master (issue 16: the master key travels only when asked).
        "identity_mode": settings.identity_mode,
    }
    master: dict[str, Any] = {"onion_address": payload.master_onion}
    if eligible:
        master["identity_key_path"] = str(config_dir / MASTER_KEY_FILE)
    config: dict[str, Any] = {
        "node": node,
        "master": master,
        "target": {"address": settings.target},
        "tor": {"mode": settings.tor_mode},
        **(
            {"proxy": {"listen_port": settings.proxy_port}}
            if settings.proxy_port is not None
            else {}
        ),
        "coordination": {
            "listen": f"{answer.tunnel_address}:{settings.coordination_port}",
            "peers": sorted({peer.coordination for peer in answer.peers()}),
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
            admits=eligible,
        )
    )
    return config


def _settings(args: argparse.Namespace, payload: JoinPayload, io: Io) -> JoinSettings:
    identity_mode = check_identity_mode(args.identity_mode)
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
        identity_mode=identity_mode,
    )


def join_cluster(
    payload: JoinPayload,
    node_key: NodeKey,
    *,
    node_id: str,
    priority: int,
    wg_public: str,
    wg_endpoint: str,
    coordination_port: int,
    socks: tuple[str, int],
    attempts: int,
) -> JoinAnswer:
    """The join itself (also ``cluster upgrade``'s, for a node without the master key)."""
    try:
        request = JoinRequest(
            node_id=node_id,
            node_key=node_key.public,
            wg_public_key=base64.b64decode(wg_public),
            wg_endpoint=wg_endpoint,
            coordination_port=coordination_port,
            priority=priority,
            request_time=int(time.time()),
            grant=payload.grant,
            grant_secret=payload.grant_secret,
        )
    except JoinError as exc:
        raise CliError(str(exc)) from None
    print(
        f"Joining {payload.master_onion} through tor at {socks[0]}:{socks[1]} ...", file=sys.stderr
    )
    try:
        return asyncio.run(
            join_via_onion(socks, payload.master_onion, request, node_key, attempts=attempts)
        )
    except JoinError as exc:
        # A failed join is a run-time problem (tor, the network, the cluster): exit 1. JoinError
        # never carries the grant secret.
        raise CliError(str(exc), exit_code=EXIT_RUNTIME) from None


def run_join(args: argparse.Namespace, io: Io) -> int:
    # Decode first: a wrong passphrase or a damaged token must leave no trace on disk.
    payload = decode_token(args, read_token(args), io)
    settings = _settings(args, payload, io)
    socks = parse_endpoint(check_endpoint(args.tor_socks, "--tor-socks"))
    if not 1 <= args.join_attempts <= 60:
        raise CliError("--join-attempts must be 1-60")
    # Refuse before joining, not after: a join admits this node's new WireGuard key, and a
    # second join with another key would be a conflict (409) for the cluster.
    for existing in (
        settings.config_dir / CONFIG_FILE,
        settings.config_dir / WIREGUARD_KEY_FILE,
        settings.config_dir / NODE_KEY_FILE,
        settings.state_dir / MEMBERS_FILE_NAME,
    ):
        if existing.exists() or existing.is_symlink():
            raise CliError(f"{existing} already exists; refusing to overwrite it")
    wg_private, wg_public = generate_wireguard_key()
    node_key = NodeKey.generate()
    answer = join_cluster(
        payload,
        node_key,
        node_id=settings.node_id,
        priority=settings.priority,
        wg_public=wg_public,
        wg_endpoint=settings.endpoint,
        coordination_port=settings.coordination_port,
        socks=(socks.host, socks.port),
        attempts=args.join_attempts,
    )
    config_text = validated_config(joined_config(settings, payload, answer), settings.config_dir)

    ensure_private_dir(settings.config_dir)
    ensure_private_dir(settings.state_dir)
    staged = StagedFiles(settings.config_dir)
    state = StagedFiles(settings.state_dir)
    try:
        if payload.master_key_seed is not None:
            staged.add(MASTER_KEY_FILE, payload.master_key_seed)
        staged.add(NODE_KEY_FILE, node_key.seed_bytes())
        staged.add(WIREGUARD_KEY_FILE, wg_private)
        staged.add(CONFIG_FILE, config_text)
        state.add(MEMBERS_FILE_NAME, answer.membership.to_json().encode("utf-8"))
        state.commit()
        staged.commit()
    except BaseException:
        staged.abort()
        state.abort()
        raise

    role = (
        "publisher-eligible (holds the master key)"
        if payload.publisher_eligible
        else "instance (no master key, never publishes)"
    )
    print(f"Master onion address: {payload.master_onion}")
    print(
        f"Node: {settings.node_id}, priority {settings.priority}, {role}, "
        f"node key {node_key.fingerprint}, WireGuard public key {wg_public}"
    )
    print(
        f"Admitted by {answer.responder_node_id}: tunnel address {answer.tunnel_address}, "
        f"{len(answer.peers())} other members"
    )
    print(f"Config written to {settings.config_dir / CONFIG_FILE}")
    print("Start the daemon (rustbalance run): it forms the cluster with these peers.")
    return 0
