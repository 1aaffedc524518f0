"""The single-node daemon: ``rustbalance run --config FILE`` (issue "Node daemon").

Wires the pure cores of :mod:`rustbalance.node` to real I/O. Start-up order (each step needs
the one before):

1. load the master key (refuse a file others can read, docs/config.md; check
   ``master.onion_address`` against it, which catches deploying the wrong key);
2. write the master identity into the node's ``HiddenServiceDir`` (0700 / 0600) and ``ob_config``
   naming the master address: the node's tor runs as an Onionbalance instance of its own
   address, so its intro points accept the master subcredentials of the previous, current and
   next period (tor.md §10-§11, system.md W19);
3. start the reverse proxy first, so its port is known for ``HiddenServicePort``;
4. managed mode: start tor with the generated torrc; system mode: write the include file and
   ``SIGNAL RELOAD`` (the include persists the service across tor restarts, system.md W7);
5. one :class:`ReconnectingController` (cookie auth, or the password from
   ``RUSTBALANCE_TOR_PASSWORD``), kept for the daemon's life (W17);
6. supervised tasks (W14, Phase 2.5): publish loop (Phase 1.4/1.5/2.3), own intro-point tracker,
   consensus watcher, tor watchdog (Phase 1.2), status endpoint, systemd watchdog pings, and,
   when configured, the ``/metrics`` snapshot feeder (``[metrics]``, bound at start-up before
   tor so a taken port fails fast naming ``metrics.listen``) and the target's HTTP health probe
   (``[health] http_probe_enabled``).

Identity modes (node/identity.py): in ``shared`` mode (above) tor hosts the master key; in
``instance`` mode tor hosts the node's own key with the same ``ob_config``, its intro points are
read from its own descriptor (``hs/service/desc/id/<own address>``, HS_DESC events for that
address), tor's native publishing (of the instance descriptor) always stays on, and the
publisher publishes the master descriptor even when alone. A non-eligible instance node loads
no master key and never publishes. Plain tor backends (``master.backends``, node/backends.py)
are fetched and checked by the node that publishes and merged as one more node each.

A single node is the publisher. tor's own publishing stays on: with the same key and tor's OPE
revision counter our descriptor and tor's are comparable, and the newest wins (W6). Uploads are
serialised (the per-HSDir events name the address, not the upload) and one
:class:`RevisionClock` lives as long as the daemon, so counters never repeat.

Multi-node mode (``coordination.peers`` set, or peers learned by an earlier run): a
:class:`~rustbalance.cluster.coordinator.Coordinator` runs in the TaskGroup. The node feeds it its
own intro points and last publish; the ``cluster`` task follows it:

- 2+ live nodes ("multi"): tor's native publishing is off (``PublishHidServDescriptors 0``; in
  the torrc from the start and re-applied after every control reconnect, so a tor restart keeps
  it); only the elected publisher publishes, merging its own and every live peer's intro points
  (:func:`~rustbalance.descriptor.merge.merge_intro_points`: fair round-robin, de-duplicated,
  expiring certificates dropped, ``publish.max_intro_points``) and republishing about 1.5 s after
  the merged set changes (a peer's intro points changed, a peer died or appeared, we became
  publisher), besides the usual triggers (period/SRV, HSDirs, refresh, emergency).
- a node left alone ("single") for a heartbeat timeout (at start-up: so it hears an existing
  cluster first) turns native publishing back on and publishes alone, as a single node does.

All nodes compute tor's revision counter (OPE keyed by the blinded key, seconds since the SRV
run start), so a new publisher's descriptor out-bids the old one's in time order. After each
upload the ``verify`` task fetches the master descriptor back through tor and logs
"Descriptor verified on HSDirs (rev=N)", or republishes (at most 3 times in a row) when the
HSDirs still serve an older revision. ``pow-params`` is never carried in multi-node mode and
``flow-control`` only when the descriptor holds our own intro points alone
(:mod:`rustbalance.node.cluster_link`). On SIGTERM the node leaves the cluster first (a publisher
sends ``lease_release``), then drains the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rustbalance.cluster.coordinator import Coordinator
from rustbalance.cluster.messages import ClusterKey
from rustbalance.config import Config, ConfigProblems, load_config
from rustbalance.crypto.blinding import blind_public_key
from rustbalance.crypto.keys import IdentityKey, load_identity_key, write_hidden_service_dir
from rustbalance.descriptor.builder import PowParams
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.descriptor.intro_point_codec import decode_intro_point, encode_intro_point
from rustbalance.descriptor.merge import merge_intro_points
from rustbalance.descriptor.parser import DecodedDescriptor
from rustbalance.errors import (
    ConfigError,
    ControlError,
    DescriptorError,
    InvalidKeyError,
    RustBalanceError,
    TorProcessError,
)
from rustbalance.node.backend_state import BackendBook
from rustbalance.node.backends import FETCH_TIMEOUT_SECS as BACKEND_FETCH_TIMEOUT_SECS
from rustbalance.node.backends import BackendPoller, probe_onion
from rustbalance.node.cluster_link import (
    MergeSignature,
    load_cluster_key,
    merge_inputs,
    merge_signature,
    multi_node_wanted,
)
from rustbalance.node.health_probe import DEFAULT_START_DELAY_SECS, HealthProber
from rustbalance.node.identity import (
    NodeIdentity,
    default_instance_key_path,
    load_or_create_instance_key,
    master_key_needed,
    resolve_identity,
)
from rustbalance.node.intro_tracker import IntroTracker
from rustbalance.node.mesh import Mesh, MeshError, mesh_wants_cluster
from rustbalance.node.metrics import (
    MetricsServer,
    NodeMetrics,
    proxy_snapshot,
    start_metrics_server,
)
from rustbalance.node.own_descriptor import OwnNextDescriptor
from rustbalance.node.proctitle import set_process_title
from rustbalance.node.publish_policy import (
    PERIODS,
    HsDirResult,
    PeriodResult,
    PublishOutcome,
    PublishSchedule,
    PublishState,
    PublishTrigger,
    run_publish_loop,
)
from rustbalance.node.sdnotify import SystemdNotifier, run_watchdog_pings
from rustbalance.node.status import NodeStatus, PeerStatus, StatusServer
from rustbalance.node.supervisor import ShutdownHook, Supervisor, TaskSpec
from rustbalance.node.torrc import (
    OB_CONFIG_FILENAME,
    FrontDoorSettings,
    IntroDosSettings,
    OnionServiceSettings,
    PowSettings,
    ob_config_text,
    onion_service_torrc,
    system_include_text,
)
from rustbalance.node.watchdog import TorWatchdog, WatchdogPolicy, run_tor_watchdog
from rustbalance.proxy import CircuitLimits, ProxySettings, ReverseProxy, parse_target
from rustbalance.proxy.eventloop import run as run_event_loop
from rustbalance.proxy.fd_limit import raise_nofile_limit
from rustbalance.tor.control import (
    ControlConnection,
    ControlTimeoutError,
    ReconnectingController,
    password_from_env,
)
from rustbalance.tor.control_protocol import ControlProtocolError, ControlReplyError, HsDescEvent
from rustbalance.tor.network import (
    NetworkView,
    PeriodLabel,
    PeriodPublish,
    RevisionClock,
    fetch_descriptor,
    publish_master,
    read_network_view,
    read_own_descriptor,
)
from rustbalance.tor.process import ManagedTor, SystemTor, TorProcess, pick_free_ports

__all__ = ["EXIT_CONFIG", "EXIT_RUNTIME", "Daemon", "StartupError", "load_node", "run_node"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2

# How often the own descriptor is re-read even without HS_DESC events (issue: every 15-30 s).
INTRO_POLL_SECS = 20.0
# tor emits CREATED, then one UPLOAD per HSDir: read once, shortly after the burst.
INTRO_EVENT_DEBOUNCE_SECS = 1.0
# Instance mode, segment B: HSFETCH of our own desc_next (own_descriptor.py).
OWN_FETCH_TIMEOUT_SECS = 20.0
# How often the consensus valid-after is checked (a new consensus may move the period, the SRV
# or the HSDir ring; 20 s voting on the test network, 1 h live).
NETWORK_POLL_SECS = 10.0
# Drop intro points whose certificates expire within this many seconds.
INTRO_MIN_VALIDITY_SECS = 60
# How long to wait for the control session when one is needed (reconnects back off <= 5 s).
CONTROL_WAIT_SECS = 30.0
# A tor whose process lives but whose control port has not given us a working session for this
# many watchdog intervals is hung (SIGSTOP, a deadlock, swapped out): the watchdog restarts it.
# Two intervals, so one slow reconnect (commands time out after 10 s) is never mistaken for it.
TOR_HUNG_INTERVALS = 2.0
# tor events that mean tor built or is uploading a new descriptor of its own (tor.md §9.4);
# our own HSPOSTs come without UPLOAD and with auth type UNKNOWN (tor.md §9.3).
_OWN_DESCRIPTOR_ACTIONS = frozenset({"CREATED", "UPLOAD", "UPLOADED"})
# Multi-node: how often the cluster task looks at the coordinator (it also wakes on changes).
CLUSTER_POLL_SECS = 0.5
# Republish this long after the merged intro-point set changed (changes come in bursts).
CLUSTER_REPUBLISH_DEBOUNCE_SECS = 1.5
# Fetch the master descriptor back this long after an upload, waiting at most the timeout.
VERIFY_DELAY_SECS = 2.0
VERIFY_FETCH_TIMEOUT_SECS = 30.0
VERIFY_MAX_REPUBLISHES = 3
# How often the metrics snapshot is rebuilt from the daemon's state (scrapes read the latest).
METRICS_UPDATE_SECS = 5.0
# The metrics exporter keeps at most this many HSDirs' last upload result (the newest ones).
METRICS_MAX_HSDIRS = 64


# (time period, SRV, responsible HSDir fingerprints) of the first and second descriptor.
Ring = tuple[tuple[int, bytes, tuple[str, ...]], ...]


class StartupError(RustBalanceError):
    """The daemon cannot start; ``exit_code`` 2 = configuration or key, 1 = runtime."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- start-up checks


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


