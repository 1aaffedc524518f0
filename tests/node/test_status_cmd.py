"""cli/status_cmd.py: `rustbalance status --config FILE [--format text|json]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rustbalance.cli import status_cmd
from rustbalance.node.status import StatusServer

MASTER = "b" * 56 + ".onion"
PUBLISHED_AT = 1_700_000_000.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rbsc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rustbalance")
    commands = parser.add_subparsers(dest="command")
    debug = commands.add_parser("debug").add_subparsers(dest="debug_command")
    status_cmd.register(commands, debug)
    return parser.parse_args(argv)


def document() -> dict[str, Any]:
    """A status document as the daemon sends it (node/snapshot.py), trimmed to what the
    client shows."""
    return {
        "node_id": "node-a",
        "mode": "single",
        "role": "publisher",
        "master_onion_address": MASTER,
        "tor": {"running": True, "restarts": 1, "restart_failures": 0, "mode": "managed"},
        "intro_points": {"own": 3, "published": 3},
        "last_publish": {
            "current": PUBLISHED_AT,
            "next": None,
            "results": {
                "current": {
                    "ok": True,
                    "error": None,
                    "hsdirs": [
                        {"hsdir": "$AAAA", "ok": True, "reason": None},
                        {"hsdir": "$BBBB", "ok": False, "reason": "UPLOAD_REJECTED"},
                    ],
                },
                "next": {"ok": False, "error": "551 Unable to upload", "hsdirs": []},
            },
        },
        "peers": [{"node_id": "node-b", "alive": False}],
        "proxy": {"connections_active": 2, "connections_total": 40},
        "generated_at": None,
    }


def write_config(directory: Path, node_section: str) -> Path:
    config = directory / "config.toml"
    config.write_text(f'[node]\nid = "node-a"\n{node_section}\n')
    return config


def test_socket_path_from_config(short_dir: Path) -> None:
    cfg = write_config(short_dir, 'status_socket = "/run/rb/s.sock"')
    assert status_cmd.status_socket_from_config(cfg) == Path("/run/rb/s.sock")
    cfg = write_config(short_dir, 'status_socket = "s.sock"')
    assert status_cmd.status_socket_from_config(cfg) == short_dir / "s.sock"
    cfg = write_config(short_dir, 'state_dir = "/var/lib/rb2"')
    assert status_cmd.status_socket_from_config(cfg) == Path("/var/lib/rb2/status.sock")
    cfg = write_config(short_dir, "")
    assert status_cmd.status_socket_from_config(cfg) == Path("/var/lib/rustbalance/status.sock")


async def test_json_output(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = short_dir / "status.sock"
    cfg = write_config(short_dir, f'status_socket = "{sock}"')
    args = parse(["status", "--config", str(cfg), "--format", "json"])
    async with StatusServer(sock, document):
        code = await asyncio.to_thread(args.func, args)
    assert code == 0
    assert json.loads(capsys.readouterr().out) == document()


async def test_text_output(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = short_dir / "status.sock"
    cfg = write_config(short_dir, 'status_socket = "status.sock"')
    args = parse(["status", "--config", str(cfg)])
    async with StatusServer(sock, document):
        code = await asyncio.to_thread(args.func, args)
    out = capsys.readouterr().out
    assert code == 0
    for line in (
        "Node:          node-a",
        f"Master onion:  {MASTER}",
        "Mode:          single",
        "Role:          publisher",
        "Tor:           running (restarts: 1, failed restarts: 0)",
        "Intro points:  3 own, 3 published",
        "  current: 2023-11-14 22:13:20 UTC",
        "    last upload: ok",
        "      $AAAA: ok",
        "      $BBBB: failed (UPLOAD_REJECTED)",
        "  next:    never",
        "    last upload: FAILED (551 Unable to upload)",
        "  node-b: dead",
        "  connections_active: 2",
        "  connections_total: 40",
    ):
        assert line in out


def test_format_text_exact() -> None:
    doc = document()
    doc["last_publish"]["results"] = {}
    doc["peers"] = []
    doc["tor"]["running"] = False
    assert status_cmd.format_status_text(doc, now=PUBLISHED_AT + 42) == (
        "Node:          node-a\n"
        f"Master onion:  {MASTER}\n"
        "Mode:          single\n"
        "Role:          publisher\n"
        "Tor:           NOT RUNNING (restarts: 1, failed restarts: 0)\n"
        "Intro points:  3 own, 3 published\n"
        "Last publish:\n"
        "  current: 2023-11-14 22:13:20 UTC (42s ago)\n"
        "  next:    never\n"
        "Peers:         none\n"
        "Proxy:\n"
        "  connections_active: 2\n"
        "  connections_total: 40\n"
    )


def test_daemon_not_running_exits_1_with_one_line(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(short_dir, 'status_socket = "missing.sock"')
    args = parse(["status", "--config", str(cfg)])
    assert args.func(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"rustbalance status: no daemon running (status socket {short_dir / 'missing.sock'} "
        "does not exist)\n"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read config"),
        ("[node\n", "is not valid TOML"),
        ("node = 3\n", "[node] is not a table"),
        ("[node]\nstatus_socket = 5\n", "node.status_socket must be a non-empty string"),
    ],
)
def test_bad_config_exits_2(
    short_dir: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    cfg = short_dir / "config.toml"
    if content is not None:
        cfg.write_text(content)
    args = parse(["status", "--config", str(cfg), "--format", "json"])
    assert args.func(args) == 2  # a configuration problem, not a daemon that is down
    err = capsys.readouterr().err
    assert err.startswith("rustbalance status: ") and message in err
    assert err.count("\n") == 1


def test_text_names_the_coordination_backend_and_the_etcd_link() -> None:
    doc = document()
    doc["cluster"] = {"backend": "embedded", "term": 7, "publisher": "node-b"}
    assert "Coordination:  embedded, publisher node-b (term 7)\n" in (
        status_cmd.format_status_text(doc, now=PUBLISHED_AT)
    )
    doc["cluster"] = {
        "backend": "etcd",
        "term": 1042,
        "publisher": None,
        "etcd": {
            "endpoint": "10.0.0.11:2379",
            "connected": True,
            "registered": False,
            "last_error": "write: Put on 10.0.0.11:2379: permission_denied",
        },
    }
    text = status_cmd.format_status_text(doc, now=PUBLISHED_AT)
    assert (
        "Coordination:  etcd via 10.0.0.11:2379, connected, NOT registered, no publisher\n"
        "  etcd error:  write: Put on 10.0.0.11:2379: permission_denied\n"
    ) in text
    assert text.index("Coordination:") < text.index("Peers:")


def test_a_revoked_node_says_so() -> None:
    doc = document()
    doc["cluster"] = {"revoked": False, "members": []}
    assert "REVOKED" not in status_cmd.format_status_text(doc, now=PUBLISHED_AT)
    doc["cluster"]["revoked"] = True
    text = status_cmd.format_status_text(doc, now=PUBLISHED_AT)
    assert "Cluster:       REVOKED: this node's key was revoked" in text
