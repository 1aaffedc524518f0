"""The node daemon, ``rustbalance run --config FILE``: wiring only.

:class:`Daemon` builds the node's components (each owns its state; docs/architecture.md,
"The node layer"), starts the runtime in order, supervises the components' tasks and stops
them (leave the cluster, drain the proxy, stop tor: within :meth:`Daemon.stop_budget`). The
components get a :class:`Clock` and the ``TorNetwork`` injected; ``status`` and ``/metrics`` are
rendered from one :class:`~rustbalance.node.snapshot.NodeSnapshot`; readiness and the systemd
watchdog's health are fed from here (node/readiness.py, node/health.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial

from rustbalance.config import Config
from rustbalance.crypto.keys import IdentityKey
from rustbalance.descriptor.intro_point import IntroPoint
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.backends import backend_poller
from rustbalance.node.clock import SYSTEM_CLOCK, Clock
from rustbalance.node.cluster_link import coordination_wanted
from rustbalance.node.cluster_loop import ClusterLoop
from rustbalance.node.cluster_mode import ClusterMode, ModePolicy
from rustbalance.node.consensus_watch import ConsensusWatch
from rustbalance.node.coordination import start_coordination
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.intro_watch import IntroWatch
from rustbalance.node.mesh import MeshError
from rustbalance.node.metrics import NodeMetrics, feed_metrics
from rustbalance.node.publisher import Publisher
from rustbalance.node.readiness import Readiness
from rustbalance.node.runtime import NodeRuntime
from rustbalance.node.sdnotify import SystemdNotifier
from rustbalance.node.snapshot import IntroSnapshot, NodeSnapshot, metrics_values, status_document
from rustbalance.node.startup import (
    EXIT_CONFIG,
    StartupError,
    log_identity_mode,
    prepare_state_dir,
    write_onion_service_dir,
)
from rustbalance.node.supervisor import ShutdownHook, TaskSpec, run_daemon
from rustbalance.node.tor_network import ControlTorNetwork, TorNetwork
from rustbalance.tor.control import ReconnectingController

__all__ = ["Daemon", "NetworkFactory"]

log = logging.getLogger(DAEMON_LOGGER)

# Builds the daemon's TorNetwork over its control session (tests inject a faulty one).
NetworkFactory = Callable[[Callable[[], ReconnectingController]], TorNetwork]


class Daemon:
    """One node: start with :meth:`run`, which returns the process exit code."""

    def __init__(
        self,
        config: Config,
        identity: IdentityKey | NodeIdentity,
        *,
        notifier: SystemdNotifier | None = None,
        clock: Clock = SYSTEM_CLOCK,
        network: NetworkFactory = ControlTorNetwork,
    ) -> None:
        if isinstance(identity, IdentityKey):  # a bare key: shared mode
            identity = NodeIdentity("shared", identity.onion_address, identity, identity)
        self.config = config
        self.identity = identity
        self.clock = clock
        self.started_at = clock.monotonic()
        self.clustered = coordination_wanted(config, identity, clock)
        self.readiness = Readiness.for_config(notifier or SystemdNotifier(), clock, config)
        self.runtime = NodeRuntime(config, identity, clock, self.readiness.tor_bootstrap)
        self.metrics = NodeMetrics()
        self.network = network(self.runtime.controller)
        self.views = ConsensusWatch(self.network, clock, lambda v: self.publisher.check_ring(v))
        self.intro = IntroWatch(
            identity,
            self.network,
            self.views,
            clock,
            on_read=self._intro_points_read,
            on_changed=self.republish,
        )
        self.views.on_boundary = self.intro.at_boundary  # a new period or SRV run: re-read
        self.cluster = ClusterLoop(
            ClusterMode(ModePolicy.for_node(config, identity, clustered=self.clustered)),
            self.network,
            clock,
            own=self.intro,
            tor_running=self.runtime.tor_running,
            publishing=lambda: self.publisher.publishing,
            republish=self.republish,
        )
        self.publisher = Publisher(
            config,
            identity,
            self.network,
            self.views,
            clock,
            role=self.cluster,
            own=self.intro,
            readiness=self.readiness,
            clustered=self.clustered,
        )

    def republish(self, reason: str) -> None:
        self.publisher.trigger.fire(reason)

    def _intro_points_read(self, points: Sequence[IntroPoint]) -> None:
        self.cluster.report_intro_points(points)
        self.readiness.intro_points(len(points))

    # -- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        """Everything before the supervised tasks; StartupError names what failed."""
        cfg, runtime, identity = self.config, self.runtime, self.identity
        log.info("Starting rustbalance: %s, master %s", cfg.summary(), identity.master_address)
        self.readiness.starting()
        coordination = start_coordination(cfg, identity, self.clock) if self.clustered else None
        self.cluster.coordination = coordination
        prepare_state_dir(cfg)  # private to us (issue 17); everything below writes in it
        # Before the coordinator binds (its task starts after start()): coordination.listen
        # may be the WireGuard tunnel address.
        try:
            await runtime.mesh.start(coordination.mesh_handle() if coordination else None)
        except MeshError as exc:
            raise StartupError(str(exc), EXIT_CONFIG if exc.config_problem else 1) from None
        write_onion_service_dir(cfg, self.identity)
        socks = runtime.choose_socks()
        if await runtime.start_metrics(self.metrics):
            self.metrics.update(metrics_values(self.snapshot()))
        log_identity_mode(self.identity, clustered=self.clustered)
        self.publisher.backends = backend_poller(
            cfg,
            self.identity.master_key is not None,
            self.network,
            self.views,
            runtime.socks_or_raise,
            on_change=self.republish,
            is_active=self.cluster.is_publisher,
            clock=self.clock,
        )
        proxy = await runtime.start_proxy(socks)
        self.readiness.proxy_listening(proxy.where)
        runtime.start_prober(proxy)
        native = self.cluster.mode.native_publishing_at_start()
        await runtime.start_tor(proxy.port, publish_descriptors=native)
        await runtime.start_controller(self.cluster.on_control_connected)
        await runtime.start_status(lambda: status_document(self.snapshot()))

    async def _after_tor_restart(self) -> None:
        self.views.forget()  # the new tor's view is read afresh
        self.intro.after_tor_restart(await self.runtime.after_tor_restart())

    # -- status and metrics ---------------------------------------------------------------

    def snapshot(self) -> NodeSnapshot:
        now = self.clock.wall()
        runtime = self.runtime
        instance = self.identity.mode == "instance"
        backends = self.publisher.backends
        return NodeSnapshot(
            node_id=self.config.node.id,
            master_onion_address=self.identity.master_address,
            multi=self.cluster.is_multi(),
            publisher=self.cluster.is_publisher(),
            ready=self.readiness.ready,
            uptime_secs=round(self.clock.monotonic() - self.started_at, 1),
            generated_at=now,
            tor=runtime.tor_snapshot(),
            intro=IntroSnapshot(
                tuple(p.auth_key for p in self.intro.intro_points),
                self.publisher.published_auth_keys,
            ),
            publish=self.publisher.snapshot(now),
            instance_onion_address=self.identity.service_address if instance else None,
            cluster=self.cluster.snapshot(),
            proxy=runtime.proxy_stats(),
            target=runtime.target_snapshot(),
            backends=backends.snapshot(now) if backends is not None else None,
            mesh=runtime.mesh.status() if runtime.mesh.active else None,
        )

    # -- supervision ----------------------------------------------------------------------

    def tasks(self) -> list[TaskSpec]:
        runtime = self.runtime
        tasks = [
            TaskSpec("publish", self.publisher.run, restartable=True, backoff_base=5.0),
            TaskSpec("intro-points", self.intro.run, restartable=True),
            TaskSpec("network-watch", self.views.run, restartable=True),
            TaskSpec(
                "tor-watchdog", lambda: runtime.watch_tor(self._after_tor_restart), restartable=True
            ),
            TaskSpec("sd-watchdog", partial(self.readiness.watchdog_pings, self._health_problem)),
        ]
        if runtime.status_server is not None:
            tasks.append(TaskSpec("status", runtime.status_server.serve_forever, restartable=True))
        tasks.append(TaskSpec("verify", self.publisher.verify, restartable=True))
        if runtime.metrics_server is not None:
            values = lambda: metrics_values(self.snapshot())  # noqa: E731
            feed = partial(feed_metrics, self.metrics, values, sleep=self.clock.sleep)
            tasks.append(TaskSpec("metrics", feed, restartable=True))
        if runtime.prober is not None:
            tasks.append(TaskSpec("health-probe", runtime.prober.run, restartable=True))
        if runtime.mesh.interface is not None:
            tasks.append(TaskSpec("wireguard", runtime.mesh.watch_wireguard, restartable=True))
        coordination = self.cluster.coordination
        if coordination is not None:
            tasks.append(TaskSpec("coordinator", coordination.run, restartable=True))
            tasks.append(TaskSpec("cluster", self.cluster.run, restartable=True))
        if self.publisher.backends is not None:
            tasks.append(TaskSpec("backends", self.publisher.backends.run, restartable=True))
        self._task_specs = tasks
        return tasks

    def _health_problem(self) -> str | None:
        return self.runtime.health_problem(self._task_specs)

    def hooks(self) -> list[ShutdownHook]:
        drain = self.config.proxy.drain_timeout_secs
        return [
            # A publisher sends lease_release so the next node takes over at once.
            ShutdownHook("leave cluster", self.cluster.leave, timeout=self.cluster.leave_timeout),
            # Stop accepting and let open connections finish, bounded (Phase 2.5).
            ShutdownHook("drain proxy", self.runtime.drain_proxy, timeout=drain + 1.0),
            # SIGTERM, then SIGKILL (runtime.tor_stop_timeout).
            ShutdownHook("stop tor", self.runtime.stop_tor, timeout=self.runtime.stop_tor_timeout),
        ]

    def stop_budget(self) -> float:
        """Every shutdown ends within this: the hooks, then closing what is left."""
        return sum(hook.timeout for hook in self.hooks()) + self.runtime.close_timeout

    async def run(self) -> int:
        """Start, supervise until SIGTERM/SIGINT or a fatal failure; the exit code."""
        return await run_daemon(
            self.start,
            self.runtime.close,
            self.tasks,
            self.hooks,
            stop_budget=self.stop_budget(),
            stopping=self.readiness.stopping,
            record=self.runtime.task_record,
        )
