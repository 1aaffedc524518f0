"""``rustbalance cluster ...``: the membership operations of issue 16.

- ``members``: who is admitted, with each node's key fingerprint, whether it holds the master
  key and may publish, its addresses, and (from the running daemon) whether it is live and when
  it was last heard; revoked nodes follow. Without a running daemon it reads the members file.
- ``revoke NODE``: signs a revocation of the node's current key with the master key and hands
  it to the running daemon, which applies it and sends it to every member: the node's
  messages are refused everywhere, its intro points leave the descriptor, its WireGuard peer is
  removed on every node. ``--no-wait`` returns at once; otherwise the command waits (bounded)
  until the daemon shows the node gone.
- ``token``: a new join token (a join grant signed with the master key): single-use by default,
  ``--token-uses N``, ``--token-lifetime-hours``, ``--with-master-key`` for a joiner that may
  publish. The node that answers the join enforces all of it.
- ``rotate-join-secret``: every join token issued before now stops working, on every node
  (a signed join policy, spread like a revocation).
- ``upgrade``: turns a protocol v2 (cluster token) config into a v3 one (docs/security.md).

Signing needs the master key, so ``revoke``, ``token`` and ``rotate-join-secret`` run on a node
that holds it. Statements reach the daemon through its inbox folder (``<state_dir>/
cluster-inbox``, 0700): one file each, written atomically, applied and deleted at the daemon's
next tick; they are master-signed, so a file anyone else put there is refused.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rustbalance.atomic_file import write_file_atomic
from rustbalance.cli.init_cmd import (
    EXIT_RUNTIME,
    CliError,
    Io,
    add_token_arguments,
    check_token_arguments,
    encode_token,
    print_token,
)
from rustbalance.cli.status_cmd import DEFAULT_CONFIG
from rustbalance.cluster.authority import JoinPolicy, Revocation, Statement
from rustbalance.cluster.coordinator import (
    INBOX_DIR_NAME,
    MEMBERS_FILE_NAME,
    load_membership_file,
)
from rustbalance.cluster.identity import fingerprint
from rustbalance.cluster.membership import Membership
from rustbalance.config import Config, load_config
from rustbalance.crypto.keys import IdentityKey, load_identity_key
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.errors import ConfigError, InvalidKeyError
from rustbalance.node.status import StatusError, read_status

__all__ = ["register", "run_members", "run_revoke", "run_rotate", "run_token"]

SubParsers = Any
INBOX_SUFFIX = ".statement"
WAIT_SECS = 15.0
_POLL_SECS = 0.3


def register(commands: SubParsers, debug_commands: SubParsers) -> None:
    """Add ``rustbalance cluster ...`` (``debug_commands`` is not used)."""
    del debug_commands
    parser = commands.add_parser(
        "cluster",
        help="cluster membership: members, revoke, token, rotate-join-secret, upgrade",
        description="Admitted nodes, revocation, join tokens (docs/security.md).",
    )
    sub = parser.add_subparsers(dest="cluster_command", metavar="CLUSTER_COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"config ({DEFAULT_CONFIG})"
        )
        return p

    members = command("members", "list the admitted nodes and the revoked ones")
    members.add_argument("--format", choices=("text", "json"), default="text")
    members.set_defaults(func=run_members)

    revoke = command("revoke", "revoke a node everywhere (needs the master key)")
    revoke.add_argument("node_id", metavar="NODE", help="the node id to revoke")
    revoke.add_argument(
        "--no-wait", action="store_true", help="do not wait for the daemon to apply it"
    )
    revoke.set_defaults(func=run_revoke)

    token = command("token", "issue a join token (needs the master key)")
    add_token_arguments(token)
    token.add_argument(
        "--raw-token",
        action="store_true",
        help="a token without passphrase; it is printed once and not stored",
    )
    token.add_argument(
        "--passphrase-file", metavar="FILE", help="read the passphrase from FILE (else a prompt)"
    )
    token.add_argument("--non-interactive", action="store_true", help="never ask")
    token.set_defaults(func=lambda args: run_token(args, Io()))

    rotate = command(
        "rotate-join-secret", "void every join token issued so far (needs the master key)"
    )
    rotate.set_defaults(func=run_rotate)

    from rustbalance.cli.upgrade_cmd import register_upgrade

    register_upgrade(command("upgrade", "turn a protocol v2 (cluster token) config into v3"))

    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


# --- shared helpers -------------------------------------------------------------------------


def _config(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(f"invalid config {path}: {exc}") from None


def _master_public(config: Config) -> bytes:
    if config.master.onion_address is not None:
        return decode_onion_address(config.master.onion_address)
    return _master_key(config).public_key


def _master_key(config: Config) -> IdentityKey:
    path = config.master.identity_key_path
    if path is None:
        raise CliError(
            "this node holds no master key (master.identity_key_path): run this on a node "
            "that holds it"
        )
    try:
        key = load_identity_key(path)
    except InvalidKeyError as exc:
        raise CliError(f"master key: {exc}") from None
    stated = config.master.onion_address
    if stated is not None and key.onion_address != stated:
        raise CliError(f"master.identity_key_path is not the key of {stated}")
    return key


def _status(config: Config) -> dict[str, Any] | None:
    """The running daemon's status document, None when none answers."""
    try:
        return read_status(config.node.status_socket, timeout=5.0)
    except StatusError:
        return None


