"""``rustbalance config check FILE``: validate a config and the files it names, start nothing.

Like ``nginx -t``: besides the syntax, types, ranges and unknown keys of the config itself, every
key file the config names is opened with the daemon's own loader and must exist, be readable,
not be readable by others (0600) and hold a usable key: the master key (and that it matches
``master.onion_address``), with the etcd backend its CA, client certificate and key (PEM, the
key 0600 and the certificate's own), and, when they already exist, the instance key and the
WireGuard private key (the daemon generates those when they are missing). A node that will run
in an embedded-backend cluster must have a usable node key and be admitted with it (its members
file holds a master-signed record for it; a node holding the master key admits itself, and makes
its node key when missing), as the daemon checks at start.
Nothing is created or changed, and no secret ever reaches the output.

Exit 0 when everything is usable, 2 for any problem (cli/main.py: 2 = configuration), so the
unit's ``ExecStartPre=`` check and ``RestartPreventExitStatus=2`` agree with ``rustbalance run``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rustbalance.cli.logging_setup import error_line
from rustbalance.cluster.etcd_backend import tls_problems
from rustbalance.cluster.wireguard import WireGuardError, load_or_create_private_key
from rustbalance.config import Config, ConfigProblems, load_config
from rustbalance.crypto.keys import IdentityKey
from rustbalance.errors import ConfigError, InvalidKeyError
from rustbalance.node.cluster_link import cluster_problem
from rustbalance.node.identity import (
    default_instance_key_path,
    load_or_create_instance_key,
    master_key_needed,
)
from rustbalance.node.startup import (
    EXIT_CONFIG,
    StartupError,
    load_master_key,
    with_saved_members,
)

__all__ = ["check", "file_problems", "register"]

# argparse's _SubParsersAction is private and generic; Any keeps the signature honest.
SubParsers = Any


def register(commands: SubParsers, debug_commands: SubParsers) -> None:
    """Add the ``config`` command group (``debug_commands`` is not used)."""
    del debug_commands
    group = commands.add_parser("config", help="check configuration files")
    actions = group.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND")
    check_parser = actions.add_parser(
        "check",
        help="validate a config file and the key files it names",
        description=(
            "Validate FILE (syntax, types, ranges, unknown keys) and every key file it names: "
            "each must exist, be readable only by its owner (0600) and hold a usable key; in a "
            "cluster, the node must be admitted with its node key. Exit 0 if all is well, 2 "
            "otherwise."
        ),
    )
    check_parser.add_argument("file", metavar="FILE", help="path of the TOML config file")
    check_parser.set_defaults(func=check)

    def usage(args: argparse.Namespace) -> int:
        del args
        group.print_help(sys.stderr)
        return EXIT_CONFIG

    group.set_defaults(func=usage)


def file_problems(config: Config) -> list[str]:
    """One message per unusable key file the config names, or a cluster that would not admit
    this node (the module docstring).

    Each file is read with the loader the daemon uses at start, so the check and the start
    cannot disagree; a missing instance or WireGuard key is fine (the daemon creates it).
    """
    problems: list[str] = []
    master: IdentityKey | None = None
    master_usable = True
    if config.master.identity_key_path is not None or master_key_needed(config):
        try:
            master = load_master_key(config)
        except StartupError as exc:
            problems.append(str(exc))
            master_usable = False
    if config.identity_mode == "instance":
        instance = default_instance_key_path(config)
        if instance.exists() or instance.is_symlink():
            try:
                load_or_create_instance_key(instance)
            except InvalidKeyError as exc:
                problems.append(f"node.instance_key_path: {exc}")
    if config.coordination.backend == "etcd":
        # etcd knows a node by its TLS client certificate: no node key, no admission record.
        problems.extend(tls_problems(config.etcd))
    elif master_usable:  # (without it, whether the node may take part is unknown)
        problem = cluster_problem(config, master, int(time.time() * 1000))
        if problem is not None:
            problems.append(problem)
    wg_key = config.wireguard.private_key_path
    if wg_key is not None and (wg_key.exists() or wg_key.is_symlink()):
        try:
            load_or_create_private_key(wg_key)
        except (WireGuardError, OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            problems.append(f"wireguard.private_key_path: {detail}")
    return problems


def _report(file: str, problems: list[str]) -> int:
    for problem in problems:
        print(error_line(problem, prefix=f"{file}: "), file=sys.stderr)
    count = len(problems)
    summary = f"{count} problem{'s' if count != 1 else ''}"
    print(error_line(summary, prefix=f"{file}: "), file=sys.stderr)
    return EXIT_CONFIG


def check(args: argparse.Namespace) -> int:
    """Print ``FILE: ok`` and a summary (exit 0) or every problem, one per line (exit 2)."""
    file: str = args.file
    try:
        config = load_config(file)
    except ConfigProblems as exc:
        return _report(file, list(exc.problems))
    except ConfigError as exc:  # not raised by load_config today; keep the contract anyway
        return _report(file, [str(exc)])
    try:
        config = with_saved_members(config)
    except (ConfigError, StartupError) as exc:  # StartupError: the master key file itself
        return _report(file, [str(exc)])
    problems = file_problems(config)
    if problems:
        return _report(file, problems)
    print(f"{file}: ok")
    print(config.summary())
    return 0
