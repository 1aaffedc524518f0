"""``rustbalance init``: set up the first node of a cluster.

Creates (or imports) the master key, generates this node's own cluster key (issue 16: per-node
identities; the daemon admits itself with the master key at its first start) and its WireGuard
key, writes them and a config that passes validation into the config folder, and prints the
master address and a join token for further nodes (deploy/README.md; system.md §5, W1, W3, W9,
W13, W16). The join token carries a join grant signed with the master key: single-use by
default (``--token-uses``), valid ``--token-lifetime-hours``, and without the master key unless
``--with-master-key`` is given (the joiner then serves as an instance and never publishes).

Secrets never come from or go to argv: the passphrase is read from ``--passphrase-file`` or a
terminal prompt; generated secrets only go to files. Every file is 0600 in a 0700 folder and is
first written to a temporary name, then renamed once everything is ready, so a failure leaves
nothing half-written. Existing files are never overwritten (keys must not be regenerated).

The config gets ``[wireguard]`` (key file, tunnel address = the first host of the tunnel
network, endpoint; ``enabled`` unless ``--no-wireguard``) and ``[join]`` (enabled, secret file,
tunnel network), so the node answers joins over the master onion as soon as it runs.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import ipaddress
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from rustbalance.atomic_file import StagedFile, stage_file
from rustbalance.cluster.authority import MAX_GRANT_USES
from rustbalance.cluster.identity import NodeKey
from rustbalance.config import parse_config
from rustbalance.config.identity_mode import IdentityMode, cluster_identity_problem
from rustbalance.crypto.keys import SECRET_KEY_HEADER, IdentityKey, load_identity_key
from rustbalance.deploy.join_token import (
    DEFAULT_LIFETIME_SECS,
    MIN_PASSPHRASE_CHARS,
    JoinPayload,
    JoinTokenError,
    encode_raw,
    encode_with_passphrase,
)
from rustbalance.errors import ConfigError, RustBalanceError
from rustbalance.rules import (
    NODE_ID_RULE,
    is_node_id,
    node_id_from,
    parse_endpoint,
    parse_tunnel_network,
)

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_CONFIG_DIR",
    "DEFAULT_COORDINATION_PORT",
    "DEFAULT_TUNNEL_NETWORK",
    "JOIN_TOKEN_FILE",
    "MASTER_KEY_FILE",
    "NODE_KEY_FILE",
    "WIREGUARD_KEY_FILE",
    "CliError",
    "register",
    "run_init",
]

# argparse's _SubParsersAction is private and generic; Any keeps the signature honest.
SubParsers = Any

DEFAULT_CONFIG_DIR = "/etc/rustbalance"
DEFAULT_STATE_DIR = "/var/lib/rustbalance"
DEFAULT_TUNNEL_NETWORK = "10.99.0.0/24"
DEFAULT_COORDINATION_PORT = 51821
CONFIG_FILE = "config.toml"
MASTER_KEY_FILE = "master.key"
NODE_KEY_FILE = "node.key"
WIREGUARD_KEY_FILE = "wireguard.key"
JOIN_TOKEN_FILE = "join-token.txt"  # noqa: S105 (a file name)
_MAX_SECRET_FILE = 64 * 1024


EXIT_RUNTIME = 1
EXIT_CONFIG = 2


class CliError(RustBalanceError):
    """A problem main() prints as one line. ``exit_code`` 2 (the default): a usage or input
    problem (a flag, a passphrase, a token, a file in the way); 1: it failed at run time (a
    file could not be written, the join did not get through). cli/main.py has the rule."""

    def __init__(self, message: str, *, exit_code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- shared helpers (also used by join_cmd) -------------------------------------------------


def generate_wireguard_key() -> tuple[bytes, str]:
    """(private key file content, public key) in `wg`'s base64 format."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(raw) + b"\n", base64.b64encode(public).decode("ascii")