def _membership(config: Config) -> Membership:
    path = config.node.state_dir / MEMBERS_FILE_NAME
    membership, problems = load_membership_file(
        path, _master_public(config), int(time.time() * 1000)
    )
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return membership


def _daemon_owner(state_dir: Path) -> tuple[int, int] | None:
    """Run as root for a daemon that runs as its own user (deploy.sh's ``rustbalance``): the
    owner of the state folder, so that the daemon can read and delete what we leave there."""
    if os.geteuid() != 0:
        return None
    try:
        info = state_dir.lstat()
    except OSError:
        return None
    return None if info.st_uid == 0 else (info.st_uid, info.st_gid)


def _deliver(config: Config, statement: Statement, what: str) -> Path:
    """Leave ``statement`` in the daemon's inbox (0600 in a 0700 folder, atomic, owned by the
    daemon's user)."""
    inbox = config.node.state_dir / INBOX_DIR_NAME
    try:
        inbox.mkdir(mode=0o700, parents=True, exist_ok=True)
        if inbox.is_symlink() or not inbox.is_dir():
            raise CliError(f"{inbox} is not a folder", exit_code=EXIT_RUNTIME)
        owner = _daemon_owner(config.node.state_dir)
        if owner is not None:
            os.chown(inbox, *owner, follow_symlinks=False)
        os.chmod(inbox, 0o700)
        name = f"{int(time.time() * 1000)}-{what}-{secrets.token_hex(4)}{INBOX_SUFFIX}"
        target = inbox / name
        # Temp file + rename: the daemon never sees half a statement (nor one it cannot read),
        # and no symlink at the name is followed.
        text = base64.b64encode(statement.data).decode("ascii") + "\n"
        write_file_atomic(target, text, 0o600, owner=owner)
    except OSError as exc:
        raise CliError(
            f"cannot write to {inbox}: {exc.strerror or exc}", exit_code=EXIT_RUNTIME
        ) from None
    return target


def _wait(config: Config, done: Callable[[Mapping[str, Any]], bool], what: str) -> bool:
    """Poll the daemon's status until ``done(doc)`` (bounded by WAIT_SECS)."""
    deadline = time.monotonic() + WAIT_SECS
    while time.monotonic() < deadline:
        doc = _status(config)
        if doc is not None and done(doc):
            return True
        time.sleep(_POLL_SECS)
    print(
        f"warning: the daemon did not show {what} within {WAIT_SECS:g} s (is it running? it "
        "applies the statement when it next starts)",
        file=sys.stderr,
    )
    return False


