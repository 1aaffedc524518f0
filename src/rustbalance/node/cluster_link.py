"""The daemon's side of multi-node mode (issue "Multi-node cluster"): small pure helpers.

- :func:`multi_node_wanted`: the daemon runs the coordinator when ``coordination.peers`` is set
  or a peers file from an earlier run lists learned peers (and a cluster token is configured);
- :func:`load_cluster_key`: the :class:`ClusterKey` from ``coordination.cluster_token_path``,
  refusing a file others can read (the token itself is never logged);
- :func:`merge_inputs`: what the publisher merges: its own intro points first, then every live
  peer's (sorted by node id, so every publisher builds the same order), and the
  ``flow-control`` line to carry over;
- :func:`merge_signature`: what a published merged descriptor depends on, so the daemon can
  republish exactly when it changes.

``flow-control``: the coordination protocol (v1) carries intro points only, not the peer's
``flow-control`` line, so the publisher cannot know that every merged node advertises the same.
It is carried over only when the descriptor holds the publisher's own intro points alone;
otherwise it is left out (clients then do not use congestion control on those rendezvous
circuits: slower, never broken). ``pow-params`` is always left out in multi-node mode: every
node's tor has its own PoW seed, so a solution made for one node's seed is dropped by the
others; ``tor.pow_enabled`` is refused in a cluster (config/pow.py, docs/pow.md).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from rustbalance.cluster.coordinator import PEERS_FILE_NAME
from rustbalance.cluster.messages import ClusterKey, CoordinationError
from rustbalance.cluster.peers import load_known_peers
from rustbalance.config import Config
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.errors import ConfigError

__all__ = [
    "MergeSignature",
    "learned_peers",
    "load_cluster_key",
    "merge_inputs",
    "merge_signature",
    "multi_node_wanted",
]

_MAX_TOKEN_BYTES = 4096

# (multi-node?, own auth keys, ((peer id, peer auth keys), ...))
MergeSignature = tuple[bool, frozenset[bytes], tuple[tuple[str, frozenset[bytes]], ...]]


def learned_peers(config: Config) -> int:
    """How many peers the peers file of an earlier run lists (0 if none or unreadable)."""
    path = config.node.state_dir / PEERS_FILE_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return 0
    try:
        return len(load_known_peers(text))
    except CoordinationError:
        return 0


def multi_node_wanted(config: Config) -> bool:
    """Peers configured, or learned earlier and a token to talk to them."""
    if config.is_multi_node:
        return True
    return config.coordination.cluster_token_path is not None and learned_peers(config) > 0


def load_cluster_key(path: Path) -> ClusterKey:
    """The cluster key from the token file; ConfigError (without the token) on any problem."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cluster token {path}: cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"cluster token {path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read "
                f"it; run: chmod 600 {path}"
            )
        token = os.read(fd, _MAX_TOKEN_BYTES + 1)
    finally:
        os.close(fd)
    if len(token) > _MAX_TOKEN_BYTES:
        raise ConfigError(f"cluster token {path}: longer than {_MAX_TOKEN_BYTES} bytes")
    try:
        return ClusterKey(token)
    except CoordinationError as exc:
        raise ConfigError(f"cluster token {path}: {exc}") from None


def merge_inputs(
    own: Sequence[IntroPoint],
    own_flow_control: str | None,
    peers: Mapping[str, Sequence[IntroPoint]],
) -> tuple[list[Sequence[IntroPoint]], str | None]:
    """The instances to merge (own first, then peers by node id) and the flow-control line."""
    instances: list[Sequence[IntroPoint]] = [own]
    instances.extend(peers[node_id] for node_id in sorted(peers) if peers[node_id])
    flow_control = own_flow_control if len(instances) == 1 else None
    return instances, flow_control


def merge_signature(
    multi: bool, own: Sequence[IntroPoint], peers: Mapping[str, Sequence[IntroPoint]]
) -> MergeSignature:
    return (
        multi,
        frozenset(p.auth_key for p in own),
        tuple(
            (node_id, frozenset(p.auth_key for p in peers[node_id]))
            for node_id in sorted(peers)
            if peers[node_id]
        ),
    )
