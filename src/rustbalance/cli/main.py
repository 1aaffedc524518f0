"""The `rustbalance` command line.

Each command group lives in its own module under ``rustbalance.cli`` and exposes
``register(commands, debug_commands)``, which adds argparse sub-parsers. A sub-parser sets
``func`` to a callable taking the parsed namespace and returning the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from rustbalance import __version__
from rustbalance.errors import RustBalanceError

# Command modules, in the order their commands appear in --help. A module that does not exist
# yet is an error: every name here must be importable.
COMMAND_MODULES: tuple[str, ...] = (
    "rustbalance.cli.offline",
    "rustbalance.cli.tor_debug",
    "rustbalance.cli.status_cmd",
    "rustbalance.cli.config_cmd",
    "rustbalance.cli.run_cmd",
    "rustbalance.cli.init_cmd",
    "rustbalance.cli.join_cmd",
    "rustbalance.cli.cluster_cmd",
)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rustbalance",
        description="Load balancing and high availability for Tor v3 onion services.",
    )
    parser.add_argument("--version", action="version", version=f"rustbalance {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at DEBUG level (never logs secrets)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    debug = commands.add_parser("debug", help="offline and operator debugging tools")
    debug_commands = debug.add_subparsers(dest="debug_command", metavar="DEBUG_COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(commands, debug_commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return func(args)
    except RustBalanceError as exc:
        print(f"rustbalance: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