def _status_members(doc: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    cluster = doc.get("cluster")
    if not isinstance(cluster, Mapping):
        return None
    members = cluster.get("members")
    return [m for m in members if isinstance(m, Mapping)] if isinstance(members, list) else None


# --- members --------------------------------------------------------------------------------


def run_members(args: argparse.Namespace) -> int:
    config = _config(args.config)
    membership = _membership(config)
    doc = _status(config)
    live = _status_members(doc) if doc is not None else None
    rows: list[dict[str, Any]]
    if live is not None:
        rows = [dict(m) for m in live]
        source = "the running daemon"
    else:
        rows = [
            {
                "node_id": r.node_id,
                "self": r.node_id == config.node.id,
                "fingerprint": r.fingerprint,
                "priority": r.priority,
                "publisher_eligible": r.publisher_eligible,
                "holds_master_key": r.holds_master_key,
                "coordination": r.coordination,
                "wireguard_key": r.wireguard.public_key_b64 if r.wireguard else None,
                "wireguard_endpoint": r.wireguard.endpoint if r.wireguard else None,
                "tunnel_address": r.wireguard.tunnel_address if r.wireguard else None,
                "admitted_at_ms": r.issued_at_ms,
                "admitted_by": r.issuer,
                "live": None,
                "last_seen_secs_ago": None,
                "role": None,
            }
            for r in membership.members()
        ]
        source = f"{config.node.state_dir / MEMBERS_FILE_NAME} (no daemon answers)"
    revoked: list[dict[str, Any]] = [
        {
            "node_id": r.node_id,
            "fingerprint": fingerprint(r.node_key),
            "revoked_at_ms": r.revoked_at_ms,
            "revoked_by": r.issuer,
        }
        for r in membership.revocations()
    ]
    policy = membership.policy
    if args.format == "json":
        out = {
            "source": source,
            "members": rows,
            "revoked": revoked,
            "join_tokens_valid_after_ms": policy.grants_not_before_ms if policy else None,
        }
        sys.stdout.write(json.dumps(out, indent=2, sort_keys=True) + "\n")
        return 0
    print(f"Members ({len(rows)}, from {source}):")
    for row in rows:
        flags = []
        if row.get("holds_master_key"):
            flags.append("holds the master key")
        if row.get("publisher_eligible"):
            flags.append("may publish")
        if row.get("self"):
            flags.append("this node")
        seen = row.get("last_seen_secs_ago")
        state = (
            "live"
            if row.get("live")
            else "not heard"
            if row.get("live") is False
            else "status unknown"
        )
        if isinstance(seen, int | float) and not row.get("self"):
            state += f", last heard {seen:g} s ago"
        role = f", {row['role']}" if row.get("role") else ""
        print(f"  {row['node_id']}  {row['fingerprint']}")
        print(
            f"      priority {row['priority']}, {', '.join(flags) or 'no master key'}; "
            f"{state}{role}"
        )
        tunnel = row.get("tunnel_address")
        print(
            f"      coordination {row['coordination']}"
            + (f", tunnel {tunnel}, WireGuard {row.get('wireguard_key')}" if tunnel else "")
        )
    if revoked:
        print(f"Revoked ({len(revoked)}):")
        for entry in revoked:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry["revoked_at_ms"] / 1e3))
            print(
                f"  {entry['node_id']}  {entry['fingerprint']}  at {when} by {entry['revoked_by']}"
            )
    if policy is not None:
        when = time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime(policy.grants_not_before_ms / 1000)
        )
        print(f"Join tokens issued before {when} are void.")
    return 0


# --- revoke ---------------------------------------------------------------------------------


def run_revoke(args: argparse.Namespace) -> int:
    config = _config(args.config)
    node_id = args.node_id
    if node_id == config.node.id:
        raise CliError("a node does not revoke itself: run this on another node")
    key = _master_key(config)
    record = _membership(config).member(node_id)
    if record is None:
        raise CliError(f"{node_id} is not an admitted member here (rustbalance cluster members)")
    revocation = Revocation(node_id, record.node_key, int(time.time() * 1000), config.node.id)
    statement = Statement.sign(revocation, key.sign)
    _deliver(config, statement, "revoke")
    print(f"Revoked {node_id} (key {record.fingerprint}).")
    if args.no_wait:
        return 0

    def gone(doc: Mapping[str, Any]) -> bool:
        members = _status_members(doc)
        return members is not None and all(m.get("node_id") != node_id for m in members)

    if _wait(config, gone, f"{node_id} removed"):
        print(f"The daemon applied it and sent it to every member; {node_id} is out.")
    return 0


# --- token and rotate -----------------------------------------------------------------------


def run_token(args: argparse.Namespace, io: Io) -> int:
    from rustbalance.cli.init_cmd import issue_payload

    check_token_arguments(args)
    config = _config(args.config)
    key = _master_key(config)
    payload = issue_payload(args, key, config.node.id)
    token = encode_token(args, payload, io)
    print(f"Master onion address: {payload.master_onion}")
    print_token(args, payload, token, None)
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    config = _config(args.config)
    key = _master_key(config)
    now_ms = int(time.time() * 1000)
    statement = Statement.sign(JoinPolicy(now_ms, config.node.id), key.sign)
    _deliver(config, statement, "join-policy")
    print("Every join token issued before now is void on every node (as members apply it).")
    print("Issue new ones with: rustbalance cluster token")
    return 0
