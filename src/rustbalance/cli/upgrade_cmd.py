"""``rustbalance cluster upgrade``: a protocol v2 (cluster token) node to v3 (per-node identities).

What changes in the config (the old one is kept next to it as ``<config>.v2``, 0600):

- ``coordination.cluster_token_path``, ``join.secret_path`` and ``wireguard.peers_path`` go
  (the cluster token and join secret files are no longer read; delete them once every node is
  upgraded);
- a node that holds the master key keeps everything else: at its next start the daemon makes
  its node key and signs its own admission record (the master address never changes: it is the
  master key's);
- a node without the master key (its ``master.identity_key_path`` names no file) becomes an
  instance (``identity_mode = "instance"``, ``publisher_eligible = false``, no ``[join]``)
  and must be admitted by a node that holds the key: ``--token-file`` (a token from
  ``rustbalance cluster token`` on an upgraded key holder) joins again over the master onion
  with this node's id, WireGuard key and endpoint; the answer's tunnel address, members and
  membership file replace the old ones.

Nothing is written when anything fails (the join happens before the files are replaced).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import tomllib
from pathlib import Path
from typing import Any

from rustbalance.atomic_file import write_file_atomic
from rustbalance.cli.init_cmd import (
    CliError,
    Io,
    StagedFiles,
    ensure_private_dir,
    validated_config,
)
from rustbalance.cli.join_cmd import DEFAULT_TOR_SOCKS, decode_token, join_cluster, read_token
from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME
from rustbalance.cluster.identity import load_or_create_node_key
from rustbalance.cluster.wireguard import WireGuardError, load_or_create_private_key, public_key_of
from rustbalance.config import parse_endpoint
from rustbalance.errors import InvalidKeyError
from rustbalance.node.join import DEFAULT_JOIN_ATTEMPTS

__all__ = ["V2_KEYS", "register_upgrade", "run_upgrade", "upgraded_config"]

# (section, key) of protocol v2 that v3 no longer has.
V2_KEYS = (
    ("coordination", "cluster_token_path"),
    ("join", "secret_path"),
    ("wireguard", "peers_path"),
)


def register_upgrade(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file",
        metavar="FILE|-",
        help="a node without the master key: a join token to be admitted with (stdin: -)",
    )
    parser.add_argument("token", nargs="?", metavar="TOKEN", help=argparse.SUPPRESS)
    parser.add_argument("--passphrase-file", metavar="FILE", help="the token's passphrase")
    parser.add_argument(
        "--tor-socks", default=DEFAULT_TOR_SOCKS, help=f"tor's SOCKS port ({DEFAULT_TOR_SOCKS})"
    )
    parser.add_argument("--join-attempts", type=int, default=DEFAULT_JOIN_ATTEMPTS)
    parser.add_argument("--non-interactive", action="store_true", help="never ask")
    parser.set_defaults(func=lambda args: run_upgrade(args, Io()))


def _resolve(base: Path, value: object) -> Path | None:
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else base / path


def upgraded_config(doc: dict[str, Any], base: Path) -> tuple[dict[str, Any], bool, list[str]]:
    """The v3 config of a v2 one (pure but for checking whether the master key file exists):
    (config, holds the master key, the v2 keys removed)."""
    new: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    removed = []
    for section, key in V2_KEYS:
        table = new.get(section)
        if isinstance(table, dict) and key in table:
            del table[key]
            removed.append(f"{section}.{key}")
    node = new.setdefault("node", {})
    master = new.setdefault("master", {})
    key_path = _resolve(base, master.get("identity_key_path"))
    holds_key = key_path is not None and key_path.is_file()
    if not holds_key:
        if not isinstance(master.get("onion_address"), str):
            raise CliError(
                "this node has no master key file and its config names no master.onion_address"
            )
        master.pop("identity_key_path", None)
        node["identity_mode"] = "instance"
        node["publisher_eligible"] = False
        join = new.get("join")
        if isinstance(join, dict):
            join["enabled"] = False
    return new, holds_key, removed


def run_upgrade(args: argparse.Namespace, io: Io) -> int:
    path = Path(args.config).absolute()
    try:
        old_text = path.read_text(encoding="utf-8")
        doc = tomllib.loads(old_text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    if not any(isinstance(doc.get(s), dict) and k in doc[s] for s, k in V2_KEYS):
        print(f"{path}: already a protocol v3 config; nothing to do")
        return 0
    base = path.parent
    new, holds_key, removed = upgraded_config(doc, base)
    backup = path.with_name(path.name + ".v2")
    if backup.exists() or backup.is_symlink():
        raise CliError(f"{backup} already exists; refusing to overwrite it")
    node = new["node"]
    state_dir = _resolve(base, node.get("state_dir")) or Path("/var/lib/rustbalance")
    key_path = _resolve(base, node.get("node_key_path")) or state_dir / "keys" / "node.key"
    members_text: str | None = None
    if not holds_key:
        if args.token_file is None and args.token is None:
            raise CliError(
                "this node holds no master key, so a node that holds it must admit it: run "
                "'rustbalance cluster token' there and pass the token here with --token-file"
            )
        payload = decode_token(args, read_token(args), io)
        if payload.master_onion != str(new["master"]["onion_address"]).lower():
            raise CliError("the token is for another master address")
        try:
            node_key, _ = load_or_create_node_key(key_path)
        except InvalidKeyError as exc:
            raise CliError(f"node key: {exc}") from None
        wg = new.get("wireguard") or {}
        wg_key_path = _resolve(base, wg.get("private_key_path"))
        endpoint = wg.get("endpoint")
        if wg_key_path is None or not isinstance(endpoint, str):
            raise CliError("wireguard.private_key_path and wireguard.endpoint are needed to join")
        try:
            wg_public = public_key_of(load_or_create_private_key(wg_key_path))
        except (WireGuardError, OSError) as exc:
            raise CliError(f"wireguard.private_key_path: {exc}") from None
        listen = parse_endpoint(str(new.get("coordination", {}).get("listen", "127.0.0.1:51821")))
        socks = parse_endpoint(args.tor_socks)
        answer = join_cluster(
            payload,
            node_key,
            node_id=str(node["id"]),
            priority=int(node.get("priority", 10)),
            wg_public=wg_public,
            wg_endpoint=str(parse_endpoint(endpoint)),
            coordination_port=listen.port,
            socks=(socks.host, socks.port),
            attempts=args.join_attempts,
        )
        network = ipaddress.IPv4Network(answer.tunnel_network)
        coordination = new.setdefault("coordination", {})
        coordination["listen"] = f"{answer.tunnel_address}:{listen.port}"
        coordination["peers"] = sorted({p.coordination for p in answer.peers()})
        coordination.pop("advertise", None)
        wg["address"] = f"{answer.tunnel_address}/{network.prefixlen}"
        new["wireguard"] = wg
        members_text = answer.membership.to_json()
    else:
        try:
            node_key, _ = load_or_create_node_key(key_path)
        except InvalidKeyError as exc:
            raise CliError(f"node key: {exc}") from None
    text = validated_config(new, base).decode("utf-8")
    if members_text is not None:
        ensure_private_dir(state_dir)
        members = state_dir / MEMBERS_FILE_NAME
        write_file_atomic(members, members_text, 0o600)
    staged = StagedFiles(base)
    try:
        staged.add(backup.name, old_text.encode("utf-8"))
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    write_file_atomic(path, text, 0o600)
    print(f"Upgraded {path} to protocol v3 (the old config is in {backup}).")
    if removed:
        print(f"Removed: {', '.join(removed)} (delete the cluster token and join secret files).")
    print(f"Node key: {node_key.fingerprint} ({key_path})")
    if holds_key:
        print("This node holds the master key: it admits itself when it starts.")
    else:
        print("Admitted as an instance (no master key); restart the daemon.")
    print(
        "Upgrade every node: v2 and v3 nodes do not talk to each other (docs/security.md).",
        file=sys.stderr,
    )
    return 0
