"""``rustbalance import-onionbalance CONFIG.yaml``: take over from Onionbalance.

Onionbalance (v3, torproject/onionbalance ``onionbalance/hs_v3/onionbalance.py``
``load_config_file`` and ``service.py``) reads a YAML file made by ``onionbalance-config``::

    services:
    - key: <master>.key            # PEM PKCS#8 (or tor's hs_ed25519_secret_key); a relative
      instances:                   # path is relative to the config file's folder
      - address: <56 chars>[.onion]
        name: node1                # a label, not used by Onionbalance
      - ...

Each instance is a plain tor onion service with ``HiddenServiceOnionbalanceInstance 1`` and
an ``ob_config`` naming the master: exactly what RustBalance merges as ``[master] backends``.
So one service becomes one RustBalance config for the same master key, its instances the
backends (docs/migrate-from-onionbalance.md): the instances stay as they are, this node
replaces the Onionbalance host (and serves ``--target`` itself too).

The translation (:func:`parse_onionbalance_config`, :func:`translate`) is pure; the shell
reads the files, copies the key (same mode bits, never readable by others), writes the
config (validated by the daemon's own parser) and refuses anything it cannot carry over with
a message naming it: unknown keys (Onionbalance v2 settings among them), v2 addresses,
``onionbalance-config``'s placeholders, an encrypted key, several services without
``--service``.
"""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rustbalance.cli.init_cmd import (
    CONFIG_FILE,
    DEFAULT_CONFIG_DIR,
    DEFAULT_STATE_DIR,
    MASTER_KEY_FILE,
    CliError,
    StagedFiles,
    check_endpoint,
    check_node_id,
    default_node_id,
    ensure_private_dir,
    validated_config,
)
from rustbalance.crypto.keys import IdentityKey, parse_identity_key
from rustbalance.crypto.onion_address import decode_onion_address, encode_onion_address
from rustbalance.errors import InvalidKeyError

__all__ = [
    "OnionbalanceService",
    "parse_onionbalance_config",
    "register",
    "translate",
]

SubParsers = Any

_MAX_CONFIG = 1 << 20
_MAX_KEY = 64 * 1024
# What Onionbalance v3 reads (load_config_file, Service._load_instances); "name" is
# onionbalance-config's label for an instance, kept only in our summary.
_SERVICE_KEYS = frozenset({"key", "instances"})
_INSTANCE_KEYS = frozenset({"address", "name"})
# onionbalance-config writes this where the operator has to put an instance's address.
_PLACEHOLDER = "<Enter the instance onion address here>"
_V2_ADDRESS_CHARS = 16
_V3_ADDRESS_CHARS = 56
_MIGRATION_DOC = "docs/migrate-from-onionbalance.md"


@dataclass(frozen=True)
class OnionbalanceInstance:
    address: str  # canonical: lower case, with .onion
    name: str | None


@dataclass(frozen=True)
class OnionbalanceService:
    key_path: str  # as written in the file
    instances: tuple[OnionbalanceInstance, ...]


def _error(where: str, problem: str) -> CliError:
    return CliError(f"{where}: {problem}")


def _instance(item: object, where: str) -> OnionbalanceInstance:
    if not isinstance(item, dict):
        raise _error(where, "must be a mapping with 'address' (and optionally 'name')")
    unknown = sorted(str(k) for k in item if k not in _INSTANCE_KEYS)
    if unknown:
        raise _error(where, f"cannot translate key(s) {', '.join(unknown)}")
    address = item.get("address")
    name = item.get("name")
    if name is not None and not isinstance(name, str | int):
        raise _error(where, "'name' must be text")
    if not isinstance(address, str) or not address.strip():
        raise _error(where, "'address' is missing or empty")
    address = address.strip()
    if address == _PLACEHOLDER:
        raise _error(
            where,
            "'address' is still onionbalance-config's placeholder: enter the instance's onion "
            "address (its tor's HiddenServiceDir/hostname)",
        )
    bare = address.lower().removesuffix(".onion")
    if len(bare) == _V2_ADDRESS_CHARS:
        raise _error(
            where,
            f"{address} is a v2 onion address; tor dropped v2 onion services (0.4.6), "
            "RustBalance balances v3 only",
        )
    if len(bare) != _V3_ADDRESS_CHARS:
        raise _error(where, f"{address!r} is not a v3 onion address (56 characters)")
    try:
        canonical = encode_onion_address(decode_onion_address(bare))
    except InvalidKeyError as exc:
        raise _error(where, f"{address}: {exc}") from None
    return OnionbalanceInstance(canonical, None if name is None else str(name))


