"""Start-up checks and files: everything the daemon does before it starts a process.

1. load and validate the config, check that ``node.state_dir`` is private to this user
   (:func:`prepare_state_dir`), and load the keys (:func:`load_node`): the master key is refused
   when others can read it, and checked against ``master.onion_address``, which catches
   deploying the wrong key; in ``instance`` mode the node's own key is read or generated;
2. write the onion service folder (:func:`write_onion_service_dir`): the key tor hosts (0700
   folder, 0600 files) and ``ob_config`` naming the master address, so the node's tor runs as
   an Onionbalance instance and its intro points accept the master subcredentials of the
   previous, current and next period (tor.md §10-§11, system.md W19);
3. the onion service's torrc settings (:func:`onion_service_settings`).

Every failure is a :class:`StartupError` whose ``exit_code`` says whether restarting can help
(2: configuration or key, it cannot; 1: a runtime problem).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from pathlib import Path

from rustbalance.atomic_file import write_file_atomic
from rustbalance.config import Config, ConfigProblems, load_config
from rustbalance.config.identity_mode import cluster_identity_problem, effective_identity_mode
from rustbalance.config.pow import pow_refusal
from rustbalance.crypto.keys import IdentityKey, load_identity_key, write_hidden_service_dir
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.errors import ConfigError, InvalidKeyError, RustBalanceError, UnsafePathError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.clock import SYSTEM_CLOCK, Clock
from rustbalance.node.cluster_link import cluster_problem, learned_members
from rustbalance.node.identity import (
    NodeIdentity,
    default_instance_key_path,
    load_or_create_instance_key,
    master_key_needed,
    resolve_identity,
)
from rustbalance.node.torrc import (
    OB_CONFIG_FILENAME,
    FrontDoorSettings,
    IntroDosSettings,
    OnionServiceSettings,
    PowSettings,
    ob_config_text,
    system_include_text,
)
from rustbalance.secure_dir import opened_dir

__all__ = [
    "EXIT_CONFIG",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "StartupError",
    "load_identity",
    "load_master_key",
    "load_node",
    "log_identity_mode",
    "onion_service_settings",
    "prepare_state_dir",
    "system_include",
    "with_saved_members",
    "write_file",
    "write_onion_service_dir",
    "write_system_include",
]

log = logging.getLogger(DAEMON_LOGGER)

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


class StartupError(RustBalanceError):
    """The daemon cannot start; ``exit_code`` 2 = configuration or key, 1 = runtime."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def load_master_key(config: Config) -> IdentityKey:
    """The master identity key, refusing group/world-readable files (docs/config.md)."""
    path = config.master.identity_key_path
    if path is None:
        raise StartupError("master.identity_key_path: is required", EXIT_CONFIG)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise StartupError(
            f"master key {path}: cannot read: {exc.strerror or exc}", EXIT_CONFIG
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StartupError(
            f"master key {path}: mode {stat.S_IMODE(mode):04o} lets others read it; "
            f"run: chmod 600 {path}",
            EXIT_CONFIG,
        )
    try:
        key = load_identity_key(path)
    except InvalidKeyError as exc:
        raise StartupError(f"master key: {exc}", EXIT_CONFIG) from None
    expected = config.master.onion_address
    if expected is not None and expected.lower() != key.onion_address:
        raise StartupError(
            f"master key {path} is for {key.onion_address}, but master.onion_address is "
            f"{expected}: wrong key file?",
            EXIT_CONFIG,
        )
    return key


def load_identity(config: Config, *, owner: tuple[int, int] | None = None) -> NodeIdentity:
    """The keys of the node's identity mode (identity.py): the master key when this node needs
    it, the node's own instance key (generated if missing, given to ``owner`` if set) in
    instance mode."""
    master = None
    if master_key_needed(config) or config.master.identity_key_path is not None:
        master = load_master_key(config)
    instance = None
    if config.identity_mode == "instance":
        path = default_instance_key_path(config)
        try:
            instance, created = load_or_create_instance_key(path, owner=owner)
        except InvalidKeyError as exc:
            raise StartupError(f"node.instance_key_path: {exc}", EXIT_CONFIG) from None
        if created:
            log.info("Generated this node's instance key %s (%s)", path, instance.onion_address)
    try:
        return resolve_identity(config, master, instance)
    except ConfigError as exc:
        raise StartupError(str(exc), EXIT_CONFIG) from None


def load_node(
    config_path: str | os.PathLike[str], clock: Clock = SYSTEM_CLOCK
) -> tuple[Config, NodeIdentity]:
    """Load and validate the config and the keys; StartupError(exit 2) on any problem."""
    try:
        config = load_config(config_path)
    except ConfigProblems as exc:
        problems = "; ".join(exc.problems)
        raise StartupError(f"invalid config {config_path}: {problems}", EXIT_CONFIG) from None
    except ConfigError as exc:
        raise StartupError(f"invalid config {config_path}: {exc}", EXIT_CONFIG) from None
    # An existing state folder is checked before anything is written under it (instance mode
    # creates its key there); a missing one is created by the daemon's start once every key
    # and token is known to be usable, so a refused start writes nothing.
    prepare_state_dir(config, create=False)
    try:
        config = with_saved_members(config, clock)
    except ConfigError as exc:
        raise StartupError(f"invalid config {config_path}: {exc}", EXIT_CONFIG) from None
    # Before the instance key is generated (a cluster's default mode): a node refused for its
    # node key or admission writes nothing. The coordinator checks the same again at start.
    master = None
    if config.master.identity_key_path is not None or master_key_needed(config):
        master = load_master_key(config)
    problem = cluster_problem(config, master, int(clock.wall() * 1000))
    if problem is not None:
        raise StartupError(problem, EXIT_CONFIG)
    return config, load_identity(config)


def _master_public(config: Config) -> bytes:
    """The master's public key, which signs the admission records: from ``master.onion_address``
    when set (a node without the key), else from the key file."""
    if config.master.onion_address is not None:
        return decode_onion_address(config.master.onion_address)
    return load_master_key(config).public_key


def with_saved_members(config: Config, clock: Clock = SYSTEM_CLOCK) -> Config:
    """``config`` as the node runs it when other members admitted in an earlier run (the
    members file, master-signed records only) make it part of a cluster its config does not
    show: the default identity mode is then ``instance``; ``shared`` and proof-of-work are
    refused there as in a configured cluster (config/identity_mode.py, config/pow.py).
    ConfigError names the key."""
    if config.clustered:
        return config
    if learned_members(config, _master_public(config), int(clock.wall() * 1000)) == 0:
        return config
    mode = effective_identity_mode(config.node.identity_mode, clustered=True)
    problem = cluster_identity_problem(mode, clustered=True)
    if problem is not None:
        raise ConfigError(f"{problem} (members admitted in an earlier run make it a cluster)")
    refusal = pow_refusal(identity_mode=mode, learned_peers=True)
    if config.tor.pow_enabled and refusal is not None:
        raise ConfigError(refusal)
    if config.node.identity_mode is None:
        log.info(
            "Members admitted in an earlier run: this node is part of a cluster (instance mode)"
        )
        config = dataclasses.replace(
            config, node=dataclasses.replace(config.node, identity_mode=mode)
        )
    return config


def write_file(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, text, mode)


def prepare_state_dir(config: Config, *, create: bool = True) -> None:
    """``node.state_dir`` (created 0700 if missing, with ``create``) must be this user's and
    writable by nobody else: everything under it (keys, peers, tor's data, the status socket)
    is written by path, which is safe only where no other user can plant a name (issue 17).
    Without ``create`` a missing folder is nothing to check."""
    path = config.node.state_dir
    try:
        with opened_dir(path, create_mode=0o700 if create else None) as fd:
            info = os.fstat(fd)
    except FileNotFoundError:
        if create:
            raise StartupError(f"node.state_dir: cannot create {path}", EXIT_CONFIG) from None
        return
    except UnsafePathError as exc:
        raise StartupError(f"node.state_dir: {exc}", EXIT_CONFIG) from None
    except OSError as exc:
        raise StartupError(
            f"node.state_dir: cannot open {path}: {exc.strerror or exc}", EXIT_CONFIG
        ) from None
    if info.st_uid != os.geteuid():
        raise StartupError(
            f"node.state_dir: {path} is owned by uid {info.st_uid}, but the daemon runs as "
            f"uid {os.geteuid()}; run: chown {os.geteuid()} {path}",
            EXIT_CONFIG,
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StartupError(
            f"node.state_dir: {path} is writable by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}); run: chmod 700 {path}",
            EXIT_CONFIG,
        )


def _system_tor_owner(config: Config) -> tuple[int, int] | None:
    """System mode as root: tor refuses a HiddenServiceDir it does not own (tor's
    src/lib/fs/dir.c, check_private_dir), so the folder goes to the owner of its parent
    (debian-tor for /var/lib/tor). None when nothing is handed over."""
    if config.tor.mode != "system" or os.geteuid() != 0:
        return None
    with opened_dir(config.tor.hidden_service_dir.parent) as fd:
        parent = os.fstat(fd)
    return None if parent.st_uid == 0 else (parent.st_uid, parent.st_gid)


def write_onion_service_dir(config: Config, identity: NodeIdentity) -> None:
    """The key tor hosts and ``ob_config`` in ``tor.hidden_service_dir`` (see the module doc).

    In system mode the folder is in tor's own folder, where the tor user can plant anything:
    it is opened without following a symlink planted there, only files this daemon creates
    are written (``O_EXCL|O_NOFOLLOW``, relative to the folder's descriptor) and handed to the
    tor user, each on its own descriptor (crypto/keys.py, rustbalance.secure_dir). Only root
    can hand files to tor's user: an unprivileged daemon in system mode leaves the folder to
    ``rustbalance prepare``, which the unit runs as root before it (``ExecStartPre=+``)."""
    hs_dir = config.tor.hidden_service_dir
    if config.tor.mode == "system" and os.geteuid() != 0:
        log.info(
            "Onion service directory %s is the system tor's: `rustbalance prepare` (root) "
            "writes it",
            hs_dir,
        )
        return
    ob_config = ob_config_text(identity.master_address).encode("ascii")
    try:
        write_hidden_service_dir(
            identity.service_key,
            hs_dir,
            extra={OB_CONFIG_FILENAME: ob_config},
            owner=_system_tor_owner(config),
        )
    except UnsafePathError as exc:
        raise StartupError(f"tor.hidden_service_dir: {exc}") from None
    except (InvalidKeyError, OSError) as exc:
        raise StartupError(f"cannot write hidden service directory {hs_dir}: {exc}") from None
    if identity.mode == "instance":
        log.info(
            "Wrote onion service directory %s (instance %s of master %s)",
            hs_dir,
            identity.service_address,
            identity.master_address,
        )
    else:
        log.info("Wrote onion service directory %s (master %s)", hs_dir, identity.master_address)


def system_include(config: Config, identity: NodeIdentity, settings: OnionServiceSettings) -> str:
    """The system-mode include (``tor.torrc_include``): the onion service, then
    ``tor.extra_torrc``."""
    text = system_include_text(settings, identity.master_address)
    return text + "".join(f"{line}\n" for line in config.tor.extra_torrc)


def write_system_include(config: Config, text: str) -> None:
    """Write ``tor.torrc_include`` unless it already holds ``text`` (``rustbalance prepare``
    wrote it as root for an unprivileged daemon, which cannot write tor's folder)."""
    include = config.tor.torrc_include
    if include is None:
        raise StartupError("tor.torrc_include: system mode needs it", EXIT_CONFIG)
    try:
        if include.read_text() == text:
            log.info("Tor include %s is up to date", include)
            return
    except (OSError, UnicodeDecodeError):
        pass
    try:
        # The include holds no secret; the system tor (another user) must read it.
        write_file(include, text, 0o644)
    except OSError as exc:
        raise StartupError(
            f"cannot write tor include {include}: {exc.strerror or exc} (as an unprivileged "
            "user, run `rustbalance prepare` as root first; proxy.listen_unix or a fixed "
            "proxy.listen_port keeps the include the same across starts)"
        ) from None
    log.info("Wrote tor include %s", include)


def onion_service_settings(
    config: Config, proxy_port: int, *, publish_descriptors: bool
) -> OnionServiceSettings:
    """The onion service's torrc settings; ``publish_descriptors`` is tor's native publishing
    at start (the cluster-mode state machine decides it)."""
    tor = config.tor
    listen = config.proxy.listen_host
    return OnionServiceSettings(
        hidden_service_dir=str(tor.hidden_service_dir),
        proxy_port=proxy_port,
        virtual_port=config.proxy.virtual_port,
        # tor connects to the proxy; a wildcard listen address is reached on loopback.
        proxy_host="127.0.0.1" if listen in ("0.0.0.0", "::", "") else listen,
        num_intro_points=tor.num_intro_points,
        onionbalance_instance=True,
        publish_descriptors=publish_descriptors,
        pow=PowSettings(tor.pow_queue_rate, tor.pow_queue_burst) if tor.pow_enabled else None,
        intro_dos=(
            IntroDosSettings(tor.intro_dos_rate_per_sec, tor.intro_dos_burst_per_sec)
            if tor.intro_dos_enabled
            else None
        ),
        front_door=FrontDoorSettings(
            proxy_unix=str(unix) if (unix := config.proxy.listen_unix) else None,
            export_circuit_id=config.proxy.export_circuit_id,
            max_streams=tor.max_streams_per_circuit,
            max_streams_close_circuit=tor.max_streams_close_circuit,
        ),
    )


def log_identity_mode(identity: NodeIdentity, *, clustered: bool) -> None:
    """Instance mode: say which key tor hosts and whether this node can publish."""
    if identity.mode != "instance":
        return
    log.info(
        "Identity mode instance: tor hosts %s; %s",
        identity.service_address,
        "master key present (publisher-eligible)"
        if identity.master_key is not None
        else "no master key (never publishes)",
    )
    if identity.master_key is None and not clustered:
        log.warning("No master key and no peers: nobody publishes %s here", identity.master_address)
