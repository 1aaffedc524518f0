"""``rustbalance prepare --config FILE``: what root does for a node on the system tor.

In ``tor.mode = "system"`` the node's onion-service folder lives in the system tor's own
folder (``/var/lib/tor``, debian-tor's, 0700) and tor refuses one it does not own; the include
file lives in ``/etc/tor/torrc.d``. Writing either takes root, so the daemon itself runs
unprivileged and this command does these two things as root before it (the drop-in
deploy/system-tor.conf runs it as ``ExecStartPre=-+``):

- the onion-service folder: the key tor hosts and ``ob_config``, opened without following a
  symlink the tor user could have planted, every file created by this process and handed to
  the owner of the folder's parent (the tor user) on its own descriptor (node/startup.py
  ``write_onion_service_dir``); a parent that belongs to root is refused (that is not a tor
  folder); in ``instance`` mode a missing instance key is generated for the daemon's user
  (the owner of ``node.state_dir``);
- the include (``tor.torrc_include``), exactly what the daemon would write, so the daemon finds
  it up to date (which needs ``proxy.listen_unix`` or a fixed ``proxy.listen_port``).

Managed mode needs nothing from root: exit 0 at once. Exit 2 for a config or key problem,
1 for anything else (cli/main.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rustbalance.cli.logging_setup import write_error
from rustbalance.cli.run_cmd import DEFAULT_CONFIG
from rustbalance.config import Config, ConfigProblems, load_config
from rustbalance.errors import ConfigError, RustBalanceError
from rustbalance.node.clock import SYSTEM_CLOCK
from rustbalance.node.cluster_link import coordination_wanted
from rustbalance.node.cluster_mode import ClusterMode, ModePolicy
from rustbalance.node.startup import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_RUNTIME,
    StartupError,
    load_identity,
    onion_service_settings,
    system_include,
    write_onion_service_dir,
    write_system_include,
)
from rustbalance.secure_dir import opened_dir

__all__ = ["prepare", "register"]

SubParsers = Any  # argparse's _SubParsersAction is private and generic


def register(commands: SubParsers, debug_commands: SubParsers) -> None:
    """Add the ``prepare`` command (``debug_commands`` is not used)."""
    del debug_commands
    parser = commands.add_parser(
        "prepare",
        help="as root: the system tor's onion-service folder and include for this node",
        description=(
            "For tor.mode = system: write the node's onion-service folder (for the tor user) "
            "and the tor include, which the unprivileged daemon cannot. The systemd drop-in "
            "for the system tor runs it as root before the daemon. Managed mode: nothing to do."
        ),
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"config file ({DEFAULT_CONFIG})"
    )
    parser.set_defaults(func=prepare)


def _owner(path: Path) -> tuple[int, int] | None:
    """The (uid, gid) of a folder that is not root's, else None."""
    with opened_dir(path) as fd:
        info = os.fstat(fd)
    return None if info.st_uid == 0 else (info.st_uid, info.st_gid)


def _prepare(config: Config) -> None:
    tor = config.tor
    if tor.mode != "system":
        print("tor.mode is managed: nothing to prepare")
        return
    if _owner(tor.hidden_service_dir.parent) is None:
        raise StartupError(
            f"tor.hidden_service_dir: its folder {tor.hidden_service_dir.parent} belongs to "
            "root, not to the system tor's user (e.g. /var/lib/tor)",
            EXIT_CONFIG,
        )
    port = config.proxy.listen_port
    # On a unix socket tor reaches the proxy by path, and the port is not written.
    if port == 0 and config.proxy.listen_unix is None:
        raise StartupError(
            "proxy.listen_port: 0 (a port picked at start) cannot be written into the tor "
            "include ahead of the daemon; set a fixed port",
            EXIT_CONFIG,
        )
    # A missing instance key is created for the daemon's user, who owns the state folder.
    identity = load_identity(config, owner=_owner(config.node.state_dir))
    write_onion_service_dir(config, identity)
    clustered = coordination_wanted(config, identity, SYSTEM_CLOCK)
    policy = ModePolicy.for_node(config, identity, clustered=clustered)
    native = ClusterMode(policy).native_publishing_at_start()
    settings = onion_service_settings(config, port, publish_descriptors=native)
    write_system_include(config, system_include(config, identity, settings))


def prepare(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigProblems as exc:
        write_error(str(exc))
        return EXIT_CONFIG
    try:
        _prepare(config)
    except StartupError as exc:
        write_error(str(exc))
        return exc.exit_code
    except ConfigError as exc:
        write_error(str(exc))
        return EXIT_CONFIG
    except (RustBalanceError, OSError) as exc:
        write_error(str(exc))
        return EXIT_RUNTIME
    return EXIT_OK