def default_node_id() -> str:
    """The host name, reduced to the node-id alphabet (a stable, readable default)."""
    return node_id_from(socket.gethostname()) or "node-1"


def check_node_id(node_id: str) -> str:
    if not is_node_id(node_id):
        raise CliError(f"--node-id must be {NODE_ID_RULE}")
    return node_id


def check_endpoint(text: str, flag: str, *, allow_onion: bool = False) -> str:
    try:
        return str(parse_endpoint(text, allow_onion=allow_onion))
    except ConfigError as exc:
        raise CliError(f"{flag}: {exc}") from None


def read_secret_file(path: str, what: str) -> str:
    """Read a passphrase/token file (or ``-`` = stdin); strips the final line break only."""
    try:
        if path == "-":
            data = sys.stdin.read(_MAX_SECRET_FILE + 1)
        else:
            with open(path, encoding="utf-8") as handle:
                data = handle.read(_MAX_SECRET_FILE + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the {what} from {path}: {type(exc).__name__}") from None
    if len(data) > _MAX_SECRET_FILE:
        raise CliError(f"the {what} file is far too large")
    if data.endswith("\r\n"):
        data = data[:-2]
    elif data.endswith("\n"):
        data = data[:-1]
    if not data:
        raise CliError(f"the {what} file is empty")
    return data


def terminal_available() -> bool:
    """Whether a prompt can go to the controlling terminal (getpass uses /dev/tty)."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass
class Io:
    """Terminal access, injectable for tests."""

    stdin_is_tty: Callable[[], bool] = field(default=lambda: sys.stdin.isatty())
    ask: Callable[[str], str] = field(default=input)
    has_terminal: Callable[[], bool] = field(default=terminal_available)
    ask_secret: Callable[[str], str] = field(default=getpass.getpass)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (0700) or tighten an existing one to 0700."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise CliError(
            f"cannot create {path}: {exc.strerror or exc}", exit_code=EXIT_RUNTIME
        ) from None


class StagedFiles:
    """Files written under temporary names (0600 from the first byte), put in place on commit.

    Nothing is visible under its final name until every file is written, no existing file is
    ever replaced, and :meth:`abort` removes the temporaries, so a failure leaves the folder
    as it was.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._staged: list[StagedFile] = []

    def add(self, name: str, content: bytes) -> Path:
        final = self.directory / name
        if final.exists() or final.is_symlink():
            raise CliError(f"{final} already exists; refusing to overwrite it")
        try:
            self._staged.append(stage_file(final, content, mode=0o600))
        except OSError as exc:
            raise CliError(
                f"cannot write {final}: {exc.strerror or exc}", exit_code=EXIT_RUNTIME
            ) from None
        return final

    def commit(self) -> None:
        for staged in self._staged:
            if staged.path.exists() or staged.path.is_symlink():
                raise CliError(f"{staged.path} appeared meanwhile; refusing to overwrite it")
        while self._staged:
            staged = self._staged.pop(0)
            try:
                staged.commit(overwrite=False)
            except FileExistsError:
                raise CliError(
                    f"{staged.path} appeared meanwhile; refusing to overwrite it"
                ) from None
            except OSError as exc:
                raise CliError(f"cannot write {staged.path}: {exc.strerror or exc}") from None

    def abort(self) -> None:
        for staged in self._staged:
            staged.discard()
        self._staged.clear()


def validated_config(config: dict[str, Any], config_dir: Path) -> bytes:
    """TOML text of ``config``, checked with the daemon's own parser before it is written."""
    text = tomli_w.dumps(config)
    try:
        parse_config(text, config_dir)
    except ConfigError as exc:
        # A bug or a bad flag value; the config holds no secrets, so the message may name keys.
        raise CliError(f"the generated config does not validate: {exc}") from None
    return text.encode("utf-8")


def mesh_sections(
    config_dir: Path,
    *,
    endpoint: str,
    tunnel_network: ipaddress.IPv4Network,
    tunnel_address: str,
    wireguard: bool,
    admits: bool,
) -> dict[str, dict[str, Any]]:
    """The ``[wireguard]`` and ``[join]`` tables of a node's config (docs/config.md)."""
    return {
        "wireguard": {
            "enabled": wireguard,
            "private_key_path": str(config_dir / WIREGUARD_KEY_FILE),
            "address": f"{tunnel_address}/{tunnel_network.prefixlen}",
            "listen_port": parse_endpoint(endpoint).port,
            "endpoint": endpoint,
        },
        "join": {
            # Admitting a node means signing its record with the master key.
            "enabled": admits,
            "tunnel_network": str(tunnel_network),
        },
    }


def add_common_arguments(parser: argparse.ArgumentParser, *, default_priority: int) -> None:
    parser.add_argument(
        "-c",
        "--config-dir",
        default=DEFAULT_CONFIG_DIR,
        help=f"folder for the config and secret files (default {DEFAULT_CONFIG_DIR}, made 0700)",
    )
    parser.add_argument(
        "--endpoint",
        help="public HOST:PORT of this node's WireGuard, as other nodes reach it (required)",
    )
    parser.add_argument("--node-id", help="this node's name (default: the host name)")
    parser.add_argument(
        "--priority",
        type=int,
        default=default_priority,
        help=f"publisher election priority, lowest wins (default {default_priority})",
    )
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="read the join-token passphrase from FILE (else a terminal prompt)",
    )
    parser.add_argument(
        "--tor-mode",
        choices=("system", "managed"),
        default="system",
        help="attach to the system tor (default, as deploy.sh sets it up) or run our own",
    )
    parser.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help=f"daemon state (default {DEFAULT_STATE_DIR})"
    )
    parser.add_argument(
        "--proxy-port",
        type=int,
        default=None,
        help="a local TCP port for the reverse proxy (default: none, it listens on a unix "
        "socket, proxy.listen_unix)",
    )
    parser.add_argument(
        "--no-wireguard",
        action="store_true",
        help="do not let the daemon manage a WireGuard interface (a tunnel managed elsewhere)",
    )
    parser.add_argument(
        "--non-interactive",
        action="store_true",
        help="never ask; a missing required value is an error",
    )
    parser.add_argument(
        "--identity-mode",
        choices=("instance", "shared"),
        default="instance",
        help="instance (default): this node's tor hosts its own key; shared (the master key "
        "in every node's tor) is refused in a cluster (docs/config.md)",
    )


