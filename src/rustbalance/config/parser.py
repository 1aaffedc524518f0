"""TOML text -> validated :class:`Config`, reporting every problem at once.

Each section is read by walking its declared keys (``schema.py``): the key's reader converts
the value or names the problem, a missing key takes its default (or the default derived from
other keys), and a key related to an earlier one is compared with it. Problems are collected,
one per line, each naming its key (``tor.mode: must be 'managed' or 'system', got 'foo'``), so
the operator sees every mistake at once. Unknown sections and keys are errors, with a
did-you-mean hint: a misspelt key silently falling back to its default is how the original
shipped configs that did not do what their authors thought. The rules that relate keys of
different sections follow the sections, below.

No I/O besides reading the config file in :func:`load_config`: key files are only
named here; the daemon opens (and checks the permissions of) them when it starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rustbalance.config.identity_mode import cluster_identity_problem
from rustbalance.config.keys import Derived, Invalid, InvalidItems, describe, key_of
from rustbalance.config.pow import pow_refusal
from rustbalance.config.schema import MAX_UNIX_SOCKET_PATH, Config, socket_path_problem
from rustbalance.errors import ConfigError

__all__ = ["SECTIONS", "ConfigProblems", "load_config", "parse_config"]

# Section name -> its class, in the order they are read (later sections may look at earlier ones).
SECTIONS: dict[str, type] = typing.get_type_hints(Config)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigProblems(ConfigError):
    """A config that cannot be used; ``problems`` holds one message per mistake.

    ``str()`` is the problems one per line, each prefixed with ``source`` when known.
    """

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + problem for problem in self.problems))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; relative paths in it are resolved against its folder."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigProblems(
            [f"cannot read config file: {exc.strerror or exc}"], str(file)
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigProblems([f"config file is not UTF-8 (line {line})"], str(file)) from None
    try:
        return parse_config(text, file.absolute().parent)
    except ConfigProblems as exc:
        raise ConfigProblems(exc.problems, str(file)) from None


def parse_config(text: str, base_dir: str | os.PathLike[str]) -> Config:
    """Parse TOML text into a :class:`Config`; raise :class:`ConfigProblems` listing every
    problem. Relative paths are resolved against ``base_dir``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigProblems([f"TOML syntax error: {exc}"]) from None
    except RecursionError:
        # tomllib recurses on nested arrays and inline tables.
        raise ConfigProblems(["TOML syntax error: values nested too deeply"]) from None
    except ValueError as exc:  # e.g. lone surrogates; tomllib documents only TOMLDecodeError
        raise ConfigProblems([f"TOML syntax error: {exc}"]) from None
    problems: list[str] = []
    for name in document:
        if name not in SECTIONS:
            hint = difflib.get_close_matches(name, SECTIONS, n=1)
            suffix = f" (did you mean '[{hint[0]}]'?)" if hint else ""
            problems.append(f"[{_key_name(name)}]: unknown section{suffix}")
    base = Path(base_dir).absolute()
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        reader = _SectionReader(name, document.get(name, {}), problems)
        built[name] = reader.read(cls, base, built)
    config = Config(**built)
    _check_master_key(config, problems)
    _check_identity_mode(config, problems)
    if not problems:
        _check_listeners(built, problems)
        _check_pow(config, problems)
    if problems:
        raise ConfigProblems(problems)
    return config


def _key_name(key: str) -> str:
    """A key as the operator would write it: quoted (and escaped) unless it is a bare key, so
    a key holding a newline cannot break the one-problem-per-line output."""
    return key if _BARE_KEY.fullmatch(key) else ascii(key)