def _service(item: object, where: str) -> OnionbalanceService:
    if not isinstance(item, dict):
        raise _error(where, "must be a mapping with 'key' and 'instances'")
    unknown = sorted(str(k) for k in item if k not in _SERVICE_KEYS)
    if unknown:
        raise _error(where, f"cannot translate key(s) {', '.join(unknown)}")
    key = item.get("key")
    if not isinstance(key, str) or not key.strip():
        raise _error(where, "'key' (the master key file) is missing or empty")
    instances = item.get("instances")
    if not isinstance(instances, list) or not instances:
        raise _error(where, "'instances' must list at least one instance")
    parsed = tuple(_instance(x, f"{where}.instances[{i}]") for i, x in enumerate(instances))
    seen: set[str] = set()
    for i, instance in enumerate(parsed):
        if instance.address in seen:
            raise _error(f"{where}.instances[{i}]", f"{instance.address} is listed twice")
        seen.add(instance.address)
    return OnionbalanceService(key.strip(), parsed)


def parse_onionbalance_config(text: str) -> list[OnionbalanceService]:
    """The services of an Onionbalance v3 ``config.yaml``; :class:`CliError` names what is
    wrong or cannot be translated (with its place, e.g. ``services[0].instances[1]``)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CliError(f"not valid YAML{where}") from None
    except RecursionError:
        raise CliError("not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise CliError("not an Onionbalance config: expected a mapping with 'services'")
    unknown = sorted(str(k) for k in data if k != "services")
    if unknown:
        raise CliError(
            f"cannot translate top-level key(s) {', '.join(unknown)} (Onionbalance v3 reads "
            "only 'services'; v2 settings such as REFRESH_INTERVAL have no v3 meaning): "
            "remove them"
        )
    services = data.get("services")
    if not isinstance(services, list) or not services:
        raise CliError("'services' must list at least one service")
    return [_service(item, f"services[{i}]") for i, item in enumerate(services)]


def translate(
    service: OnionbalanceService,
    key: IdentityKey,
    *,
    config_dir: Path,
    node_id: str,
    target: str,
    tor_mode: str,
    state_dir: Path,
    proxy_port: int,
) -> dict[str, Any]:
    """Our config for one Onionbalance service: the same master, its instances as backends."""
    backends = [instance.address for instance in service.instances]
    if key.onion_address in backends:
        raise CliError(
            f"the master address {key.onion_address} is also listed as an instance "
            "(Onionbalance refuses this too: was the frontend configured as an instance?)"
        )
    config: dict[str, Any] = {
        "node": {"id": node_id, "state_dir": str(state_dir)},
        "master": {
            "identity_key_path": str(config_dir / MASTER_KEY_FILE),
            "onion_address": key.onion_address,
            "backends": backends,
        },
        "target": {"address": target},
        "tor": {"mode": tor_mode},
        "proxy": {"listen_port": proxy_port},
    }
    if tor_mode == "managed":
        config["tor"]["data_dir"] = str(state_dir / "tor")
    return config


# --- the shell ------------------------------------------------------------------------------


def register(commands: SubParsers, debug_commands: SubParsers) -> None:
    """Add ``rustbalance import-onionbalance`` (``debug_commands`` is not used)."""
    del debug_commands
    parser = commands.add_parser(
        "import-onionbalance",
        help="write a config that takes over from an Onionbalance config.yaml",
        description=(
            "Read an Onionbalance v3 config.yaml and write a RustBalance config for the same "
            "master key, with its instances as [master] backends (they stay as they are), "
            "and a copy of the key (same permissions). Refuses, with the reason, what it "
            f"cannot translate. See {_MIGRATION_DOC}."
        ),
    )
    parser.add_argument(
        "onionbalance_config", metavar="CONFIG_YAML", help="Onionbalance's config.yaml"
    )
    parser.add_argument(
        "--target",
        required=True,
        help="HOST:PORT (or <56 chars>.onion:PORT) this node serves too, like your instances",
    )
    parser.add_argument(
        "-c",
        "--config-dir",
        default=DEFAULT_CONFIG_DIR,
        help=f"where to write config.toml and master.key (default {DEFAULT_CONFIG_DIR}, 0700)",
    )
    parser.add_argument(
        "--service",
        metavar="ADDRESS",
        help="the master address to import when the config has several services",
    )
    parser.add_argument("--node-id", help="this node's name (default: the host name)")
    parser.add_argument(
        "--tor-mode",
        choices=("system", "managed"),
        default="system",
        help="attach to the system tor (default) or run our own",
    )
    parser.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help=f"daemon state (default {DEFAULT_STATE_DIR})"
    )
    parser.add_argument(
        "--proxy-port", type=int, default=8080, help="local port of the reverse proxy (8080)"
    )
    parser.set_defaults(func=run_import)


def _read_config(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_CONFIG + 1)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_CONFIG:
        raise CliError(f"{path} is far too large for an Onionbalance config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text") from None


def _read_key(path: Path) -> tuple[bytes, int]:
    """The key file's bytes and mode bits, read through one descriptor (no symlinks)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise CliError(f"cannot read the master key {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CliError(f"the master key {path} is not a regular file")
        data = os.read(fd, _MAX_KEY + 1)
    finally:
        os.close(fd)
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise CliError(
            f"the master key {path} has mode {mode:04o}: others may read it, and RustBalance "
            f"refuses such a key; run: chmod 600 {path}"
        )
    if len(data) > _MAX_KEY:
        raise CliError(f"{path} is far too large for a key file")
    return data, mode


