"""``rustbalance run --config FILE``: run the node daemon in the foreground.

Exit codes: 0 after SIGTERM/SIGINT and an orderly shutdown, 1 when tor cannot be started or a
background task fails for good (systemd then restarts us, ``Restart=always``), 2 when the
config or the master key is invalid (one clear message on stderr; restarting will not help).
"""

from __future__ import annotations

import argparse
from typing import Any

from rustbalance.cli.logging_setup import write_error
from rustbalance.node.daemon import NetworkFactory, run_node
from rustbalance.node.startup import StartupError
from rustbalance.node.tor_network import ControlTorNetwork

__all__ = ["register", "run"]

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
