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
    "rustbalance.cli.import_onionbalance",
)

Handler = Callable[[argparse.Namespace], int]

# Shell-completion hints, read by shtab from an action's ``complete`` attribute (the generated
# completions in share/ come from these; tests/cli/cli_files.py): options that name a file or
# a folder, by their dest.
_FILE_DESTS = frozenset(
    {
        "key",
        "out",
        "file",
        "config",
        "client_auth",
        "client_auth_key",
        "passphrase_file",
        "import_key",
        "token_file",
        "onionbalance_config",
    }
)
_DIR_DESTS = frozenset({"config_dir", "state_dir"})
_COMPLETE_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files"}
_COMPLETE_DIR = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/"}


def _print_group_help(group: argparse.ArgumentParser) -> Handler:
    """A command group run without its sub-command prints its own help (exit 2)."""

    def usage(args: argparse.Namespace) -> int:
        del args
        group.print_help(sys.stderr)
        return 2

    return usage


def _add_completion_hints(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_completion_hints(sub)
        elif action.dest in _FILE_DESTS:
            action.complete = _COMPLETE_FILE  # type: ignore[attr-defined]
        elif action.dest in _DIR_DESTS:
            action.complete = _COMPLETE_DIR  # type: ignore[attr-defined]


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
    debug.set_defaults(func=_print_group_help(debug))
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(commands, debug_commands)
    _add_completion_hints(parser)
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