def check_identity_mode(mode: IdentityMode) -> IdentityMode:
    """``--identity-mode`` of a node that answers joins, i.e. of a cluster (issue 14)."""
    problem = cluster_identity_problem(mode, clustered=True)
    if problem is not None:
        raise CliError(f"--identity-mode {mode}: {problem}")
    return mode


# --- init -----------------------------------------------------------------------------------


def register(commands: SubParsers, debug_commands: SubParsers) -> None:
    """Add ``rustbalance init`` (``debug_commands`` is not used)."""
    del debug_commands
    parser = commands.add_parser(
        "init",
        help="set up the first node: master key, cluster secrets, config, join token",
        description=(
            "Create (or import) the master key and the cluster secrets, write them and a valid "
            "config into the config folder, and print the master address and a join token. "
            "Secrets are never taken from the command line."
        ),
    )
    add_common_arguments(parser, default_priority=10)
    parser.add_argument("--target", help="HOST:PORT of the service to balance (required)")
    parser.add_argument(
        "--import-key",
        metavar="FILE",
        help="use this master key (tor's hs_ed25519_secret_key, a 32-byte seed, or PEM)",
    )
    parser.add_argument(
        "--coordination-listen",
        help="HOST:PORT for coordination (default: first tunnel address, port 51821)",
    )
    parser.add_argument(
        "--tunnel-network",
        default=DEFAULT_TUNNEL_NETWORK,
        help=f"WireGuard tunnel network (default {DEFAULT_TUNNEL_NETWORK})",
    )
    parser.add_argument(
        "--raw-token",
        action="store_true",
        help="issue a token without passphrase; it is printed once and not stored",
    )
    add_token_arguments(parser)
    parser.set_defaults(func=lambda args: run_init(args, Io()))


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    """The join token's options (``init`` and ``cluster token``)."""
    parser.add_argument(
        "--with-master-key",
        action="store_true",
        help=(
            "the token carries the master key: the joiner may publish (default: it does not, "
            "and serves as an instance)"
        ),
    )
    parser.add_argument(
        "--token-uses",
        type=int,
        default=1,
        help=f"how many nodes may join with the token (1-{MAX_GRANT_USES}, default 1)",
    )
    parser.add_argument(
        "--token-lifetime-hours",
        type=int,
        default=DEFAULT_LIFETIME_SECS // 3600,
        help="hours the join token stays valid (1-720, default 24)",
    )


