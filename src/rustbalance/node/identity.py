"""Which key goes where: the node identity modes (issue "Multi-node cluster", tor.md §10-§11).

- ``shared`` (the original design): the node's tor hosts the master key in its
  ``HiddenServiceDir``; its own descriptor *is* a master descriptor, and the node needs the
  master key to start.
- ``instance`` (Onionbalance-style): the node's tor hosts the node's own key, with
  ``HiddenServiceOnionbalanceInstance 1`` and an ``ob_config`` naming the master address. tor
  then accepts INTRODUCE2 cells made with the master's subcredentials of the previous, current
  and next time period on every intro point, besides its own (tor.md §11). The node reads its
  intro points from its own descriptor (``hs/service/desc/id/<own address>``); only a node that
  may become the publisher signs master descriptors, so only such a node needs the master key.

:func:`resolve_identity` is pure (keys in, decision out); :func:`load_or_create_instance_key`
is the small file shell that reads or generates the node's own key (0600 in a 0700 folder).
"""

from __future__ import annotations

import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rustbalance.config import Config
from rustbalance.config.identity_mode import IdentityMode
from rustbalance.crypto.keys import IdentityKey, load_identity_key, write_seed_key_file
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.errors import ConfigError, InvalidKeyError, UnsafePathError
from rustbalance.secure_dir import ensured_dir

__all__ = [
    "NodeIdentity",
    "default_instance_key_path",
    "load_or_create_instance_key",
    "master_key_needed",
    "resolve_identity",
]


@dataclass(frozen=True)
class NodeIdentity:
    """What the daemon hosts and what it may sign."""

    mode: IdentityMode
    # Lower-case ``<56 chars>.onion`` of the master (what clients use).
    master_address: str
    # The master key, None for a non-publisher-eligible instance node (it never signs).
    master_key: IdentityKey | None
    # The key written into the node's HiddenServiceDir: the master key (shared) or the node's
    # own key (instance).
    service_key: IdentityKey

    @property
    def service_address(self) -> str:
        """The address tor hosts: its own descriptor (intro points) is read under this one."""
        return self.service_key.onion_address

    @property
    def master_public_key(self) -> bytes:
        return decode_onion_address(self.master_address)

    @property
    def native_publishes_master(self) -> bool:
        """Whether tor's own uploads are master descriptors (shared mode only): in instance
        mode tor publishes the instance's descriptor, which never replaces the master's."""
        return self.mode == "shared"


def master_key_needed(config: Config) -> bool:
    """Shared mode always; instance mode only on a node that may become the publisher (the
    mode the node runs in: ``Config.identity_mode``, the default when left out)."""
    return config.identity_mode == "shared" or config.node.publisher_eligible


def default_instance_key_path(config: Config) -> Path:
    return config.node.instance_key_path or config.node.state_dir / "keys" / "instance.key"


def resolve_identity(
    config: Config, master_key: IdentityKey | None, instance_key: IdentityKey | None
) -> NodeIdentity:
    """The node's identity from its config and the keys loaded for it.

    Raises :class:`ConfigError` naming the problem: a key missing for the mode, a master
    address that does not match the key, a backend or instance key that is the master itself.
    """
    mode = config.identity_mode
    stated = config.master.onion_address
    if master_key is None and master_key_needed(config):
        raise ConfigError(
            "master.identity_key_path: the master key is required "
            + ("in shared mode" if mode == "shared" else "on a publisher-eligible instance")
        )
    if master_key is not None:
        address = master_key.onion_address
        if stated is not None and stated.lower() != address:
            raise ConfigError(
                f"master.onion_address is {stated}, but the master key is for {address}: "
                "wrong key file?"
            )
    elif stated is not None:
        address = stated.lower()
    else:
        raise ConfigError("master.onion_address: required without a master key")
    if address in config.master.backends:
        raise ConfigError(f"master.backends: {address} is the master address itself")
    if mode == "shared":
        assert master_key is not None  # checked above
        return NodeIdentity(mode, address, master_key, master_key)
    if instance_key is None:
        raise ConfigError("node.instance_key_path: instance mode needs the node's own key")
    if instance_key.onion_address == address:
        raise ConfigError(
            "node.instance_key_path: the instance key is the master key; in instance mode "
            "each node's tor hosts its own key"
        )
    if instance_key.onion_address in config.master.backends:
        raise ConfigError(
            f"master.backends: {instance_key.onion_address} is this node's own instance "
            "address (its intro points are merged already)"
        )
    return NodeIdentity(mode, address, master_key, instance_key)


def load_or_create_instance_key(
    path: Path,
    randbytes: Callable[[int], bytes] = secrets.token_bytes,
    *,
    owner: tuple[int, int] | None = None,
) -> tuple[IdentityKey, bool]:
    """The node's own key from ``path``, generated (seed, 0600, folder 0700) when missing.

    Returns (key, created). Refuses a key file others can read (InvalidKeyError); the key
    itself is never logged, only its address. ``owner`` (uid, gid): a key created by root for
    the daemon's user (``rustbalance prepare``) is that user's, folder and file, given on
    their descriptors.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        try:
            # An existing folder others can enter is tightened, as tor does for its key
            # folders; it is opened without following a symlink (rustbalance.secure_dir).
            with ensured_dir(path.parent, mode=0o700, owner=owner) as dir_fd:
                key = IdentityKey.generate(randbytes)
                write_seed_key_file(key, path.name, dir_fd=dir_fd, owner=owner)
        except (OSError, UnsafePathError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise InvalidKeyError(f"instance key folder {path.parent}: {detail}") from None
        return key, True
    except OSError as exc:
        raise InvalidKeyError(f"instance key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidKeyError(
            f"instance key {path}: mode {stat.S_IMODE(mode):04o} lets others read it; "
            f"run: chmod 600 {path}"
        )
    return load_identity_key(path), False