def load_identity(config: Config) -> NodeIdentity:
    """The keys of ``node.identity_mode`` (identity.py): the master key when this node needs
    it, the node's own instance key (generated if missing) in instance mode."""
    master = None
    if master_key_needed(config) or config.master.identity_key_path is not None:
        master = load_master_key(config)
    instance = None
    if config.node.identity_mode == "instance":
        path = default_instance_key_path(config)
        try:
            instance, created = load_or_create_instance_key(path)
        except InvalidKeyError as exc:
            raise StartupError(f"node.instance_key_path: {exc}", EXIT_CONFIG) from None
        if created:
            log.info("Generated this node's instance key %s (%s)", path, instance.onion_address)
    try:
        return resolve_identity(config, master, instance)
    except ConfigError as exc:
        raise StartupError(str(exc), EXIT_CONFIG) from None


def load_node(config_path: str | os.PathLike[str]) -> tuple[Config, NodeIdentity]:
    """Load and validate the config and the keys; StartupError(exit 2) on any problem."""
    try:
        config = load_config(config_path)
    except ConfigProblems as exc:
        problems = "; ".join(exc.problems)
        raise StartupError(f"invalid config {config_path}: {problems}", EXIT_CONFIG) from None
    except ConfigError as exc:
        raise StartupError(f"invalid config {config_path}: {exc}", EXIT_CONFIG) from None
    return config, load_identity(config)


