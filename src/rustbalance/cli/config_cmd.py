"""``rustbalance config check FILE``: validate a config file without starting anything."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rustbalance.config import ConfigProblems, load_config
from rustbalance.errors import ConfigError

__all__ = ["check", "register"]

# argparse's _SubParsersAction is private and generic; Any keeps the signature honest.
SubParsers = Any


def register(commands: SubParsers, debug_commands: SubParsers) -> None:
    """Add the ``config`` command group (``debug_commands`` is not used)."""
    del debug_commands
    group = commands.add_parser("config", help="check configuration files")
    actions = group.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND")
    check_parser = actions.add_parser(
        "check",
        help="validate a config file and print a summary",
        description=(
            "Validate FILE: syntax, types, ranges, unknown keys. Key and token files are only "
            "named in the config; the daemon checks them when it starts."
        ),
    )
    check_parser.add_argument("file", metavar="FILE", help="path of the TOML config file")
    check_parser.set_defaults(func=check)

    def usage(args: argparse.Namespace) -> int:
        del args
        group.print_help(sys.stderr)
        return 2

    group.set_defaults(func=usage)


def check(args: argparse.Namespace) -> int:
    """Print ``FILE: ok`` and a summary (exit 0) or every problem, one per line (exit 1)."""
    file: str = args.file
    try:
        config = load_config(file)
    except ConfigProblems as exc:
        for problem in exc.problems:
            print(f"{file}: {problem}", file=sys.stderr)
        count = len(exc.problems)
        print(f"{file}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # not raised by load_config today; keep the contract anyway
        print(f"{file}: {exc}", file=sys.stderr)
        return 1
    print(f"{file}: ok")
    print(config.summary())
    return 0
