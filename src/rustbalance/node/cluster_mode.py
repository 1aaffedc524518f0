"""Cluster mode: who publishes, and whether tor publishes natively (a pure state machine).

The caller passes the time (monotonic seconds) and what it observed; the machine returns
actions for the shell (:mod:`rustbalance.node.cluster_loop`) to carry out. Rules:

- A node without the master key never publishes (a non-eligible instance node), and neither
  does a revoked node (issue 16: its identity is out of the cluster for good; its tor's native
  publishing of the master descriptor goes off too). A single node
  (no coordination) always does. In a cluster of 2+ live nodes ("multi") the node holding the
  publisher lease publishes. A cluster node left alone ("single") publishes once it has been
  alone for ``alone_after`` (the heartbeat timeout): at start-up, so it hears an existing
  cluster first; after its last peer died, at once (that peer was already silent for a
  timeout).
- With a lease-only backend (``[coordination] backend = "etcd"``) the lease is the whole
  answer: the lease holder publishes, alone or not, and a node never publishes because it
  hears no peer. A node cut off from etcd hears no peer either, and etcd may already have
  handed the lease to another node; the only node registered holds the lease anyway.
- tor's native publishing (``PublishHidServDescriptors``) is on for a single node and a node
  left alone (never with a lease-only backend, for the same reason), off in a cluster (tor's
  own descriptor would replace the merged one). In ``instance`` mode it is always on: tor
  publishes the instance's own descriptor, which never competes with the master's and keeps
  its intro points fresh. In ``shared`` mode with plain backends it is always off: tor's
  master descriptor would lack the backends' intro points.
- Publisher eligibility follows ``node.publisher_eligible`` and tor: a node whose tor is down
  must not hold the lease.
- A node that becomes the publisher republishes at once (failover time is what the election
  already spent, not a debounce on top of it); one that becomes a standby forgets what it
  published and any change it was waiting out. While publisher, a change of the merged
  intro-point set (a peer's intro points changed, a peer died or appeared) that lasts
  ``republish_debounce`` seconds (changes come in bursts) republishes, unless a publish is in
  flight; nothing is republished while there are no intro points at all.
- A standby never publishes. (Whether the node is ready is node/readiness.py's rule.)
"""

from __future__ import annotations

from dataclasses import dataclass

from rustbalance.config import Config
from rustbalance.node.cluster_link import MergeSignature
from rustbalance.node.identity import NodeIdentity

__all__ = [
    "CLUSTER_REPUBLISH_DEBOUNCE_SECS",
    "Action",
    "ClusterMode",
    "ModePolicy",
    "Observed",
    "Republish",
    "RoleChanged",
    "SetEligible",
    "SetNativePublishing",
]

# Republish this long after the merged intro-point set changed (changes come in bursts).
CLUSTER_REPUBLISH_DEBOUNCE_SECS = 1.5


@dataclass(frozen=True)
class ModePolicy:
    """What never changes while the daemon runs."""

    # False for a non-eligible instance node: it has nothing to sign with.
    has_master_key: bool
    # A coordination backend runs (peers configured, learned, a mesh, or etcd).
    clustered: bool
    # tor's own uploads are master descriptors (shared mode).
    native_publishes_master: bool
    # ``master.backends`` is set.
    has_backends: bool
    # ``node.publisher_eligible``.
    publisher_eligible: bool
    # How long a cluster node must be alone before it publishes alone (heartbeat timeout).
    alone_after: float
    republish_debounce: float = CLUSTER_REPUBLISH_DEBOUNCE_SECS
    # The coordination backend's lease is the whole answer (etcd): never publish alone.
    lease_only: bool = False

    @classmethod
    def for_node(cls, config: Config, identity: NodeIdentity, *, clustered: bool) -> ModePolicy:
        return cls(
            has_master_key=identity.master_key is not None,
            clustered=clustered,
            native_publishes_master=identity.native_publishes_master,
            has_backends=bool(config.master.backends),
            publisher_eligible=config.node.publisher_eligible,
            alone_after=config.coordination.heartbeat_timeout_secs,
            lease_only=clustered and config.coordination.backend == "etcd",
        )


@dataclass(frozen=True)
class Observed:
    """One observation of the node and its cluster."""

    # Coordination: 2+ live nodes, and whether we hold the publisher lease.
    is_multi: bool
    holds_lease: bool
    tor_running: bool
    own_intro_points: int
    # What a merged descriptor built now would depend on (cluster_link.merge_signature).
    signature: MergeSignature
    # An upload is in flight (its result will say what was published).
    publishing: bool
    # Coordination says this node was revoked (cluster trust, docs/security.md).
    revoked: bool = False


@dataclass(frozen=True)
class SetNativePublishing:
    """Switch tor's ``PublishHidServDescriptors``; report back with :meth:`native_applied`."""

    on: bool