def _value(args: argparse.Namespace, name: str, question: str, io: Io, interactive: bool) -> str:
    value: str | None = getattr(args, name)
    if value:
        return value
    if interactive:
        answer = io.ask(f"{question}: ").strip()
        if answer:
            return answer
    raise CliError(f"--{name.replace('_', '-')} is required")


def obtain_passphrase(args: argparse.Namespace, io: Io, *, confirm: bool) -> str:
    """From --passphrase-file, else a terminal prompt (never with --non-interactive)."""
    if args.passphrase_file:
        return read_secret_file(args.passphrase_file, "passphrase")
    if args.non_interactive or not io.has_terminal():
        raise CliError("no passphrase: use --passphrase-file FILE (or run on a terminal)")
    passphrase = io.ask_secret("Join token passphrase: ")
    if confirm:
        if len(passphrase) < MIN_PASSPHRASE_CHARS:
            raise CliError(f"the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters")
        if not secrets.compare_digest(
            passphrase.encode("utf-8", "surrogatepass"),
            io.ask_secret("Repeat the passphrase: ").encode("utf-8", "surrogatepass"),
        ):
            raise CliError("the passphrases differ")
    return passphrase


def _master_key_bytes(key: IdentityKey) -> bytes:
    # A seed when we have one (the smallest form); a key imported from tor has only the
    # expanded form, which load_identity_key reads back in tor's own file format.
    if key.seed is not None:
        return key.seed
    return SECRET_KEY_HEADER + key.expanded


