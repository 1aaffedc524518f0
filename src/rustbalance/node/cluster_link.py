"""The daemon's side of multi-node mode (issue "Multi-node cluster", issue 16): small helpers.

- :func:`multi_node_wanted`: the daemon runs the coordinator when ``coordination.peers`` is set
  or the members file of an earlier run lists other admitted nodes (:func:`coordination_wanted`:
  or the node answers joins);
- :func:`prepare_membership`: the node's own key (made 0600 when missing, e.g. on a node
  upgraded from protocol v2), the saved membership, and - on a node that holds the master key -
  its own admission record, signed again when the config changed what it says (priority,
  eligibility, addresses, WireGuard key). A node without the master key must have been admitted
  by one that has it (``rustbalance join``); otherwise the start fails with a clear message
  (:func:`admission_problem` is the same check for ``rustbalance config check``, which creates
  and signs nothing);
- :func:`merge_inputs`: what the publisher merges: its own intro points first, then every live
  peer's (sorted by node id, so every publisher builds the same order), and the
  ``flow-control`` line to carry over;
- :func:`merge_signature`: what a published merged descriptor depends on, so the daemon can
  republish exactly when it changes.

``flow-control``: the coordination protocol carries intro points only, not the peer's
``flow-control`` line, so the publisher cannot know that every merged node advertises the same.
It is carried over only when the descriptor holds the publisher's own intro points alone;
otherwise it is left out (clients then do not use congestion control on those rendezvous
circuits: slower, never broken). ``pow-params`` is always left out in multi-node mode: every
node's tor has its own PoW seed, so a solution made for one node's seed is dropped by the
others; ``tor.pow_enabled`` is refused in a cluster (config/pow.py, docs/pow.md).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rustbalance.cluster.authority import NO_GRANT, AdmissionRecord, Statement, WireGuardIdentity
from rustbalance.cluster.coordinator import MEMBERS_FILE_NAME, load_membership_file
from rustbalance.cluster.identity import NodeKey, load_node_key, load_or_create_node_key
from rustbalance.cluster.membership import Membership
from rustbalance.cluster.wire import CoordinationError
from rustbalance.cluster.wireguard import WireGuardError, load_or_create_private_key, public_key_of
from rustbalance.config import Config
from rustbalance.crypto.keys import IdentityKey
from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.errors import ConfigError, InvalidKeyError
from rustbalance.node.clock import Clock
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.mesh import mesh_wants_cluster

__all__ = [
    "MergeSignature",
    "PreparedMembership",
    "admission_problem",
    "admit",
    "cluster_problem",
    "coordination_wanted",
    "learned_members",
    "merge_inputs",
    "merge_signature",
    "multi_node_wanted",
    "node_key_path",
    "own_admission",
    "prepare_membership",
    "saved_membership",
    "wireguard_identity",
]

log = logging.getLogger(__name__)

# (multi-node?, own auth keys, ((peer id, peer auth keys), ...))
MergeSignature = tuple[bool, frozenset[bytes], tuple[tuple[str, frozenset[bytes]], ...]]


def learned_members(config: Config, master_public: bytes, now_ms: int) -> int:
    """How many *other* admitted nodes the members file of an earlier run lists (0 if none)."""
    path = config.node.state_dir / MEMBERS_FILE_NAME
    membership, _ = load_membership_file(path, master_public, now_ms)
    return sum(1 for r in membership.members() if r.node_id != config.node.id)


def multi_node_wanted(config: Config, master_public: bytes, now_ms: int) -> bool:
    """Peers configured, or other members admitted earlier."""
    return config.is_multi_node or learned_members(config, master_public, now_ms) > 0


def coordination_wanted(config: Config, identity: NodeIdentity, clock: Clock) -> bool:
    """The daemon runs a coordination backend: multi-node (:func:`multi_node_wanted`), or a
    node that answers joins (a joiner may appear any time, node/mesh.py)."""
    now_ms = int(clock.wall() * 1000)
    return multi_node_wanted(config, identity.master_public_key, now_ms) or mesh_wants_cluster(
        config
    )


def wireguard_identity(config: Config) -> WireGuardIdentity | None:
    """This node's place in the WireGuard mesh, as its admission record states it (None when
    the config names no tunnel: a cluster on plain UDP)."""
    wg = config.wireguard
    if wg.private_key_path is None or wg.address is None or wg.endpoint is None:
        return None
    try:
        private = load_or_create_private_key(wg.private_key_path)
        public = base64.b64decode(public_key_of(private))
        return WireGuardIdentity(public, str(wg.endpoint), str(wg.address.ip))
    except (WireGuardError, OSError, UnicodeDecodeError, CoordinationError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"wireguard.private_key_path: {message}") from None


def own_admission(
    config: Config,
    node_key: NodeKey,
    wireguard: WireGuardIdentity | None,
    now_ms: int,
) -> AdmissionRecord:
    """The record a master-key holder signs for itself, from its config (pure)."""
    coordination = config.coordination.advertise or config.coordination.listen
    return AdmissionRecord(
        node_id=config.node.id,
        node_key=node_key.public,
        issued_at_ms=now_ms,
        priority=config.node.priority,
        publisher_eligible=config.node.publisher_eligible,
        holds_master_key=True,
        coordination=str(coordination),
        wireguard=wireguard,
        grant_id=NO_GRANT,
        grant_expires_at=0,
        issuer=config.node.id,
    )


def _same_terms(a: AdmissionRecord, b: AdmissionRecord) -> bool:
    """Whether two records say the same (everything but when and by whom they were signed)."""
    return (
        a.node_key,
        a.priority,
        a.publisher_eligible,
        a.holds_master_key,
        a.coordination,
        a.wireguard,
    ) == (
        b.node_key,
        b.priority,
        b.publisher_eligible,
        b.holds_master_key,
        b.coordination,
        b.wireguard,
    )


@dataclass(frozen=True)
class PreparedMembership:
    node_key: NodeKey
    membership: Membership
    created_key: bool  # the node key was made just now
    signed_own: Statement | None  # our own record, when it was (re-)signed just now


def prepare_membership(
    config: Config,
    master_public: bytes,
    master_key: IdentityKey | None,
    now_ms: int,
) -> PreparedMembership:
    """The node key (made 0600 when missing), the membership and (key holders) our own record;
    ConfigError (no secret in the message) when this node cannot take part."""
    path = node_key_path(config)
    try:
        node_key, created = load_or_create_node_key(path)
    except InvalidKeyError as exc:
        raise ConfigError(f"node.node_key_path: {exc}") from None
    if created:
        log.info("Made this node's cluster key %s (%s)", node_key.fingerprint, path)
    membership = saved_membership(config, master_public, now_ms, warn=True)
    wireguard = wireguard_identity(config) if master_key is not None else None
    signed = admit(config, node_key, membership, master_key, wireguard, now_ms)
    return PreparedMembership(node_key, membership, created, signed)


def node_key_path(config: Config) -> Path:
    return config.node.node_key_path or config.node.state_dir / "keys" / "node.key"


def saved_membership(
    config: Config, master_public: bytes, now_ms: int, *, warn: bool = False
) -> Membership:
    """The membership of the members file (damaged entries skipped, ``warn``: logged)."""
    members_file = config.node.state_dir / MEMBERS_FILE_NAME
    membership, problems = load_membership_file(members_file, master_public, now_ms)
    if warn:
        for problem in problems:
            log.warning("%s", problem)
    return membership


def admit(
    config: Config,
    node_key: NodeKey,
    membership: Membership,
    master_key: IdentityKey | None,
    wireguard: WireGuardIdentity | None,
    now_ms: int,
) -> Statement | None:
    """Make sure ``membership`` admits this node with ``node_key``: a master-key holder signs
    its own record again when the config changed what it says (returned); any other node must
    have been admitted by one. ConfigError (no secret in the message) otherwise."""
    signed: Statement | None = None
    current = membership.member(config.node.id)
    if master_key is not None:
        wanted = own_admission(config, node_key, wireguard, now_ms)
        if current is None or not _same_terms(current, wanted):
            statement = Statement.sign(wanted, master_key.sign)
            applied = membership.apply(statement, now_ms)
            if not applied.changed:
                raise ConfigError(
                    f"node {config.node.id}: cannot admit itself ({applied.outcome.value}): "
                    + (
                        "its node key was revoked; move the key file away to make a new one"
                        if membership.is_revoked(node_key.public)
                        else "a newer admission record exists for this node id"
                    )
                )
            signed = statement
    own = membership.member(config.node.id)
    if own is None or own.node_key != node_key.public:
        raise ConfigError(
            f"node {config.node.id} is not admitted to the cluster with its node key "
            f"{node_key.fingerprint}: join with a join token (rustbalance join), or on a node "
            "that holds the master key, admit it (docs/security.md)"
        )
    return signed


def admission_problem(
    config: Config, master_public: bytes, master_key: IdentityKey | None, now_ms: int
) -> str | None:
    """What would keep this node out of its cluster at start (``rustbalance config check``):
    like :func:`prepare_membership`, but nothing is created, signed into a file or logged."""
    path = node_key_path(config)
    if not (path.exists() or path.is_symlink()):
        if master_key is not None:
            return None  # made at the first start; the node then admits itself
        return (
            f"node.node_key_path: {path} does not exist: node {config.node.id} is not admitted "
            "to the cluster; join with a join token (rustbalance join, docs/security.md)"
        )
    try:
        node_key = load_node_key(path)
    except InvalidKeyError as exc:
        return f"node.node_key_path: {exc}"
    membership = saved_membership(config, master_public, now_ms)
    try:
        # The WireGuard key may not exist yet (the daemon makes it): the record's other terms
        # decide whether this node can be admitted.
        admit(config, node_key, membership, master_key, None, now_ms)
    except ConfigError as exc:
        return str(exc)
    return None


def cluster_problem(config: Config, master_key: IdentityKey | None, now_ms: int) -> str | None:
    """:func:`admission_problem` for a node of an embedded-coordination cluster (configured,
    answering joins, or with members admitted earlier), None for any other node: what
    ``rustbalance config check`` reports and ``run`` refuses before it writes anything."""
    if config.coordination.backend == "etcd":
        return None  # etcd knows a node by its TLS client certificate (docs/etcd.md)
    if master_key is not None:
        master_public = master_key.public_key
    elif config.master.onion_address is not None:
        master_public = decode_onion_address(config.master.onion_address)
    else:  # the parser requires one of the two
        return None
    if not (multi_node_wanted(config, master_public, now_ms) or mesh_wants_cluster(config)):
        return None
    return admission_problem(config, master_public, master_key, now_ms)


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
