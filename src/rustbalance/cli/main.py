"""The `rustbalance` command line.

Each command group lives in its own module under ``rustbalance.cli`` and exposes
``register(commands, debug_commands)``, which adds argparse sub-parsers. A sub-parser sets
``func`` to a callable taking the parsed namespace and returning the exit code.

Exit codes, the same for every command (one rule, :func:`exit_code_for`):

- 0: done;
- 1 (``EXIT_RUNTIME``): it failed while running (tor or the network, the daemon not running,
  a file that could not be written); trying again later may work;
- 2 (``EXIT_CONFIG``): the command line, the configuration or an input file (key, token,
  passphrase) is wrong; nothing changes until it is fixed, so systemd must not restart
  (``RestartPreventExitStatus=2`` in deploy/rustbalance.service). argparse's usage errors
  are 2 as well.

The logging options ``-v``/``-q``/``--log-format`` are accepted before and after the
subcommand (``rustbalance run -v`` and ``rustbalance -v run``); logging_setup.py says how lines
look on a terminal, in journald and as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from rustbalance import __version__
from rustbalance.cli.logging_setup import LOG_FORMATS, LogSettings, configure_logging, write_error
from rustbalance.errors import ConfigError, InvalidKeyError, RustBalanceError

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2

# Command modules, in the order their commands appear in --help. A module that does not exist
# yet is an error: every name here must be importable.
COMMAND_MODULES: tuple[str, ...] = (
    "rustbalance.cli.offline",
    "rustbalance.cli.tor_debug",
    "rustbalance.cli.status_cmd",
    "rustbalance.cli.config_cmd",
    "rustbalance.cli.run_cmd",
    "rustbalance.cli.prepare_cmd",
    "rustbalance.cli.init_cmd",
    "rustbalance.cli.join_cmd",
    "rustbalance.cli.import_onionbalance",
    "rustbalance.cli.cluster_cmd",
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


def _add_logging_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v/-q/--log-format on ``parser``. Below the top level the defaults are SUPPRESS, so a
    subcommand that is not given the option keeps what was given before the subcommand."""
    group = parser.add_argument_group("logging")
    exclusive = group.add_mutually_exclusive_group()
    default_flag: object = False if top else argparse.SUPPRESS
    exclusive.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default_flag,
        help="log at DEBUG level (never logs secrets)",
    )
    exclusive.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default_flag,
        help="log only warnings and errors",
    )
    group.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text" if top else argparse.SUPPRESS,
        help="text (default; under systemd one <priority>-prefixed line per event, no "
        "timestamps) or json (one object per line)",
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:  # argparse keeps its sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.append(sub)
                found.extend(_subparsers(sub))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rustbalance",
        description="Load balancing and high availability for Tor v3 onion services.",
    )
    parser.add_argument("--version", action="version", version=f"rustbalance {__version__}")
    _add_logging_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    debug = commands.add_parser("debug", help="offline and operator debugging tools")
    debug_commands = debug.add_subparsers(dest="debug_command", metavar="DEBUG_COMMAND")
    debug.set_defaults(func=_print_group_help(debug))
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(commands, debug_commands)
    for sub in _subparsers(parser):
        _add_logging_options(sub, top=False)
    _add_completion_hints(parser)
    return parser


def log_settings(args: argparse.Namespace) -> LogSettings:
    """What -v/-q/--log-format asked for (wherever on the command line they were)."""
    if args.verbose and args.quiet:
        # Given on both sides of the subcommand: argparse's exclusive group sees only one side.
        raise ConfigError("-v/--verbose and -q/--quiet exclude each other")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    return LogSettings(level=level, format=args.log_format)


def exit_code_for(exc: RustBalanceError) -> int:
    """The exit code of a failed command (module docstring): an error may carry its own
    ``exit_code``; otherwise a config or key problem is 2 and everything else 1."""
    explicit = getattr(exc, "exit_code", None)
    if explicit in (EXIT_RUNTIME, EXIT_CONFIG):
        return int(explicit)
    if isinstance(exc, ConfigError | InvalidKeyError):
        return EXIT_CONFIG
    return EXIT_RUNTIME


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = log_settings(args)
    except ConfigError as exc:
        parser.error(str(exc))  # exits 2, like every other usage error
    configure_logging(settings)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    try:
        return func(args)
    except RustBalanceError as exc:
        write_error(str(exc))
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