def _load_key(path: Path, data: bytes) -> IdentityKey:
    if b"ENCRYPTED PRIVATE KEY" in data:
        raise CliError(
            f"the master key {path} is encrypted with a passphrase, which neither Onionbalance "
            f"nor RustBalance reads; decrypt a copy first: openssl pkey -in {path} -out "
            "<new file> (keep it 0600)"
        )
    try:
        return parse_identity_key(data)
    except InvalidKeyError as exc:
        raise CliError(f"the master key {path}: {exc}") from None


def _choose(
    services: list[OnionbalanceService], keys: list[IdentityKey], wanted: str | None
) -> int:
    addresses = [key.onion_address for key in keys]
    if wanted is None:
        if len(services) > 1:
            raise CliError(
                f"the config has {len(services)} services ({', '.join(addresses)}); a "
                "RustBalance node serves one master: choose it with --service ADDRESS"
            )
        return 0
    try:
        canonical = encode_onion_address(decode_onion_address(wanted))
    except InvalidKeyError as exc:
        raise CliError(f"--service: {exc}") from None
    if canonical not in addresses:
        raise CliError(f"--service {wanted}: not in the config ({', '.join(addresses)})")
    return addresses.index(canonical)


def run_import(args: argparse.Namespace) -> int:
    source = Path(args.onionbalance_config).absolute()
    services = parse_onionbalance_config(_read_config(source))
    target = check_endpoint(args.target, "--target", allow_onion=True)
    node_id = check_node_id(args.node_id or default_node_id())
    if not 0 <= args.proxy_port <= 65535:
        raise CliError("--proxy-port must be 0-65535")
    # Onionbalance reads a relative key path from the config file's folder (service.py).
    key_paths = [source.parent / Path(service.key_path) for service in services]
    read = [_read_key(path) for path in key_paths]
    keys = [_load_key(path, data) for path, (data, _mode) in zip(key_paths, read, strict=True)]
    index = _choose(services, keys, args.service)
    service, key, (key_bytes, key_mode) = services[index], keys[index], read[index]

    config_dir = Path(args.config_dir).absolute()
    config = translate(
        service,
        key,
        config_dir=config_dir,
        node_id=node_id,
        target=target,
        tor_mode=args.tor_mode,
        state_dir=Path(args.state_dir).absolute(),
        proxy_port=args.proxy_port,
    )
    config_text = validated_config(config, config_dir)
    ensure_private_dir(config_dir)
    staged = StagedFiles(config_dir)
    try:
        key_copy = staged.add(MASTER_KEY_FILE, key_bytes)
        staged.add(CONFIG_FILE, config_text)
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    os.chmod(key_copy, key_mode)  # the source's own bits (0600 or stricter, checked above)

    print(f"Master onion address: {key.onion_address}")
    print(f"Master key copied to {key_copy} (mode {key_mode:04o})")
    print(f"Config written to {config_dir / CONFIG_FILE}, with {len(service.instances)} backends:")
    for instance in service.instances:
        label = f" ({instance.name})" if instance.name else ""
        print(f"  {instance.address}{label}")
    print(
        "Next: check it (rustbalance config check), stop onionbalance, start rustbalance: "
        "only one of them may publish the master descriptor. The instances stay as they are "
        "(HiddenServiceOnionbalanceInstance 1 and their ob_config). To run RustBalance on "
        f"the instances too (instance mode, failover between nodes), see {_MIGRATION_DOC}."
    )
    return 0