class _SectionReader:
    """Reads one section's table by its declared keys; records problems and failed keys."""

    def __init__(self, name: str, table: object, problems: list[str]) -> None:
        self.name = name
        self.problems = problems
        self.failed: set[str] = set()
        if not isinstance(table, dict):
            problems.append(f"{name}: must be a table ([{name}] section), got {describe(table)}")
            table = {}
        self.table: Mapping[str, object] = table

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.name}.{key}: {message}")
        self.failed.add(key)

    def ok(self, *keys: str) -> bool:
        """True if none of ``keys`` had a problem (checks relating keys skip failed ones)."""
        return not self.failed.intersection(keys)

    def read(self, cls: type, base: Path, built: Mapping[str, Any]) -> Any:
        fields = dataclasses.fields(cls)
        values: dict[str, Any] = {}
        for f in fields:
            values[f.name] = self._read_key(f, base, Derived(values, built))
        _SECTION_CHECKS.get(self.name, _no_check)(self, values, built)
        known = [f.name for f in fields]
        removed: Mapping[str, str] = getattr(cls, "removed_keys", {})
        for key in self.table:
            if key in removed:
                # A key a former protocol had: say what to do, not "unknown key".
                self.problem(key, removed[key])
            elif key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
                self.problems.append(f"{self.name}.{_key_name(key)}: unknown key{suffix}")
        return cls(**values)

    def _read_key(self, f: dataclasses.Field[Any], base: Path, derived: Derived) -> Any:
        """The key's value: read, derived or its default; a problem is recorded, and the
        default (or derived value) returned so that later keys can still be checked."""
        name, declared = f.name, key_of(f)
        present = name in self.table
        if declared.only_if is not None:
            other, wanted, message = declared.only_if
            if derived.own[other] != wanted:
                # With the other key invalid, whether this one belongs is unknown: say nothing.
                if present and self.ok(other):
                    self.problem(name, message)
                return None
        if declared.derive is not None:
            fallback = declared.derive(derived)
        elif f.default is not dataclasses.MISSING:
            fallback = f.default
        else:
            fallback = None
        if not present:
            if declared.required:
                self.problem(name, "is required")
            value = fallback
        else:
            try:
                value = declared.reader.read(self.table[name], base)
            except Invalid as exc:
                self.problem(name, exc.message)
                return fallback
            except InvalidItems as exc:
                for index, message in exc.items:
                    self.problem(f"{name}[{index}]", message)
                self.failed.add(name)
                return fallback if exc.parsed is None else exc.parsed
        # Defaults too: a short interval set alone must not slip under the default timeout.
        relation = declared.relation
        if relation is not None and self.ok(relation.other):
            other = derived.own[relation.other]
            if not relation.holds(value, other):
                self.problem(name, relation.problem(self.name, value, other))
        return value


# --- rules that relate keys ----------------------------------------------------------------


def _no_check(_s: _SectionReader, _values: dict[str, Any], _built: Mapping[str, Any]) -> None:
    """Sections whose keys are independent."""


def _check_node(s: _SectionReader, values: dict[str, Any], _built: Mapping[str, Any]) -> None:
    if s.ok("state_dir", "status_socket"):
        length = len(os.fsencode(values["status_socket"]))
        if length > MAX_UNIX_SOCKET_PATH:
            s.problem(
                "status_socket",
                f"path is {length} bytes; unix socket paths are limited to "
                f"{MAX_UNIX_SOCKET_PATH} (set a shorter node.status_socket)",
            )


def _check_proxy(s: _SectionReader, values: dict[str, Any], _built: Mapping[str, Any]) -> None:
    # One listener: the unix socket unless the file asks for TCP (issue 17's default); a
    # listen_unix set in the file wins over listen_host/listen_port.
    if "listen_unix" not in s.table:
        if "listen_host" in s.table or "listen_port" in s.table:
            values["listen_unix"] = None
        elif s.ok("listen_unix") and (problem := socket_path_problem(values["listen_unix"])):
            s.problem(
                "listen_unix",
                f"{problem} (set a shorter proxy.listen_unix, or listen_port for TCP)",
            )
        return
    unix = values["listen_unix"]
    if unix is not None and s.ok("listen_unix") and (problem := socket_path_problem(unix)):
        s.problem("listen_unix", problem)


def _check_master(s: _SectionReader, values: dict[str, Any], built: Mapping[str, Any]) -> None:
    onion = values["onion_address"]
    for index, backend in enumerate(values["backends"]):
        if backend == onion:
            s.problem(f"backends[{index}]", f"{backend} is the master address itself")


def _check_coordination(
    s: _SectionReader, values: dict[str, Any], _built: Mapping[str, Any]
) -> None:
    # One member list for every node: this node's own address in it is left out.
    own = {values["listen"], values["advertise"]}
    values["peers"] = tuple(endpoint for endpoint in values["peers"] if endpoint not in own)
    if values["backend"] == "etcd" and values["peers"] and s.ok("backend"):
        # Two coordinations at once would elect two publishers.
        s.problem("peers", "must be empty with backend = 'etcd' (etcd knows the members)")


def _check_wireguard(s: _SectionReader, values: dict[str, Any], _built: Mapping[str, Any]) -> None:
    if values["enabled"]:
        for key in ("private_key_path", "address"):
            if values[key] is None and s.ok(key):
                s.problem(key, "is required when wireguard.enabled = true")