@dataclass(frozen=True)
class SetEligible:
    """Tell coordination whether we may hold the lease."""

    eligible: bool


@dataclass(frozen=True)
class RoleChanged:
    """We became the publisher (or a standby); ``multi``: in a cluster of 2+ live nodes."""

    publisher: bool
    multi: bool


@dataclass(frozen=True)
class Republish:
    reason: str


Action = SetNativePublishing | SetEligible | RoleChanged | Republish


class ClusterMode:
    """The state machine (see the module doc); every input takes ``now`` (monotonic s)."""

    def __init__(self, policy: ModePolicy) -> None:
        self.policy = policy
        # The PublishHidServDescriptors value last applied to tor (None: never, since start).
        self.native_publishing: bool | None = None
        # What the last successful publish depended on (None: nothing since we became publisher).
        self.published_signature: MergeSignature | None = None
        self._alone_since: float | None = None  # None while peers are live
        self._signature_changed_at: float | None = None
        self._was_publisher = False
        self._eligible = policy.publisher_eligible

    # -- decisions --------------------------------------------------------------------------

    def native_publishing_at_start(self) -> bool:
        """``PublishHidServDescriptors`` in the torrc: a cluster node starts with it off until
        it knows it is alone."""
        if not self.policy.native_publishes_master:
            return True
        return not self.policy.clustered and not self.policy.has_backends

    def _alone_settled(self, now: float, is_multi: bool) -> bool:
        policy = self.policy
        if not policy.clustered or policy.lease_only or is_multi or self._alone_since is None:
            return False
        return now - self._alone_since >= self.policy.alone_after

    def should_publish(
        self, now: float, is_multi: bool, holds_lease: bool, revoked: bool = False
    ) -> bool:
        """Single node: always. Cluster: the lease holder, or a node left alone (never with a
        lease-only backend: :meth:`_alone_settled`); never a revoked node."""
        if not self.policy.has_master_key:
            return False
        if not self.policy.clustered:
            return True
        if revoked:
            return False
        if is_multi:
            return holds_lease
        return holds_lease or self._alone_settled(now, is_multi)

    def native_publishing_wanted(self, now: float, is_multi: bool, revoked: bool = False) -> bool:
        policy = self.policy
        if not policy.native_publishes_master:
            return True
        if policy.has_backends:
            return False
        if not policy.clustered:
            return True
        if revoked:
            return False
        return self._alone_settled(now, is_multi)

    # -- inputs -----------------------------------------------------------------------------

    def begin(self, now: float, is_multi: bool) -> None:
        """The cluster task (re)starts: a node alone waits a whole ``alone_after`` from now."""
        if self._alone_since is None and not is_multi:
            self._alone_since = now

    def native_applied(self, on: bool) -> bool:
        """tor accepted ``PublishHidServDescriptors``; True if that is a change (log it)."""
        changed = on != self.native_publishing
        self.native_publishing = on
        return changed

    def record_published(self, signature: MergeSignature) -> None:
        """A publish succeeded with what ``signature`` describes."""
        self.published_signature = signature

    def step(self, now: float, observed: Observed) -> list[Action]:
        """One look at the cluster; the actions, in the order to carry them out."""
        policy = self.policy
        actions: list[Action] = []
        if observed.is_multi:
            self._alone_since = None
        elif self._alone_since is None:
            # The last peer just expired (silent for a heartbeat timeout already).
            self._alone_since = now - policy.alone_after
        if policy.clustered:
            wanted = self.native_publishing_wanted(now, observed.is_multi, observed.revoked)
            if wanted != self.native_publishing:
                actions.append(SetNativePublishing(wanted))
        eligible = policy.publisher_eligible and observed.tor_running
        if eligible != self._eligible:
            self._eligible = eligible
            actions.append(SetEligible(eligible))
        publishing = self.should_publish(
            now, observed.is_multi, observed.holds_lease, observed.revoked
        )
        has_points = observed.own_intro_points > 0 or bool(observed.signature[2])
        if publishing != self._was_publisher:
            self._was_publisher = publishing
            actions.append(RoleChanged(publishing, observed.is_multi))
            if not publishing:
                self.published_signature = None
                self._signature_changed_at = None
            elif has_points:
                self._signature_changed_at = None
                actions.append(Republish("became publisher"))
        if publishing and not observed.publishing:
            signature = observed.signature
            if signature == self.published_signature:
                self._signature_changed_at = None
            elif self._signature_changed_at is None:
                self._signature_changed_at = now
            elif now - self._signature_changed_at >= policy.republish_debounce:
                self._signature_changed_at = None
                if has_points:
                    actions.append(Republish("cluster intro points changed"))
        return actions
