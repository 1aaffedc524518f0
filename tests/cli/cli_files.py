"""Generate the shell completions and the man page from the argparse definitions.

``python -m tests.cli.cli_files`` (``make cli-files``) writes them under ``share/``, in the
layout of ``/usr/share`` so a package can install them as they are;
``tests/cli/test_help_and_shell_files.py`` fails when a committed file differs from what this
generates. shtab and argparse-manpage are the standard generators for argparse (dev extra).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import shtab
from argparse_manpage.manpage import Manpage

from rustbalance import __version__
from rustbalance.cli.main import build_parser

BASH = "share/bash-completion/completions/rustbalance"
ZSH = "share/zsh/vendor-completions/_rustbalance"
MAN = "share/man/man1/rustbalance.1"
MAN_INCLUDE = "share/man/rustbalance.1.include"

_ROOT = Path(__file__).resolve().parents[2]
# argparse wraps help text at $COLUMNS; fix it so the output never depends on the terminal.
_COLUMNS = "100"


@contextlib.contextmanager
def _columns() -> Iterator[None]:
    """$COLUMNS fixed while argparse formats, then as it was."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _COLUMNS
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def bash() -> str:
    with _columns():
        return str(shtab.complete(build_parser(), "bash"))


def zsh() -> str:
    with _columns():
        return str(shtab.complete(build_parser(), "zsh"))


def man() -> str:
    with _columns():
        return _man()


def _man() -> str:
    page = Manpage(
        build_parser(),
        {
            "project_name": "rustbalance",
            "version": __version__,
            "manual_title": "RustBalance Manual",
            "description": "load balancing and high availability for Tor v3 onion services",
            # Reproducible: no build date in the page (argparse-manpage would take today's).
            "date": __version__,
            "include": str(_ROOT / MAN_INCLUDE),
        },
    )
    return str(page)


FILES: dict[str, Callable[[], str]] = {BASH: bash, ZSH: zsh, MAN: man}


def command_paths(parser: argparse.ArgumentParser) -> Iterator[list[str]]:
    """Every runnable command as its words after ``rustbalance``, e.g. ``['debug', 'tor']``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = list(command_paths(sub))
                yield from ([name, *words] for words in inner) if inner else [[name]]


def main() -> None:
    for name, generate in FILES.items():
        path = _ROOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(generate(), encoding="utf-8")
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