def _write_file(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _adopt_owner(directory: Path) -> None:
    """System mode as root: tor refuses a HiddenServiceDir it does not own, so give the
    directory to the owner of its parent (e.g. debian-tor for /var/lib/tor)."""
    if os.geteuid() != 0:
        return
    parent = directory.parent.stat()
    if parent.st_uid == 0:
        return
    for item in (directory, *directory.iterdir()):
        os.chown(item, parent.st_uid, parent.st_gid)


# ----------------------------------------------------------------------------- the daemon


def _hsdir_label(hsdir: str) -> str:
    """``$FINGERPRINT~nickname`` (status form) -> ``FINGERPRINT`` (a metric label value)."""
    return hsdir.removeprefix("$").split("~", 1)[0].split("=", 1)[0] or "unknown"


class _PublishCounters:
    """Monotonic publish totals for metrics: per period and per HSDir upload."""

    def __init__(self) -> None:
        self.periods: dict[str, dict[str, int]] = {}
        self.hsdir_uploads = {"ok": 0, "failed": 0}
        self.hsdir_last: OrderedDict[str, bool] = OrderedDict()

    def record(self, outcome: PublishOutcome) -> None:
        for period, result in outcome.items():
            counts = self.periods.setdefault(str(period), {"ok": 0, "failed": 0})
            counts["ok" if result.ok else "failed"] += 1
            for hsdir in result.hsdirs:
                self.hsdir_uploads["ok" if hsdir.ok else "failed"] += 1
                label = _hsdir_label(hsdir.hsdir)
                self.hsdir_last[label] = hsdir.ok
                self.hsdir_last.move_to_end(label)
                while len(self.hsdir_last) > METRICS_MAX_HSDIRS:
                    self.hsdir_last.popitem(last=False)

    def record_failure(self) -> None:
        """A round that raised: the publish loop counts it as failed for every period."""
        self.record({p: PeriodResult(ok=False) for p in PERIODS})


class _GuardedTor:
    """The watchdog's view of tor: during shutdown tor is stopped on purpose, so it must not
    be "restarted" by the watchdog; ``running`` is the last observed state for status."""

    def __init__(
        self,
        tor: TorProcess,
        *,
        connected: Callable[[], bool] | None = None,
        hung_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tor = tor
        self.shutting_down = False
        self.running = True
        # Lost control port (system.md §12): the process runs, the control port does not answer.
        self._connected = connected
        self._hung_after = hung_after
        self._clock = clock
        self._disconnected_since: float | None = None

    @property
    def last_method(self) -> str | None:
        method = getattr(self.tor, "last_method", None)
        return method if isinstance(method, str) else None

    async def is_running(self) -> bool:
        if self.shutting_down:
            return True
        alive = await self.tor.is_running()
        if alive and self._hung():
            alive = False
        self.running = alive
        return self.running

    def _hung(self) -> bool:
        """True once the control session has been down for ``hung_after`` s while the
        process lives (its commands time out, so the controller keeps reconnecting)."""
        if self._connected is None or self._hung_after is None or self._connected():
            self._disconnected_since = None
            return False
        now = self._clock()
        if self._disconnected_since is None:
            self._disconnected_since = now
            return False
        silent = now - self._disconnected_since
        if silent < self._hung_after:
            return False
        log.warning(
            "Tor is running but its control port has not answered for %.0f s: treating it as hung",
            silent,
        )
        return True

    async def restart(self) -> str | None:
        if self.shutting_down:
            return None
        await self.tor.restart()
        self.running = True
        self._disconnected_since = None
        if isinstance(self.tor, ManagedTor):
            return "managed process"
        return self.last_method


class Daemon:
    """One node: start with :meth:`run`, which returns the process exit code."""

    def __init__(
        self,
        config: Config,
        key: IdentityKey | NodeIdentity,
        *,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        # A bare key is the shared mode (the key tor hosts is the master key).
        identity = (
            key
            if isinstance(key, NodeIdentity)
            else NodeIdentity("shared", key.onion_address, key, key)
        )
        self.identity = identity
        # The master key: None on an instance node that never publishes.
        self.key: IdentityKey | None = identity.master_key
        self.address = identity.master_address
        # tor's own service (intro points, HS_DESC events): the master in shared mode, the
        # node's own instance address in instance mode.
        self.service_address = identity.service_address
        self._bare = self.service_address.removesuffix(".onion")
        self.backends: BackendPoller | None = None
        self._own_next = OwnNextDescriptor()
        self._socks: tuple[str, int] | None = None
        self.notifier = notifier or SystemdNotifier()
        self.intro = IntroTracker()
        self.publish_state = PublishState()
        pub = config.publish
        self.schedule = PublishSchedule(
            refresh_interval=pub.refresh_interval_secs, max_age=pub.descriptor_max_age_secs
        )
        self.trigger = PublishTrigger(self.schedule)
        self.revision_clock = RevisionClock()
        self.watchdog = TorWatchdog(
            WatchdogPolicy(
                check_interval=config.tor.watchdog_interval_secs,
                restart_timeout=config.tor.bootstrap_timeout_secs + 30.0,
            )
        )
        self.view: NetworkView | None = None
        self.proxy: ReverseProxy | None = None
        self.tor: TorProcess | None = None
        self.guarded_tor: _GuardedTor | None = None
        self.ctrl: ReconnectingController | None = None
        self.status_server: StatusServer | None = None
        self.published_intro_points = 0
        self.ready = False
        self.started_at = time.monotonic()
        self._upload_lock = asyncio.Lock()
        self._intro_wakeup = asyncio.Event()
        self._published_ring: Ring | None = None
        self._fired_ring: Ring | None = None
        self._first_wait_over = False
        self._proxy_closed = False
        self._tor_stopped = False
        # Multi-node mode (None: a single node for good).
        self.multi_node = multi_node_wanted(config) or mesh_wants_cluster(config)
        # [join] / [wireguard] (node/mesh.py): the join responder and the tunnel interface.
        self.mesh = Mesh(config)
        self.coordinator: Coordinator[IntroPoint] | None = None
        self.published_auth_keys: tuple[bytes, ...] = ()
        self._alone_since: float | None = None  # monotonic; None while peers are live
        self._native_publishing: bool | None = None  # last PublishHidServDescriptors applied
        self._published_signature: MergeSignature | None = None
        self._signature_changed_at: float | None = None
        self._publishing = False
        self._was_publisher = False
        self._posted: dict[int, int] = {}  # time period -> revision counter last uploaded
        self._publish_generation = 0
        self._verify_wakeup = asyncio.Event()
        self._verify_republishes = 0
        self._eligible = config.node.publisher_eligible
        # Observability: /metrics (config.metrics) and the target's HTTP probe (config.health).
        self.metrics = NodeMetrics()
        self.metrics_server: MetricsServer | None = None
        self.publish_counters = _PublishCounters()
        self.prober: HealthProber | None = None

    # -- status ---------------------------------------------------------------------------

    def status_document(self) -> Mapping[str, Any]:
        stats = self.watchdog.stats()
        proxy = dataclasses.asdict(self.proxy.stats) if self.proxy is not None else {}
        doc = NodeStatus(
            node_id=self.config.node.id,
            mode="multi" if self.is_multi() else "single",
            role="publisher" if self.should_publish() else "standby",
            master_onion_address=self.address,
            tor_running=self.guarded_tor.running if self.guarded_tor is not None else False,
            tor_restarts=stats.restarts,
            tor_restart_failures=stats.failures,
            intro_points_own=self.intro.count,
            intro_points_published=self.published_intro_points,
            last_publish=self.publish_state.to_status(),
            peers=self._peer_statuses(),
            proxy={k: int(v) for k, v in proxy.items()},
            generated_at=time.time(),
        ).to_dict()
        doc["tor"]["mode"] = self.config.tor.mode
        # Intro auth keys are public (every client that knows the address sees them).
        doc["intro_points"]["own_auth_keys"] = [p.auth_key.hex() for p in self.intro.intro_points]
        doc["intro_points"]["published_auth_keys"] = [k.hex() for k in self.published_auth_keys]
        coordinator = self.coordinator
        if coordinator is not None:
            doc["cluster"] = {
                "term": coordinator.term,
                "election_role": coordinator.role.value,
                "publisher": coordinator.publisher(),
                "native_publishing": self._native_publishing,
                "counters": coordinator.counters.as_dict(),
                "rejected": {str(k): v for k, v in coordinator.rejected.items()},
                "peer_intro_points": {
                    node_id: len(points)
                    for node_id, points in coordinator.peer_intro_points().items()
                },
            }
        prober = self.prober
        if prober is not None:
            last = prober.last_result
            doc["target"] = {
                "healthy": prober.up,
                "probes": prober.probes,
                "consecutive_failures": prober.state.consecutive_failures,
                "last_probe": last.detail if last is not None else None,
            }
        if self.identity.mode == "instance":
            doc["instance_onion_address"] = self.service_address
        if self.backends is not None:
            now = time.time()
            book = self.backends.book
            doc["backends"] = {
                f"{address}.onion": {
                    "up": book.down_reason(address, now) is None,
                    "reason": book.down_reason(address, now),
                    "intro_points": len(state.intro_points),
                    "auth_keys": [p.auth_key.hex() for p in state.intro_points],
                }
                for address, state in book.states.items()
            }
        if self.mesh.active:
            doc["mesh"] = self.mesh.status()
        doc["ready"] = self.ready
        doc["uptime_secs"] = round(time.monotonic() - self.started_at, 1)
        return doc

    def metrics_snapshot(self) -> dict[str, Any]:
        """The :class:`NodeMetrics` snapshot of the daemon's current numbers."""
        counters = self.publish_counters
        stats = self.watchdog.stats()
        snapshot: dict[str, Any] = {
            "publishes": {p: dict(c) for p, c in counters.periods.items()},
            "hsdir_uploads": dict(counters.hsdir_uploads),
            "hsdir_last_upload": dict(counters.hsdir_last),
            "descriptor_age_seconds": self.publish_state.descriptor_age(time.time()),
            "is_publisher": self.should_publish(),
            "tor_up": self.guarded_tor.running if self.guarded_tor is not None else False,
            "tor_restarts": stats.restarts,
        }
        age = snapshot["descriptor_age_seconds"]
        if age is not None and age < 0:  # the wall clock stepped back
            snapshot["descriptor_age_seconds"] = 0.0
        intro = {"own": self.intro.count, "merged": self.published_intro_points}
        coordinator = self.coordinator
        if coordinator is not None:
            intro["peers"] = sum(len(p) for p in coordinator.peer_intro_points().values())
            snapshot["peers_alive"] = len(coordinator.live_peers())
            snapshot["heartbeats_sent"] = coordinator.counters.heartbeats_sent
            snapshot["heartbeats_received"] = coordinator.counters.heartbeats_received
            snapshot["rejected_messages"] = {str(k): v for k, v in coordinator.rejected.items()}
        else:
            snapshot["peers_alive"] = 0
        snapshot["intro_points"] = intro
        if self.proxy is not None:
            snapshot.update(proxy_snapshot(self.proxy.stats))
        if self.prober is not None:
            snapshot["target_up"] = self.prober.up
        return snapshot

    def update_metrics(self) -> None:
        self.metrics.update(self.metrics_snapshot())

    async def feed_metrics(self) -> None:
        """Supervised task: rebuild the metrics snapshot every few seconds."""
        while True:
            self.update_metrics()
            await asyncio.sleep(METRICS_UPDATE_SECS)

    def _peer_statuses(self) -> tuple[PeerStatus, ...]:
        coordinator = self.coordinator
        if coordinator is None:
            return ()
        live = {p.node_id for p in coordinator.live_peers()}
        known = {p.node_id for p in coordinator.peers.known_peers()}
        return tuple(PeerStatus(node_id, node_id in live) for node_id in sorted(live | known))

    # -- cluster mode ---------------------------------------------------------------------

    def is_multi(self) -> bool:
        """2+ live nodes (us and at least one peer)."""
        return self.coordinator is not None and self.coordinator.is_multi

    def _alone_settled(self) -> bool:
        coordinator = self.coordinator
        if coordinator is None or coordinator.is_multi or self._alone_since is None:
            return False
        waited = time.monotonic() - self._alone_since
        return waited >= self.config.coordination.heartbeat_timeout_secs

    def should_publish(self) -> bool:
        """Single node: always. Cluster: the elected publisher, or a node left alone."""
        if self.key is None:
            return False  # a non-eligible instance node has no master key to sign with
        coordinator = self.coordinator
        if coordinator is None:
            return True
        if coordinator.is_multi:
            return coordinator.is_publisher
        return coordinator.is_publisher or self._alone_settled()

    def _native_publishing_wanted(self) -> bool:
        """tor's own uploads: on for a single node and a node left alone, off in a cluster.
        Instance mode: always on (tor publishes the instance's own descriptor, which never
        competes with the master's, and keeps its intro points fresh). Shared mode with
        ``master.backends``: always off, since tor's own master descriptor (without the
        backends' intro points) would replace the merged one."""
        if not self.identity.native_publishes_master:
            return True
        if self.config.master.backends:
            return False
        if self.coordinator is None:
            return True
        return self._alone_settled()

    async def _apply_native_publishing(self, conn: ControlConnection | None = None) -> None:
        wanted = self._native_publishing_wanted()
        value = "1" if wanted else "0"
        if conn is not None:
            await conn.set_conf({"PublishHidServDescriptors": value})
        else:
            await self._controller().set_conf({"PublishHidServDescriptors": value})
        if wanted != self._native_publishing:
            log.info(
                "tor native publishing %s (%s)",
                "on" if wanted else "off",
                "alone" if wanted else "cluster mode",
            )
        self._native_publishing = wanted

    async def _on_control_connected(self, conn: ControlConnection) -> None:
        """A (re)connection, maybe to a restarted tor: re-apply PublishHidServDescriptors."""
        if self.coordinator is not None:
            await self._apply_native_publishing(conn)

    def _current_signature(self) -> MergeSignature:
        coordinator = self.coordinator
        peers = coordinator.peer_intro_points() if coordinator is not None else {}
        multi = self.is_multi()
        return merge_signature(multi, self.intro.intro_points, peers if multi else {})

    async def run_cluster(self) -> None:
        """Supervised task (multi-node): mode switch, intro points to peers, republish."""
        coordinator = self.coordinator
        assert coordinator is not None
        if self._alone_since is None and not coordinator.is_multi:
            self._alone_since = time.monotonic()
        while True:
            coordinator.changed.clear()
            now = time.monotonic()
            coordinator.set_intro_points(self.intro.intro_points)
            if coordinator.is_multi:
                self._alone_since = None
            elif self._alone_since is None:
                # The last peer just expired (silent for a heartbeat timeout already).
                self._alone_since = now - self.config.coordination.heartbeat_timeout_secs
            if self._native_publishing_wanted() != self._native_publishing:
                try:
                    await self._apply_native_publishing()
                except (ControlError, RustBalanceError) as exc:
                    log.debug("Setting PublishHidServDescriptors failed (will retry): %s", exc)
            eligible = self.config.node.publisher_eligible and (
                self.guarded_tor is None or self.guarded_tor.running
            )
            if eligible != self._eligible:
                self._eligible = eligible
                coordinator.set_eligible(eligible)
            publishing = self.should_publish()
            if not publishing and not self.ready and self.intro.count:
                # A standby never publishes: it is ready once its own intro points exist.
                self._mark_ready(f"standby with {self.intro.count} intro points")
            if publishing != self._was_publisher:
                self._was_publisher = publishing
                log.info(
                    "Cluster role: %s (%s)",
                    "publisher" if publishing else "standby",
                    "multi" if coordinator.is_multi else "single",
                )
                if not publishing:
                    self._published_signature = None
                elif self.intro.count or self._current_signature()[2]:
                    # A takeover publishes at once: failover time is what the election
                    # already spent (timeout + grace), not a debounce on top of it.
                    self._signature_changed_at = None
                    self.trigger.fire("became publisher")
            if publishing and not self._publishing:
                signature = self._current_signature()
                if signature == self._published_signature:
                    self._signature_changed_at = None
                elif self._signature_changed_at is None:
                    self._signature_changed_at = now
                elif now - self._signature_changed_at >= CLUSTER_REPUBLISH_DEBOUNCE_SECS:
                    self._signature_changed_at = None
                    if self.intro.count or signature[2]:
                        self.trigger.fire("cluster intro points changed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(coordinator.changed.wait(), CLUSTER_POLL_SECS)

    async def _leave_cluster(self) -> None:
        if self.coordinator is not None:
            await self.coordinator.shutdown()
            log.info("Left the cluster")

    def _controller(self) -> ReconnectingController:
        if self.ctrl is None:
            raise ControlError("no control connection yet")
        return self.ctrl

    # -- start-up -------------------------------------------------------------------------

    def _service_settings(self, proxy_port: int) -> OnionServiceSettings:
        tor = self.config.tor
        listen = self.config.proxy.listen_host
        return OnionServiceSettings(
            hidden_service_dir=str(tor.hidden_service_dir),
            proxy_port=proxy_port,
            virtual_port=self.config.proxy.virtual_port,
            # tor connects to the proxy; a wildcard listen address is reached on loopback.
            proxy_host="127.0.0.1" if listen in ("0.0.0.0", "::", "") else listen,
            num_intro_points=tor.num_intro_points,
            onionbalance_instance=True,
            # Multi-node shared mode: off until the node knows it is alone (the cluster task
            # turns it on). Instance mode: always on (the instance's own descriptor).
            # Shared mode with plain backends: off (tor's would lack their intro points).
            publish_descriptors=self._native_publishing_at_start(),
            pow=PowSettings(tor.pow_queue_rate, tor.pow_queue_burst) if tor.pow_enabled else None,
            intro_dos=(
                IntroDosSettings(tor.intro_dos_rate_per_sec, tor.intro_dos_burst_per_sec)
                if tor.intro_dos_enabled
                else None
            ),
            front_door=FrontDoorSettings(
                proxy_unix=str(p) if (p := self.config.proxy.listen_unix) else None,
                export_circuit_id=self.config.proxy.export_circuit_id,
                max_streams=tor.max_streams_per_circuit,
                max_streams_close_circuit=tor.max_streams_close_circuit,
            ),
        )

    def _native_publishing_at_start(self) -> bool:
        """``PublishHidServDescriptors`` in the torrc (see :meth:`_native_publishing_wanted`);
        a cluster node starts with it off until it knows it is alone."""
        if not self.identity.native_publishes_master:
            return True
        return not self.multi_node and not self.config.master.backends

    def _write_hidden_service_dir(self) -> None:
        hs_dir = self.config.tor.hidden_service_dir
        try:
            write_hidden_service_dir(self.identity.service_key, hs_dir)
            _write_file(hs_dir / OB_CONFIG_FILENAME, ob_config_text(self.address), 0o600)
            if self.config.tor.mode == "system":
                _adopt_owner(hs_dir)
        except (InvalidKeyError, OSError) as exc:
            raise StartupError(f"cannot write hidden service directory {hs_dir}: {exc}") from None
        if self.identity.mode == "instance":
            log.info(
                "Wrote onion service directory %s (instance %s of master %s)",
                hs_dir,
                self.service_address,
                self.address,
            )
        else:
            log.info("Wrote onion service directory %s (master %s)", hs_dir, self.address)

    async def _start_proxy(self, socks: tuple[str, int]) -> ReverseProxy:
        cfg = self.config
        try:
            target = parse_target(str(cfg.target.address), use_tls=cfg.target.use_tls)
            settings = ProxySettings(
                target=target,
                listen_host=cfg.proxy.listen_host,
                listen_port=cfg.proxy.listen_port,
                mode=cfg.proxy.mode,
                socks_host=socks[0],
                socks_port=socks[1],
                master_onion=self.address,
                connect_timeout=cfg.target.connect_timeout_secs,
                idle_timeout=cfg.target.idle_timeout_secs,
                max_session_seconds=cfg.target.session_timeout_secs or None,
                max_connections=cfg.proxy.max_connections,
                drain_timeout=cfg.proxy.drain_timeout_secs,
                # The front door (issue 15): proxy/settings.py documents each.
                listen_unix=str(p) if (p := cfg.proxy.listen_unix) else None,
                head_timeout=cfg.proxy.request_head_timeout_secs,
                keep_alive_timeout=cfg.proxy.keep_alive_timeout_secs,
                body_timeout=cfg.proxy.request_body_timeout_secs,
                max_header_bytes=cfg.proxy.max_head_bytes,
                max_header_fields=cfg.proxy.max_head_fields,
                circuit_ids=cfg.proxy.export_circuit_id,
                circuit_limits=CircuitLimits(
                    max_connections=cfg.proxy.circuit_max_connections,
                    rate=cfg.proxy.circuit_request_rate,
                    burst=cfg.proxy.circuit_request_burst,
                    cut_seconds=cfg.proxy.circuit_cut_secs,
                ),
                circuit_header=cfg.proxy.circuit_id_header or None,
            )
            raise_nofile_limit(cfg.proxy.max_connections)
            proxy = ReverseProxy(
                settings, interceptor=self.mesh.interceptor(), close_circuit=self._close_circuit
            )
            await proxy.start()
        except RustBalanceError as exc:
            raise StartupError(f"reverse proxy: {exc}") from None
        self.proxy = proxy
        return proxy

    async def _close_circuit(self, circuit: int) -> None:
        """The proxy cut a circuit: ask tor to close it (control-spec §3.16 CLOSECIRCUIT; the
        id of tor's PROXY line is the circuit's global identifier, the control port's id)."""
        if self.ctrl is not None:
            async with asyncio.timeout(10):
                await self.ctrl.request("CLOSECIRCUIT", str(circuit))

    async def _start_tor(self, proxy_port: int, socks_port: int) -> TorProcess:
        tor_cfg = self.config.tor
        settings = self._service_settings(proxy_port)
        if tor_cfg.mode == "managed":
            lines = [*onion_service_torrc(settings).splitlines(), *tor_cfg.extra_torrc]
            try:
                managed = ManagedTor(
                    tor_cfg.data_dir,
                    lines,
                    tor_binary=tor_cfg.binary,
                    socks_port=socks_port,
                    bootstrap_timeout=tor_cfg.bootstrap_timeout_secs,
                )
            except TorProcessError as exc:
                raise StartupError(f"tor.extra_torrc: {exc}", EXIT_CONFIG) from None
            self.tor = managed
            log.info("Starting tor (managed, data dir %s)", tor_cfg.data_dir)
            try:
                await managed.start()
            except TorProcessError as exc:
                raise StartupError(f"tor did not start: {exc}") from None
            return managed
        include = tor_cfg.torrc_include
        socks = tor_cfg.socks
        if include is None or socks is None or tor_cfg.control is None:
            raise StartupError("system mode needs tor.control, tor.socks, tor.torrc_include", 2)
        text = system_include_text(settings, self.address)
        if tor_cfg.extra_torrc:
            text += "".join(f"{line}\n" for line in tor_cfg.extra_torrc)
        try:
            # The include holds no secret; the system tor (another user) must read it.
            _write_file(include, text, 0o644)
        except OSError as exc:
            raise StartupError(f"cannot write tor include {include}: {exc}") from None
        log.info("Wrote tor include %s", include)
        system = SystemTor(str(tor_cfg.control), (socks.host, socks.port))
        self.tor = system
        return system

    async def _start_controller(self, tor: TorProcess) -> ReconnectingController:
        ctrl = ReconnectingController(
            tor.control_address,
            password=password_from_env(),
            # Loopback: reconnect quickly after a tor restart (the watchdog restarts tor).
            max_backoff=5.0,
        )
        self.ctrl = ctrl
        ctrl.on_connected(self._on_control_connected)
        await ctrl.start()
        try:
            await ctrl.wait_connected(CONTROL_WAIT_SECS)
        except ControlError as exc:
            raise StartupError(f"tor control port {tor.control_address}: {exc}") from None
        if self.config.tor.mode == "system":
            await self._reload_system_tor()
        return ctrl

    async def _reload_system_tor(self) -> None:
        ctrl = self._controller()
        await ctrl.wait_connected(CONTROL_WAIT_SECS)
        await ctrl.signal("RELOAD")
        include = self.config.tor.torrc_include
        log.info("Sent SIGNAL RELOAD to the system tor (include %s)", include)
        # RELOAD succeeds even when the system torrc does not %include our file: check that
        # tor now knows our service, and say how to fix it if not.
        conf = await ctrl.get_conf("HiddenServiceDir")
        dirs = [v for k, values in conf.items() if k.lower() == "hiddenservicedir" for v in values]
        if str(self.config.tor.hidden_service_dir) not in dirs:
            log.error(
                "The system tor did not load %s: add '%%include %s' to its torrc",
                include,
                include,
            )

    def _start_coordinator(self) -> None:
        """Multi-node: the cluster key and the coordinator (it runs as a supervised task)."""
        coordination = self.config.coordination
        token_path = coordination.cluster_token_path
        if token_path is None:
            raise StartupError("multi-node mode needs coordination.cluster_token_path", EXIT_CONFIG)
        try:
            key: ClusterKey = load_cluster_key(token_path)
        except ConfigError as exc:
            raise StartupError(str(exc), EXIT_CONFIG) from None
        advertise = coordination.advertise
        try:
            self.coordinator = Coordinator.from_config(
                self.config,
                key,
                encode_intro_point=encode_intro_point,
                decode_intro_point=decode_intro_point,
            )
        except RustBalanceError as exc:
            raise StartupError(f"coordination: {exc}", EXIT_CONFIG) from None
        log.info(
            "Multi-node mode: coordination on %s, %d seed peers%s",
            coordination.listen,
            len(coordination.peers),
            f", advertised as {advertise}" if advertise else "",
        )

    def _start_backends(self) -> None:
        """``master.backends``: fetched and merged by the node that publishes (backends.py)."""
        master = self.config.master
        if self.identity.mode == "instance":
            log.info(
                "Identity mode instance: tor hosts %s; %s",
                self.service_address,
                "master key present (publisher-eligible)"
                if self.key is not None
                else "no master key (never publishes)",
            )
            if self.key is None and not self.multi_node:
                log.warning("No master key and no peers: nobody publishes %s here", self.address)
        if not master.backends:
            return
        if self.key is None:
            log.info("master.backends ignored: this node never publishes")
            return
        book = BackendBook(
            master.backends,
            poll_secs=master.backend_poll_secs,
            max_age_secs=master.backend_max_age_secs,
        )
        self.backends = BackendPoller(
            book,
            self._fetch_backend,
            self._probe_backend,
            on_change=self.trigger.fire,
            is_active=self.should_publish,
        )
        log.info("Merging %d plain tor backends", len(master.backends))

    async def _fetch_backend(self, address: str) -> DecodedDescriptor:
        view = await self._current_view()
        return await fetch_descriptor(
            self._controller(), address, view, timeout=BACKEND_FETCH_TIMEOUT_SECS
        )

    async def _probe_backend(self, address: str) -> None:
        if self._socks is None:
            raise ControlError("no SOCKS port yet")
        await probe_onion(self._socks, address, self.config.proxy.virtual_port)

    def _backend_intro_points(self) -> dict[str, tuple[IntroPoint, ...]]:
        if self.backends is None:
            return {}
        return self.backends.book.intro_points(time.time())

    async def _start_metrics(self) -> None:
        """Bind ``/metrics`` before tor starts: a taken port is a start-up error naming the key
        (not a supervised task failing over and over)."""
        listen = self.config.metrics.listen
        try:
            self.metrics_server = await start_metrics_server(
                self.metrics,
                enabled=self.config.metrics.enabled,
                host=listen.host,
                port=listen.port,
            )
        except OSError as exc:
            raise StartupError(
                f"metrics.listen: cannot listen on {listen}: "
                f"{os.strerror(exc.errno) if exc.errno else exc} "
                "(choose a free port, or set [metrics] enabled = false)"
            ) from None
        if self.metrics_server is not None:
            self.update_metrics()

    def _start_prober(self, proxy: ReverseProxy) -> None:
        """``[health] http_probe_enabled``: probe the target the way the proxy reaches it."""
        health = self.config.health
        if not health.http_probe_enabled:
            return
        # An onion target is reached through tor, which needs time to settle after start-up;
        # a direct target is probed after one interval (at most the default delay).
        start_delay = DEFAULT_START_DELAY_SECS
        if not proxy.settings.target.is_onion:
            start_delay = min(start_delay, health.http_probe_interval_secs)
        self.prober = HealthProber(proxy.settings, health, start_delay=start_delay)
        log.info(
            "Target health probe: GET %s every %g s (first in %g s)",
            health.http_probe_path,
            health.http_probe_interval_secs,
            start_delay,
        )

    async def start(self) -> None:
        """Everything before the supervised tasks; StartupError names what failed."""
        cfg = self.config
        log.info("Starting rustbalance: %s, master %s", cfg.summary(), self.address)
        self.notifier.status("Starting")
        if self.multi_node:
            self._start_coordinator()
        # Before the coordinator binds (its task starts after start()): coordination.listen
        # may be the WireGuard tunnel address.
        try:
            await self.mesh.start(self.coordinator)
        except MeshError as exc:
            raise StartupError(str(exc), EXIT_CONFIG if exc.config_problem else 1) from None
        self._write_hidden_service_dir()
        if cfg.tor.mode == "managed":
            socks_port = cfg.tor.socks.port if cfg.tor.socks else pick_free_ports(1)[0]
            socks = ("127.0.0.1", socks_port)
        else:
            assert cfg.tor.socks is not None  # the parser fills the system default
            socks = (cfg.tor.socks.host, cfg.tor.socks.port)
        await self._start_metrics()
        self._socks = socks
        self._start_backends()
        proxy = await self._start_proxy(socks)
        self._start_prober(proxy)
        tor = await self._start_tor(proxy.port, socks[1])
        self.guarded_tor = _GuardedTor(
            tor,
            connected=lambda: self.ctrl is not None and self.ctrl.connection is not None,
            hung_after=TOR_HUNG_INTERVALS * cfg.tor.watchdog_interval_secs,
        )
        await self._start_controller(tor)
        self.status_server = StatusServer(cfg.node.status_socket, self.status_document)
        try:
            await self.status_server.start()
        except RustBalanceError as exc:
            raise StartupError(f"status endpoint: {exc}") from None
        self.notifier.status("Waiting for intro points")

    # -- intro points ---------------------------------------------------------------------

    async def _current_view(self) -> NetworkView:
        if self.view is None:
            self.view = await read_network_view(self._controller())
        return self.view

    async def refresh_intro_points(self) -> bool:
        """Read the own descriptor; True if intro points are known afterwards."""
        ctrl = self._controller()
        try:
            view = await self._current_view()
            service = self.service_address
            try:
                decoded = await read_own_descriptor(ctrl, service, view)
            except DescriptorError:
                # Our view may predate a new period: read it again once.
                self.view = None
                decoded = await read_own_descriptor(ctrl, service, await self._current_view())
            if self.identity.mode == "instance":
                decoded = await self._client_view_descriptor(decoded)
        except ControlReplyError as exc:
            # 551: tor has not built a descriptor yet (start-up, just restarted).
            log.debug("Own descriptor not available yet: %s", exc)
            return self.intro.count > 0
        except (ControlError, DescriptorError) as exc:
            log.warning("Reading own descriptor failed: %s", exc)
            return self.intro.count > 0
        before = self.intro.count
        changed = self.intro.update(decoded, time.time())
        if self.coordinator is not None:
            self.coordinator.set_intro_points(self.intro.intro_points)
        if changed:
            log.info(
                "Own intro points changed: %d now (was %d), publishing", self.intro.count, before
            )
            if self.intro.count:
                self.trigger.fire("intro points changed")
        return self.intro.count > 0

    async def _client_view_descriptor(self, current: DecodedDescriptor) -> DecodedDescriptor:
        """Instance mode: in segment B the own ``desc_next`` as clients fetch it, whose intro
        points survive tor's rotation at the next SRV (own_descriptor.py)."""
        view = await self._current_view()

        async def fetch() -> DecodedDescriptor:
            return await fetch_descriptor(
                self._controller(), self.service_address, view, timeout=OWN_FETCH_TIMEOUT_SECS
            )

        try:
            return await self._own_next.client_view(
                current, view.current_time_period(), time.time(), fetch
            )
        except (ControlError, RustBalanceError) as exc:
            log.debug("Fetching our own next descriptor failed (using the current): %s", exc)
            return current

    async def _has_intro_points(self) -> bool:
        # Phase 1.5: every poll reads the descriptor while none is known.
        if self.intro.count == 0:
            await self.refresh_intro_points()
        return self.intro.count > 0

    async def track_intro_points(self) -> None:
        """Supervised task: HS_DESC events for our address plus a periodic read."""
        ctrl = self._controller()
        loop = asyncio.get_running_loop()
        sub = await ctrl.subscribe("HS_DESC")
        try:
            next_read = loop.time()
            while True:
                if self._intro_wakeup.is_set():
                    self._intro_wakeup.clear()
                    next_read = min(next_read, loop.time() + INTRO_EVENT_DEBOUNCE_SECS)
                if loop.time() >= next_read:
                    await self.refresh_intro_points()
                    next_read = loop.time() + INTRO_POLL_SECS
                try:
                    # At most 1 s at a time, so a wake-up (tor restarted) is seen promptly.
                    raw = await sub.get(min(1.0, max(0.05, next_read - loop.time())))
                except ControlTimeoutError:
                    continue
                try:
                    event = HsDescEvent.from_event(raw)
                except ControlProtocolError:
                    continue
                if (
                    event.address.lower() == self._bare
                    and event.action in _OWN_DESCRIPTOR_ACTIONS
                    and event.auth_type != "UNKNOWN"
                ):
                    self._own_next.mark_stale()
                    next_read = min(next_read, loop.time() + INTRO_EVENT_DEBOUNCE_SECS)
        finally:
            await sub.aclose()

    # -- consensus watch ------------------------------------------------------------------

    def _ring(self, view: NetworkView) -> Ring:
        """What a published descriptor depends on: (period, SRV, responsible HSDirs) x 2."""
        ring: list[tuple[int, bytes, tuple[str, ...]]] = []
        for target in view.descriptor_targets():
            blinded = blind_public_key(
                self.identity.master_public_key, target.time_period, view.period_length
            )
            fps = tuple(r.fingerprint for r in view.store_hsdirs(blinded, target))
            ring.append((target.time_period, target.srv, fps))
        return tuple(ring)

    def _check_ring(self, view: NetworkView) -> None:
        ring = self._ring(view)
        published = self._published_ring
        if published is None or ring == published or ring == self._fired_ring:
            return
        self._fired_ring = ring
        periods_now = [(tp, srv) for tp, srv, _ in ring]
        periods_then = [(tp, srv) for tp, srv, _ in published]
        if periods_now != periods_then:
            log.info("Time period or shared random value changed: republishing")
            if self.backends is not None:
                # Backends publish descriptors for the new period too: fetch them now.
                self.backends.book.expedite(time.time())
            self.trigger.fire("time period / SRV changed")
        else:
            log.info("Responsible HSDirs changed: republishing")
            self.trigger.fire("HSDirs changed")

    async def watch_network(self) -> None:
        """Supervised task: re-read the network view on every new consensus."""
        ctrl = self._controller()
        last: str | None = None
        while True:
            try:
                try:
                    key = "consensus/valid-after"
                    valid_after: str | None = (await ctrl.get_info(key))[key]
                except ControlReplyError:
                    valid_after = None  # older tor: read the view every time
                if valid_after is None or valid_after != last or self.view is None:
                    view = await read_network_view(ctrl)
                    self.view = view
                    last = valid_after
                    self._check_ring(view)
            except (ControlError, RustBalanceError) as exc:
                log.debug("Reading the consensus failed (will retry): %s", exc)
            await asyncio.sleep(NETWORK_POLL_SECS)

    # -- publishing -----------------------------------------------------------------------

    def _mark_ready(self, why: str) -> None:
        if self.ready:
            return
        self.ready = True
        log.info("Node ready: %s", why)
        self.notifier.ready(why)

    @staticmethod
    def _period_result(result: PeriodPublish) -> PeriodResult:
        hsdirs = tuple(
            HsDirResult(f"${u.fingerprint}~{u.nickname}", u.ok, u.reason) for u in result.hsdirs
        )
        error = result.error
        if error is None and not result.ok:
            error = "no responsible HSDir accepted the descriptor"
        return PeriodResult(ok=result.ok, error=error, hsdirs=hsdirs)

    async def publish_once(self) -> PublishOutcome:
        """One publish round: both descriptors with the node's own intro points."""
        if not self._first_wait_over:
            self._first_wait_over = True
            if self.intro.count == 0:
                # Phase 1.5: the wait is over; systemd may consider us started (retries follow).
                self._mark_ready("no intro points yet, publishing will retry")
        points = self.intro.intro_points
        signature = self._current_signature()
        if self.coordinator is not None and not self.should_publish():
            # Lost the lease while the loop was waiting: the new publisher publishes.
            error = "standby: another node publishes"
            return {p: PeriodResult(ok=False, error=error) for p in PERIODS}
        multi = signature[0]
        peers = self.coordinator.peer_intro_points() if self.coordinator and multi else {}
        instances, flow_control = merge_inputs(points, self.intro.flow_control, peers)
        if not multi:
            flow_control = self.intro.flow_control
        backend_points = self._backend_intro_points()
        if backend_points:
            # One more "node" each in the fair round-robin (after ours and the peers'). Their
            # flow-control line is unknown to us: leave it out (slower, never broken).
            instances.extend(backend_points.values())
            flow_control = None
        if not any(instances):
            error = "no intro points yet"
            return {p: PeriodResult(ok=False, error=error) for p in PERIODS}
        cfg = self.config.publish
        ctrl = self._controller()
        now = int(time.time())
        chosen = merge_intro_points(instances, cfg.max_intro_points, now, INTRO_MIN_VALIDITY_SECS)
        if not chosen:
            return {p: PeriodResult(ok=False, error="intro points expire soon") for p in PERIODS}
        # pow-params cannot work across nodes (tor.md §12): a single node only, and only when
        # its tor hosts the master key (a PoW solution is bound to the service's blinded key,
        # so an instance's seed cannot be copied into the master descriptor).
        single_master = not self.multi_node and not backend_points
        shared = self.identity.mode == "shared"
        pow_params = self.intro.pow_params if single_master and shared else None
        self._publishing = True
        try:
            results = await self._upload(ctrl, chosen, now, flow_control, pow_params)
        finally:
            self._publishing = False
        outcome = {label: self._period_result(result) for label, result in results.items()}
        if any(r.ok for r in outcome.values()):
            self._published_signature = signature
            self.published_auth_keys = tuple(p.auth_key for p in chosen)
            self._posted = {r.time_period: r.revision_counter for r in results.values() if r.ok}
            self._publish_generation += 1
            self._verify_wakeup.set()
            if self.coordinator is not None:
                self.coordinator.set_last_publish(now)
            if multi or backend_points:
                log.info(
                    "Published merged descriptor: %d intro points from %d nodes "
                    "(%d plain backends)",
                    len(chosen),
                    len(instances),
                    len(backend_points),
                )
            self.published_intro_points = len(chosen)
            self._published_ring = self._ring(self.view) if self.view else None
            self._fired_ring = None
            self._mark_ready(f"published {self.address} with {len(chosen)} intro points")
            self.notifier.status(
                f"Publishing {self.address}: {len(chosen)} intro points, "
                + ", ".join(f"{p} {'ok' if r.ok else 'failed'}" for p, r in outcome.items())
            )
        return outcome

    async def _upload(
        self,
        ctrl: ReconnectingController,
        chosen: list[IntroPoint],
        now: int,
        flow_control: str | None,
        pow_params: PowParams | None,
    ) -> dict[PeriodLabel, PeriodPublish]:
        cfg = self.config.publish
        if self.key is None:
            raise ControlError("this node has no master key (instance mode, not eligible)")
        async with self._upload_lock:
            view = await read_network_view(ctrl)
            self.view = view
            results = await publish_master(
                ctrl,
                self.key,
                chosen,
                view,
                now=now,
                revision_clock=self.revision_clock,
                flow_control=flow_control,
                pow_params=pow_params,
                client_auth_keys=self.config.master.authorized_clients,
                lifetime_minutes=cfg.descriptor_lifetime_mins,
                upload_timeout=cfg.upload_timeout_secs,
            )
        return results

    async def verify_published(self) -> None:
        """Supervised task: after each upload, fetch the master descriptor back through tor and
        check that the HSDirs serve a revision at least as new as the one we posted."""
        while True:
            await self._verify_wakeup.wait()
            self._verify_wakeup.clear()
            await asyncio.sleep(VERIFY_DELAY_SECS)
            generation = self._publish_generation
            posted = dict(self._posted)
            try:
                view = await self._current_view()
                decoded = await fetch_descriptor(
                    self._controller(), self.address, view, timeout=VERIFY_FETCH_TIMEOUT_SECS
                )
            except (ControlError, RustBalanceError) as exc:
                log.warning("Could not fetch the published descriptor back: %s", exc)
                continue
            if generation != self._publish_generation:
                continue  # published again meanwhile: that upload is verified next
            expected = posted.get(decoded.time_period)
            if expected is None:
                log.debug("Fetched a descriptor of period %d we did not post", decoded.time_period)
                continue
            if decoded.revision_counter >= expected:
                self._verify_republishes = 0
                log.info("Descriptor verified on HSDirs (rev=%d)", decoded.revision_counter)
                continue
            log.warning(
                "HSDirs serve an older descriptor (rev=%d, posted rev=%d)",
                decoded.revision_counter,
                expected,
            )
            if self._verify_republishes < VERIFY_MAX_REPUBLISHES and self.should_publish():
                self._verify_republishes += 1
                self.trigger.fire("verification found an older descriptor")

    async def reconnect(self) -> None:
        """Phase 1.4: a fresh control session before each retry."""
        ctrl = self._controller()
        conn = ctrl.connection
        if conn is not None:
            await conn.close()  # the controller notices and reconnects (re-subscribing)
        await ctrl.wait_connected(CONTROL_WAIT_SECS)

    async def _publish_counted(self) -> PublishOutcome:
        """``publish_once`` as the publish loop runs it, counted for metrics."""
        try:
            outcome = await self.publish_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.publish_counters.record_failure()
            raise
        self.publish_counters.record(outcome)
        return outcome

    async def publish_loop(self) -> None:
        cfg = self.config.publish
        await run_publish_loop(
            self._publish_counted,
            self.reconnect,
            self._has_intro_points,
            self.publish_state,
            self.schedule,
            clock=time.time,
            sleep=asyncio.sleep,
            wait=self.trigger.wait,
            is_publisher=self.should_publish,
            poll_interval=cfg.first_publish_poll_secs,
            max_wait=cfg.first_publish_max_wait_secs,
        )

    # -- tor watchdog ---------------------------------------------------------------------

    async def after_tor_restart(self) -> None:
        """What a tor restart loses (system.md W7): the system tor re-reads our include;
        the controller reconnects and re-subscribes by itself. Then publish again."""
        if self.config.tor.mode == "system":
            await self._reload_system_tor()
        await self._controller().wait_connected(CONTROL_WAIT_SECS)
        self.view = None
        # The old intro circuits died with the old tor: publishing them would send clients to
        # dead intro points. The tracker fires the publish trigger once the new tor built its
        # descriptor (a new tor always has new intro points: the keys are per circuit).
        restarted = self.watchdog.last_restart_at
        read_at = self.intro.updated_at
        if restarted is not None and read_at is not None:
            # The watchdog's clock is monotonic, the tracker's is wall time.
            restarted_wall = time.time() - (time.monotonic() - restarted)
            if read_at < restarted_wall:
                self.intro.clear()
                log.info("Tor restarted: waiting for its new intro points to republish")
        self._intro_wakeup.set()

    async def tor_watchdog(self) -> None:
        assert self.guarded_tor is not None
        await run_tor_watchdog(
            self.guarded_tor,
            clock=time.monotonic,
            sleep=asyncio.sleep,
            on_restarted=self.after_tor_restart,
            watchdog=self.watchdog,
        )

    # -- shutdown -------------------------------------------------------------------------

    async def _drain_proxy(self) -> None:
        proxy = self.proxy
        if proxy is not None and not self._proxy_closed:
            self._proxy_closed = True
            active = proxy.stats.active
            await proxy.close(self.config.proxy.drain_timeout_secs)
            log.info("Proxy stopped (%d connections were open)", active)

    async def _stop_tor(self) -> None:
        if self.guarded_tor is not None:
            self.guarded_tor.shutting_down = True
        if self.ctrl is not None:
            await self.ctrl.close()
        if isinstance(self.tor, ManagedTor) and not self._tor_stopped:
            self._tor_stopped = True
            await self.tor.stop()

    async def close(self) -> None:
        """Release everything started so far (idempotent; also after a failed start)."""
        with contextlib.suppress(Exception):
            await self._drain_proxy()
        with contextlib.suppress(Exception):
            await self._stop_tor()
        if self.status_server is not None:
            with contextlib.suppress(Exception):
                await self.status_server.close()
        if self.prober is not None:
            self.prober.stop()
        if self.metrics_server is not None:
            with contextlib.suppress(Exception):
                await self.metrics_server.close()
        with contextlib.suppress(Exception):
            await self.mesh.close()

    def tasks(self) -> list[TaskSpec]:
        tasks = [
            TaskSpec("publish", self.publish_loop, restartable=True, backoff_base=5.0),
            TaskSpec("intro-points", self.track_intro_points, restartable=True),
            TaskSpec("network-watch", self.watch_network, restartable=True),
            TaskSpec("tor-watchdog", self.tor_watchdog, restartable=True),
            TaskSpec(
                "sd-watchdog",
                lambda: run_watchdog_pings(self.notifier, sleep=asyncio.sleep),
                restartable=True,
            ),
        ]
        if self.status_server is not None:
            tasks.append(TaskSpec("status", self.status_server.serve_forever, restartable=True))
        tasks.append(TaskSpec("verify", self.verify_published, restartable=True))
        if self.metrics_server is not None:
            tasks.append(TaskSpec("metrics", self.feed_metrics, restartable=True))
        if self.prober is not None:
            tasks.append(TaskSpec("health-probe", self.prober.run, restartable=True))
        if self.mesh.interface is not None:
            tasks.append(TaskSpec("wireguard", self.mesh.watch_wireguard, restartable=True))
        if self.coordinator is not None:
            tasks.append(TaskSpec("coordinator", self.coordinator.run, restartable=True))
            tasks.append(TaskSpec("cluster", self.run_cluster, restartable=True))
        if self.backends is not None:
            tasks.append(TaskSpec("backends", self.backends.run, restartable=True))
        return tasks

    def hooks(self) -> list[ShutdownHook]:
        drain = self.config.proxy.drain_timeout_secs
        return [
            ShutdownHook("notify systemd", self._notify_stopping, timeout=1.0),
            # A publisher sends lease_release so the next node takes over at once.
            ShutdownHook("leave cluster", self._leave_cluster, timeout=3.0),
            # Stop accepting and let open connections finish, bounded (Phase 2.5).
            ShutdownHook("drain proxy", self._drain_proxy, timeout=drain + 6.0),
            ShutdownHook("stop tor", self._stop_tor, timeout=20.0),
        ]

    async def _notify_stopping(self) -> None:
        self.notifier.stopping("Shutting down")

    async def run(self) -> int:
        """Start, supervise until SIGTERM/SIGINT or a fatal failure; the exit code."""
        loop = asyncio.get_running_loop()
        starting = asyncio.current_task()
        assert starting is not None
        interrupted: list[str] = []

        def stop_start_up(sig: signal.Signals) -> None:
            log.info("Received %s during start-up", sig.name)
            interrupted.append(sig.name)
            starting.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_start_up, sig)
        try:
            await self.start()
        except asyncio.CancelledError:
            if not interrupted:
                raise
            starting.uncancel()
            await self.close()
            log.info("Shutdown complete")
            return EXIT_OK
        except StartupError as exc:
            log.error("Start-up failed: %s", exc)
            await self.close()
            return exc.exit_code
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        supervisor = Supervisor(self.tasks(), self.hooks())
        supervisor.install_signal_handlers()
        try:
            return await supervisor.run()
        finally:
            supervisor.remove_signal_handlers()
            await self.close()


def run_node(config_path: str | os.PathLike[str], args: list[str] | None = None) -> int:
    """``rustbalance run``: the process exit code (0 clean stop, 1 failure, 2 config/key)."""
    config, identity = load_node(config_path)
    set_process_title(args if args is not None else ["run", "--config", str(config_path)])
    # uvloop in http mode (faster proxy), the stock loop in tcp mode (splice): proxy/eventloop.py
    return run_event_loop(Daemon(config, identity).run(), mode=config.proxy.mode)
