"""``rustbalance run --config FILE``: run the node daemon in the foreground.

Exit codes: 0 after SIGTERM/SIGINT and an orderly shutdown, 1 when tor cannot be started or a
background task fails for good (systemd then restarts us, ``Restart=always``), 2 when the
config or the master key is invalid (one clear message on stderr; restarting will not help).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from rustbalance.cli.logging_setup import write_error
from rustbalance.node.daemon import Daemon, NetworkFactory
from rustbalance.node.proctitle import set_process_title
from rustbalance.node.startup import StartupError, load_node
from rustbalance.node.tor_network import ControlTorNetwork
from rustbalance.proxy.eventloop import run as run_event_loop

__all__ = ["register", "run", "run_node"]

DEFAULT_CONFIG = "/etc/rustbalance/config.toml"
SubParsers = Any  # argparse's _SubParsersAction is private and generic


def register(commands: SubParsers, debug_commands: SubParsers) -> None:
    """Add the ``run`` command (``debug_commands`` is not used)."""
    del debug_commands
    parser = commands.add_parser(
        "run",
        help="run the node daemon",
        description="Run this node: its tor, the reverse proxy and the publisher, until SIGTERM.",
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"config file ({DEFAULT_CONFIG})"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, *, network: NetworkFactory = ControlTorNetwork) -> int:
    """``network``: how the daemon reaches tor (tests inject a fault, tests/node_e2e)."""
    config: str = args.config
    try:
        return run_node(config, ["run", "--config", config], network=network)
    except StartupError as exc:
        write_error(str(exc))
        return exc.exit_code


def run_node(
    config_path: str | os.PathLike[str],
    args: list[str] | None = None,
    *,
    network: NetworkFactory = ControlTorNetwork,
) -> int:
    """The daemon's process: the exit code (0 clean stop, 1 failure, 2 config/key)."""
    config, identity = load_node(config_path)
    set_process_title(args if args is not None else ["run", "--config", str(config_path)])
    daemon = Daemon(config, identity, network=network)
    # uvloop in http mode (faster proxy), the stock loop in tcp mode (splice): proxy/eventloop.py
    return run_event_loop(daemon.run(), mode=config.proxy.mode)