def run_init(args: argparse.Namespace, io: Io) -> int:
    identity_mode = check_identity_mode(args.identity_mode)
    interactive = not args.non_interactive and io.stdin_is_tty()
    config_dir = Path(args.config_dir).absolute()
    node_id = check_node_id(args.node_id or default_node_id())
    endpoint = check_endpoint(
        _value(args, "endpoint", "Public WireGuard endpoint (IP:PORT)", io, interactive),
        "--endpoint",
    )
    target = check_endpoint(
        _value(args, "target", "Service to balance (HOST:PORT)", io, interactive),
        "--target",
        allow_onion=True,
    )
    try:
        network = parse_tunnel_network(args.tunnel_network)
    except ConfigError as exc:
        raise CliError(f"--tunnel-network {exc}") from None
    tunnel_address = str(next(network.hosts()))
    listen = args.coordination_listen or f"{tunnel_address}:{DEFAULT_COORDINATION_PORT}"
    listen = check_endpoint(listen, "--coordination-listen")
    check_token_arguments(args)

    if args.import_key:
        key = load_identity_key(args.import_key)
    else:
        key = IdentityKey.generate(os.urandom)
    node_key = NodeKey.generate()
    wg_private, wg_public = generate_wireguard_key()
    master_onion = key.onion_address
    payload = issue_payload(args, key, node_id)
    token = encode_token(args, payload, io)

    state_dir = Path(args.state_dir).absolute()
    config: dict[str, Any] = {
        "node": {
            "id": node_id,
            "priority": args.priority,
            "publisher_eligible": True,
            "state_dir": str(state_dir),
            "identity_mode": identity_mode,
            "node_key_path": str(config_dir / NODE_KEY_FILE),
        },
        "master": {
            "identity_key_path": str(config_dir / MASTER_KEY_FILE),
            "onion_address": master_onion,
        },
        "target": {"address": target},
        "tor": {"mode": args.tor_mode},
        # No port: the proxy's unix socket (proxy.listen_unix), nothing to collide with.
        **({"proxy": {"listen_port": args.proxy_port}} if args.proxy_port is not None else {}),
        "coordination": {"listen": listen},
    }
    if args.tor_mode == "managed":
        config["tor"]["data_dir"] = str(state_dir / "tor")
    config.update(
        mesh_sections(
            config_dir,
            endpoint=endpoint,
            tunnel_network=network,
            tunnel_address=tunnel_address,
            wireguard=not args.no_wireguard,
            admits=True,
        )
    )
    config_text = validated_config(config, config_dir)

    ensure_private_dir(config_dir)
    staged = StagedFiles(config_dir)
    try:
        staged.add(MASTER_KEY_FILE, _master_key_bytes(key))
        staged.add(NODE_KEY_FILE, node_key.seed_bytes())
        staged.add(WIREGUARD_KEY_FILE, wg_private)
        if not args.raw_token:
            # Useless without the passphrase, so it may sit on disk (deploy.sh prints its path).
            staged.add(JOIN_TOKEN_FILE, token.encode("ascii") + b"\n")
        staged.add(CONFIG_FILE, config_text)
        staged.commit()
    except BaseException:
        staged.abort()
        raise

    print(f"Master onion address: {master_onion}")
    print(
        f"Node: {node_id}, priority {args.priority}, node key {node_key.fingerprint}, "
        f"WireGuard public key {wg_public}"
    )
    print(f"Config written to {config_dir / CONFIG_FILE}")
    print_token(args, payload, token, config_dir / JOIN_TOKEN_FILE)
    return 0


def check_token_arguments(args: argparse.Namespace) -> None:
    if not 1 <= args.token_lifetime_hours <= 720:
        raise CliError("--token-lifetime-hours must be 1-720")
    if not 1 <= args.token_uses <= MAX_GRANT_USES:
        raise CliError(f"--token-uses must be 1-{MAX_GRANT_USES}")


def issue_payload(args: argparse.Namespace, key: IdentityKey, node_id: str) -> JoinPayload:
    """A new join grant, signed with the master key, in a token payload."""
    try:
        return JoinPayload.issue(
            master_key=key,
            issuer_node_id=node_id,
            now=int(time.time()),
            randbytes=os.urandom,
            lifetime_secs=args.token_lifetime_hours * 3600,
            max_uses=args.token_uses,
            with_master_key=args.with_master_key,
        )
    except JoinTokenError as exc:
        raise CliError(str(exc)) from None


def encode_token(args: argparse.Namespace, payload: JoinPayload, io: Io) -> str:
    if args.raw_token:
        return encode_raw(payload, os.urandom)
    return encode_with_passphrase(payload, obtain_passphrase(args, io, confirm=True), os.urandom)


def print_token(
    args: argparse.Namespace, payload: JoinPayload, token: str, saved: Path | None
) -> None:
    role = (
        "publisher-eligible joiners: it carries the master key"
        if payload.publisher_eligible
        else "joiners without the master key"
    )
    uses = "1 join" if args.token_uses == 1 else f"{args.token_uses} joins"
    print(f"Join token ({role}; {uses}, valid {args.token_lifetime_hours} h):")
    print(token)
    if args.raw_token:
        print(
            "This raw token is the secret itself and is shown only this once: pass it to "
            "'rustbalance join --token-file -' on stdin, never on a command line.",
            file=sys.stderr,
        )
    elif saved is not None:
        print(f"(also in {saved}; joiners need the passphrase)")