def _check_join(s: _SectionReader, values: dict[str, Any], built: Mapping[str, Any]) -> None:
    master, wireguard = built["master"], built["wireguard"]
    coordination, proxy = built["coordination"], built["proxy"]
    network, address = values["tunnel_network"], wireguard.address
    if network is not None and address is not None and address.ip not in network:
        s.problem(
            "tunnel_network",
            f"{network} does not contain this node's wireguard.address {address.ip}",
        )
    if not values["enabled"]:
        return
    if master.identity_key_path is None:
        # Admitting a node is signing its admission record with the master key.
        s.problem(
            "enabled",
            "only a node holding the master key (master.identity_key_path) admits joiners; "
            "set join.enabled = false on this node",
        )
    # The join answer describes this node to the joiner: its WireGuard identity and tunnel
    # address (node/join.py PeerInfo), so these must be known even when the tunnel itself is
    # managed outside rustbalance.
    for key in ("private_key_path", "address", "endpoint"):
        reported = any(p.startswith(f"wireguard.{key}:") for p in s.problems)
        if getattr(wireguard, key) is None and not reported:
            s.problems.append(f"wireguard.{key}: is required when join.enabled = true")
    reach = coordination.advertise or coordination.listen
    if reach.host in ("0.0.0.0", "::"):
        # Joiners are told where to send heartbeats; a wildcard is nowhere.
        s.problems.append(
            f"coordination.listen: {reach} is a wildcard address, which joiners cannot "
            "reach; listen on the tunnel address or set coordination.advertise"
        )
    if proxy.mode != "http":
        # The join request is an HTTP POST answered by the proxy itself; tcp mode copies
        # bytes to the target without looking at them.
        s.problems.append(
            f"proxy.mode: must be 'http' when join.enabled = true, got '{proxy.mode}'"
        )


def _check_etcd(s: _SectionReader, values: dict[str, Any], built: Mapping[str, Any]) -> None:
    if built["coordination"].backend != "etcd":
        return  # an [etcd] section the embedded backend ignores
    required = "is required when coordination.backend = 'etcd'"
    if not values["endpoints"] and s.ok("endpoints"):
        s.problem("endpoints", required)
    for key in ("ca_path", "cert_path", "key_path"):
        if values[key] is None and s.ok(key):
            s.problem(key, required)
    if built["join"].enabled:
        # Joins add peers to the embedded coordinator; etcd members are added in etcd (RBAC).
        s.problems.append("join.enabled: must be false with coordination.backend = 'etcd'")


def _reported(problems: list[str], key: str) -> bool:
    return any(p.startswith(f"{key}:") or p.startswith(f"{key}[") for p in problems)


def _check_master_key(config: Config, problems: list[str]) -> None:
    # After every section: which key a node needs follows its identity mode, whose default
    # depends on whether the node is part of a cluster (config/identity_mode.py). Instance
    # mode: only a node that may publish (sign the master descriptor) needs the master key;
    # the others host their own key and need just the master address.
    master, mode = config.master, config.identity_mode
    if master.identity_key_path is not None or _reported(problems, "master.identity_key_path"):
        return
    if mode == "shared" or config.node.publisher_eligible:
        why = "" if mode == "shared" else " (this instance is publisher-eligible)"
        problems.append(f"master.identity_key_path: is required{why}")
    elif master.onion_address is None and not _reported(problems, "master.onion_address"):
        problems.append(
            "master.onion_address: is required without master.identity_key_path (the node's "
            "ob_config names the master address)"
        )


def _check_identity_mode(config: Config, problems: list[str]) -> None:
    # shared with 2+ nodes cannot stay reachable across tor's rotation (issue 14).
    if _reported(problems, "node.identity_mode"):
        return
    problem = cluster_identity_problem(config.identity_mode, config.clustered)
    if problem is not None:
        problems.append(problem)


def _check_listeners(built: Mapping[str, Any], problems: list[str]) -> None:
    # Both are TCP listeners; the coordination socket is UDP and may share a port number.
    proxy, metrics = built["proxy"], built["metrics"]
    if (
        metrics.enabled
        and proxy.listen_unix is None
        and proxy.listen_port != 0
        and proxy.listen_port == metrics.listen.port
        and proxy.listen_host == metrics.listen.host
    ):
        problems.append(f"metrics.listen: {metrics.listen} is also proxy.listen_host:listen_port")


def _check_pow(config: Config, problems: list[str]) -> None:
    # Proof-of-work only where tor writes the master descriptor (config/pow.py).
    if not config.tor.pow_enabled:
        return
    refusal = pow_refusal(
        identity_mode=config.identity_mode,
        peers=config.coordination.peers,
        backends=config.master.backends,
        join_enabled=config.join.enabled,
        etcd=config.coordination.backend == "etcd",
    )
    if refusal:
        problems.append(refusal)


_SECTION_CHECKS = {
    "node": _check_node,
    "master": _check_master,
    "proxy": _check_proxy,
    "coordination": _check_coordination,
    "wireguard": _check_wireguard,
    "join": _check_join,
    "etcd": _check_etcd,
}
