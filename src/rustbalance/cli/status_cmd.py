"""``rustbalance status``: show the running daemon's live state (system.md W16).

Reads ``node.status_socket`` from the config (default ``<node.state_dir>/status.sock``,
``/var/lib/rustbalance/status.sock``) and prints what the daemon's status endpoint answers.
Only those two keys are read, so the command works even for an operator who cannot read the
key files the full config names. Exit 1 with a one-line reason if the daemon is not reachable,
2 if the config cannot be read or names no usable socket (cli/main.py: 2 = configuration).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rustbalance.cli.logging_setup import write_error
from rustbalance.node.status import DEFAULT_STATUS_SOCKET, StatusError, read_status

__all__ = ["format_status_text", "register", "status", "status_socket_from_config"]

DEFAULT_CONFIG = "/etc/rustbalance/config.toml"
SubParsers = Any  # argparse's _SubParsersAction is private and generic
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


class StatusConfigError(StatusError):
    """The config does not say where the status socket is (exit 2, not 1)."""


def register(commands: SubParsers, debug_commands: SubParsers) -> None:
    """Add the ``status`` command (``debug_commands`` is not used)."""
    del debug_commands
    parser = commands.add_parser(
        "status",
        help="show the running daemon's state",
        description="Ask the running daemon, over its local status socket, for its live state.",
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"config file ({DEFAULT_CONFIG})"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECS", help=argparse.SUPPRESS
    )
    parser.set_defaults(func=status)


def status_socket_from_config(config_file: str | Path) -> Path:
    """``node.status_socket`` (relative paths resolved against the config's folder)."""
    file = Path(config_file)
    try:
        data = tomllib.loads(file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise StatusConfigError(f"cannot read config {file}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StatusConfigError(f"config {file} is not valid TOML: {exc}") from None
    node = data.get("node", {})
    if not isinstance(node, dict):
        raise StatusConfigError(f"config {file}: [node] is not a table")
    base = file.absolute().parent
    state_dir = node.get("state_dir")
    sock = node.get("status_socket")
    for key, value in (("state_dir", state_dir), ("status_socket", sock)):
        if value is not None and (not isinstance(value, str) or not value):
            raise StatusConfigError(f"config {file}: node.{key} must be a non-empty string")
    if isinstance(sock, str):
        return base / sock
    if isinstance(state_dir, str):
        return base / state_dir / "status.sock"
    return Path(DEFAULT_STATUS_SOCKET)


def _when(value: object, now: float) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
    return f"{stamp} ({max(0, int(now - value))}s ago)"


def _section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, Mapping) else {}


def _coordination_lines(cluster: Mapping[str, Any]) -> list[str]:
    """The coordination backend and who publishes; with etcd, the link and its last error."""
    if not cluster:
        return []
    publisher = cluster.get("publisher")
    term = cluster.get("term", "?")
    who = f"publisher {publisher} (term {term})" if publisher else "no publisher"
    etcd = _section(cluster, "etcd")
    if cluster.get("backend") != "etcd" or not etcd:
        return [f"Coordination:  {cluster.get('backend', 'embedded')}, {who}"]
    link = "connected" if etcd.get("connected") else "NOT connected"
    registered = "registered" if etcd.get("registered") else "NOT registered"
    lines = [f"Coordination:  etcd via {etcd.get('endpoint', '?')}, {link}, {registered}, {who}"]
    if etcd.get("last_error"):
        lines.append(f"  etcd error:  {etcd['last_error']}")
    return lines


def format_status_text(doc: Mapping[str, Any], now: float | None = None) -> str:
    """Human-readable rendering of a status document."""
    now = time.time() if now is None else now
    tor = _section(doc, "tor")
    ips = _section(doc, "intro_points")
    pub = _section(doc, "last_publish")
    results = _section(pub, "results")
    lines = [
        f"Node:          {doc.get('node_id', '?')}",
        f"Master onion:  {doc.get('master_onion_address', '?')}",
        f"Mode:          {doc.get('mode', '?')}",
        f"Role:          {doc.get('role', '?')}",
        f"Tor:           {'running' if tor.get('running') else 'NOT RUNNING'}"
        f" (restarts: {tor.get('restarts', 0)}, failed restarts: "
        f"{tor.get('restart_failures', 0)})",
        f"Intro points:  {ips.get('own', 0)} own, {ips.get('published', 0)} published",
        "Last publish:",
    ]
    for period in ("current", "next"):
        lines.append(f"  {period + ':':9}{_when(pub.get(period), now)}")
        result = _section(results, period)
        if result:
            verdict = "ok" if result.get("ok") else f"FAILED ({result.get('error') or 'failed'})"
            lines.append(f"    last upload: {verdict}")
            hsdirs = result.get("hsdirs")
            for entry in hsdirs if isinstance(hsdirs, list) else []:
                if not isinstance(entry, Mapping):
                    continue
                state = "ok" if entry.get("ok") else f"failed ({entry.get('reason') or '?'})"
                lines.append(f"      {entry.get('hsdir', '?')}: {state}")
    failures = pub.get("consecutive_failures")
    if isinstance(failures, int) and failures:
        lines.append(f"  consecutive failed publishes: {failures}")
    lines.extend(_coordination_lines(_section(doc, "cluster")))
    peers = doc.get("peers")
    if isinstance(peers, list) and peers:
        lines.append("Peers:")
        for peer in peers:
            if isinstance(peer, Mapping):
                alive = "alive" if peer.get("alive") else "dead"
                lines.append(f"  {peer.get('node_id', '?')}: {alive}")
    else:
        lines.append("Peers:         none")
    if _section(doc, "cluster").get("revoked") is True:
        lines.append(
            "Cluster:       REVOKED: this node's key was revoked; it never publishes again "
            "(rustbalance cluster members, docs/security.md)"
        )
    proxy = _section(doc, "proxy")
    if proxy:
        lines.append("Proxy:")
        lines.extend(f"  {name}: {value}" for name, value in sorted(proxy.items()))
    return "\n".join(lines) + "\n"


def status(args: argparse.Namespace) -> int:
    """Print the daemon's status; exit 1 with a one-line reason if it is not reachable (2 if
    the config says nothing usable)."""
    try:
        path = status_socket_from_config(args.config)
        doc = read_status(path, timeout=args.timeout)
    except StatusError as exc:
        write_error(str(exc), prefix="rustbalance status: ")
        return EXIT_CONFIG if isinstance(exc, StatusConfigError) else EXIT_RUNTIME
    if args.format == "json":
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(format_status_text(doc))
    return 0
