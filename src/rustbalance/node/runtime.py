"""The node's long-lived resources: started in order, stopped in reverse, each owned here.

:class:`NodeRuntime` owns the processes, sockets and servers of one node: the ``/metrics``
endpoint, the reverse proxy and the target's health probe, tor (a managed child process, or
the system tor we attach to) with the watchdog's guard around it, the control session, the
status endpoint, and the mesh (join responder, WireGuard). Start-up order (each step needs
the one before; node/daemon.py runs them):

1. ``/metrics`` (a taken port is a WARNING naming ``metrics.listen``; the node runs without);
2. the reverse proxy first, so its port is known for ``HiddenServicePort``; then the probe;
3. managed mode: start tor with the generated torrc and wait for ``Bootstrapped 100%``;
   system mode: write the include file and ``SIGNAL RELOAD`` (the include persists the
   service across tor restarts, system.md W7); tor's bootstrap progress goes to readiness;
4. one :class:`ReconnectingController` (cookie auth, or the password from
   ``RUSTBALANCE_TOR_PASSWORD``), kept for the daemon's life (W17); system mode then waits
   for the system tor's ``status/bootstrap-phase`` to reach 100;
5. the status endpoint.

It also judges tor's side of the node's health for the systemd watchdog (node/health.py).

Every failure is a :class:`~rustbalance.node.startup.StartupError`; :meth:`NodeRuntime.close`
releases whatever was started, also after a failed start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

from rustbalance.config import Config
from rustbalance.errors import ControlError, RustBalanceError, TorProcessError
from rustbalance.node import DAEMON_LOGGER
from rustbalance.node.clock import Clock
from rustbalance.node.health import HealthPolicy, TaskRecord, WatchdogHealth, control_budget
from rustbalance.node.health_probe import DEFAULT_START_DELAY_SECS, HealthProber
from rustbalance.node.identity import NodeIdentity
from rustbalance.node.mesh import Mesh
from rustbalance.node.metrics import MetricsServer, NodeMetrics, start_metrics_server
from rustbalance.node.snapshot import TargetSnapshot, TorSnapshot
from rustbalance.node.startup import (
    EXIT_CONFIG,
    StartupError,
    onion_service_settings,
    system_include,
    write_system_include,
)
from rustbalance.node.status import StatusProvider, StatusServer
from rustbalance.node.supervisor import TaskSpec
from rustbalance.node.tor_network import CONTROL_WAIT_SECS
from rustbalance.node.torrc import onion_service_torrc
from rustbalance.node.watchdog import (
    TOR_HUNG_INTERVALS,
    GuardedTor,
    TorWatchdog,
    WatchdogPolicy,
    run_tor_watchdog,
)
from rustbalance.proxy import CircuitLimits, ProxySettings, ReverseProxy, parse_target
from rustbalance.proxy.fd_limit import raise_nofile_limit
from rustbalance.proxy.session import ProxyStats
from rustbalance.tor.control import ControlConnection, ReconnectingController, password_from_env
from rustbalance.tor.control_protocol import parse_bootstrap_phase
from rustbalance.tor.process import ManagedTor, SystemTor, TorProcess, pick_free_ports

__all__ = ["NodeRuntime"]

log = logging.getLogger(DAEMON_LOGGER)

OnConnected = Callable[[ControlConnection], Awaitable[None]]
OnBootstrap = Callable[[int], None]
# The managed tor gets SIGTERM, then SIGKILL after this; the "stop tor" shutdown step (and
# closing what is left after the shutdown hooks) are bounded by these.
TOR_STOP_TIMEOUT_SECS = 4.0
STOP_TOR_STEP_SECS = 5.0
CLOSE_STEP_SECS = 2.0
# A CLOSECIRCUIT for a circuit the proxy cut may wait this long for tor's answer.
CLOSE_CIRCUIT_SECS = 10.0
# How often the system tor's bootstrap phase is asked while start-up waits for it.
_BOOTSTRAP_POLL_SECS = 1.0


class NodeRuntime:
    def __init__(
        self,
        config: Config,
        identity: NodeIdentity,
        clock: Clock,
        on_bootstrap: OnBootstrap = lambda _percent: None,
    ) -> None:
        self.config = config
        self.identity = identity
        self._clock = clock
        # Told tor's bootstrap progress while start-up waits for it (readiness).
        self._on_bootstrap = on_bootstrap
        self.watchdog = TorWatchdog(
            # Phase 1.2 numbers, the restart bounded by tor's bootstrap (+30 s).
            WatchdogPolicy(
                check_interval=config.tor.watchdog_interval_secs,
                restart_timeout=config.tor.bootstrap_timeout_secs + 30.0,
            )
        )
        # The systemd watchdog's health check (node/health.py): tor's side, and the record of
        # the supervised tasks' failures the supervisor keeps.
        self.health = WatchdogHealth(HealthPolicy(control_budget(self.watchdog.policy)))
        self.task_record = TaskRecord()
        self.tor_stop_timeout = TOR_STOP_TIMEOUT_SECS
        self.stop_tor_timeout = STOP_TOR_STEP_SECS
        self.close_timeout = CLOSE_STEP_SECS
        # [join] / [wireguard] (node/mesh.py): the join responder and the tunnel interface.
        self.mesh = Mesh(config, master_key=identity.master_key)
        self.socks: tuple[str, int] | None = None
        self.metrics_server: MetricsServer | None = None
        self.proxy: ReverseProxy | None = None
        self.prober: HealthProber | None = None
        self.tor: TorProcess | None = None
        self.guarded_tor: GuardedTor | None = None
        self.ctrl: ReconnectingController | None = None
        self.status_server: StatusServer | None = None
        self._proxy_closed = False
        self._tor_stopped = False

    # -- start-up ---------------------------------------------------------------------------

    def controller(self) -> ReconnectingController:
        if self.ctrl is None:
            raise ControlError("no control connection yet")
        return self.ctrl

    def socks_or_raise(self) -> tuple[str, int]:
        if self.socks is None:
            raise ControlError("no SOCKS port yet")
        return self.socks

    def choose_socks(self) -> tuple[str, int]:
        """tor's SOCKS port: managed tor gets a free one unless configured."""
        tor = self.config.tor
        if tor.mode == "managed":
            socks = ("127.0.0.1", tor.socks.port if tor.socks else pick_free_ports(1)[0])
        else:
            assert tor.socks is not None  # the parser fills the system default
            socks = (tor.socks.host, tor.socks.port)
        self.socks = socks
        return socks

    async def start_metrics(self, metrics: NodeMetrics) -> bool:
        """Bind ``/metrics``; True if it serves. A port another program holds is a WARNING and
        the node runs without metrics: under ``Restart=always`` a failed start would loop, and
        serving matters more than being watched (issue 17)."""
        listen = self.config.metrics.listen
        try:
            self.metrics_server = await start_metrics_server(
                metrics,
                enabled=self.config.metrics.enabled,
                host=listen.host,
                port=listen.port,
            )
        except OSError as exc:
            log.warning(
                "metrics.listen: cannot listen on %s: %s; metrics are off until a restart "
                "(choose a free port, or set [metrics] enabled = false)",
                listen,
                os.strerror(exc.errno) if exc.errno else exc,
            )
            return False
        return self.metrics_server is not None

    async def start_proxy(self, socks: tuple[str, int]) -> ReverseProxy:
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
                master_onion=self.identity.master_address,
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
                settings, interceptor=self.mesh.interceptor(), close_circuit=self.close_circuit
            )
            await proxy.start()
        except RustBalanceError as exc:
            raise StartupError(f"reverse proxy: {exc}") from None
        self.proxy = proxy
        return proxy

    async def close_circuit(self, circuit: int) -> None:
        """The proxy cut a circuit: ask tor to close it (control-spec §3.16 CLOSECIRCUIT; the
        id in tor's PROXY line is the circuit's global identifier, the control port's id:
        tor's connection_edge.c, export_hs_client_circuit_id)."""
        if self.ctrl is not None:
            async with asyncio.timeout(CLOSE_CIRCUIT_SECS):
                await self.ctrl.request("CLOSECIRCUIT", str(circuit))

    def start_prober(self, proxy: ReverseProxy) -> None:
        """``[health] http_probe_enabled``: probe the target the way the proxy reaches it."""
        health = self.config.health
        if not health.http_probe_enabled:
            return
        # An onion target is reached through tor, which needs time to settle after start-up;
        # a direct target is probed after one interval (at most the default delay).
        start_delay = DEFAULT_START_DELAY_SECS
        if not proxy.settings.target.is_onion:
            start_delay = min(start_delay, health.http_probe_interval_secs)
        self.prober = HealthProber(
            proxy.settings,
            health,
            start_delay=start_delay,
            clock=self._clock.monotonic,
            sleep=self._clock.sleep,
        )
        log.info(
            "Target health probe: GET %s every %g s (first in %g s)",
            health.http_probe_path,
            health.http_probe_interval_secs,
            start_delay,
        )

    async def start_tor(self, proxy_port: int, *, publish_descriptors: bool) -> TorProcess:
        tor_cfg = self.config.tor
        settings = onion_service_settings(
            self.config, proxy_port, publish_descriptors=publish_descriptors
        )
        if tor_cfg.mode == "managed":
            assert self.socks is not None
            lines = [*onion_service_torrc(settings).splitlines(), *tor_cfg.extra_torrc]
            try:
                managed = ManagedTor(
                    tor_cfg.data_dir,
                    lines,
                    tor_binary=tor_cfg.binary,
                    socks_port=self.socks[1],
                    bootstrap_timeout=tor_cfg.bootstrap_timeout_secs,
                    stop_timeout=self.tor_stop_timeout,
                    on_progress=self._on_bootstrap,
                )
            except TorProcessError as exc:
                raise StartupError(f"tor.extra_torrc: {exc}", EXIT_CONFIG) from None
            self._guard(managed)
            log.info("Starting tor (managed, data dir %s)", tor_cfg.data_dir)
            try:
                await managed.start()
            except TorProcessError as exc:
                raise StartupError(f"tor did not start: {exc}") from None
            self._on_bootstrap(100)  # start() returned after "Bootstrapped 100%"
            return managed
        socks = tor_cfg.socks
        if socks is None or tor_cfg.control is None:
            raise StartupError("system mode needs tor.control, tor.socks, tor.torrc_include", 2)
        write_system_include(self.config, system_include(self.config, self.identity, settings))
        system = SystemTor(str(tor_cfg.control), (socks.host, socks.port))
        self._guard(system)
        return system

    def _guard(self, tor: TorProcess) -> None:
        self.tor = tor
        self.guarded_tor = GuardedTor(
            tor,
            connected=lambda: self.ctrl is not None and self.ctrl.connection is not None,
            hung_after=TOR_HUNG_INTERVALS * self.config.tor.watchdog_interval_secs,
            clock=self._clock.monotonic,
        )

    async def start_controller(self, on_connected: OnConnected) -> ReconnectingController:
        assert self.tor is not None
        ctrl = ReconnectingController(
            self.tor.control_address,
            password=password_from_env(),
            # Loopback: reconnect quickly after a tor restart (the watchdog restarts tor).
            max_backoff=5.0,
        )
        self.ctrl = ctrl
        ctrl.on_connected(on_connected)
        await ctrl.start()
        try:
            await ctrl.wait_connected(CONTROL_WAIT_SECS)
        except ControlError as exc:
            raise StartupError(f"tor control port {self.tor.control_address}: {exc}") from None
        if self.config.tor.mode == "system":
            await self.reload_system_tor()
            await self._wait_bootstrapped()
        return ctrl

    async def _wait_bootstrapped(self) -> None:
        """System mode: wait (at most ``tor.bootstrap_timeout_secs``) until the system tor's
        ``status/bootstrap-phase`` says PROGRESS=100, reporting each step (a managed tor's
        start() already waited for its own)."""
        ctrl = self.controller()
        on_bootstrap = self._on_bootstrap
        limit = self.config.tor.bootstrap_timeout_secs
        progress = 0
        try:
            async with asyncio.timeout(limit):
                while True:
                    info = await ctrl.get_info("status/bootstrap-phase")
                    progress = parse_bootstrap_phase(info.get("status/bootstrap-phase", ""))
                    on_bootstrap(progress)
                    if progress >= 100:
                        log.info("System tor bootstrapped (100%)")
                        return
                    await self._clock.sleep(_BOOTSTRAP_POLL_SECS)
        except TimeoutError:
            raise StartupError(
                f"the system tor did not bootstrap within {limit:.0f} s (at {progress}%)"
            ) from None
        except ControlError as exc:
            raise StartupError(f"tor control port: {exc}") from None

    async def reload_system_tor(self) -> None:
        ctrl = self.controller()
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

    async def start_status(self, provider: StatusProvider) -> None:
        self.status_server = StatusServer(self.config.node.status_socket, provider)
        try:
            await self.status_server.start()
        except RustBalanceError as exc:
            raise StartupError(f"status endpoint: {exc}") from None

    # -- tor's health -----------------------------------------------------------------------

    def tor_running(self) -> bool:
        """Last observed (the watchdog checks every interval); True before tor was started."""
        return self.guarded_tor is None or self.guarded_tor.running

    async def watch_tor(self, on_restarted: Callable[[], Awaitable[None]]) -> None:
        """Supervised task: the tor watchdog (node/watchdog.py)."""
        assert self.guarded_tor is not None
        await run_tor_watchdog(
            self.guarded_tor,
            clock=self._clock.monotonic,
            sleep=self._clock.sleep,
            on_restarted=on_restarted,
            watchdog=self.watchdog,
        )

    async def after_tor_restart(self) -> float | None:
        """What a tor restart loses (system.md W7): the system tor re-reads our include; the
        controller reconnects and re-subscribes by itself. The restart time (unix seconds)."""
        if self.config.tor.mode == "system":
            await self.reload_system_tor()
        await self.controller().wait_connected(CONTROL_WAIT_SECS)
        restarted = self.watchdog.last_restart_at
        if restarted is None:
            return None
        # The watchdog's clock is monotonic; intro points are read on the wall clock.
        return self._clock.wall() - (self._clock.monotonic() - restarted)

    def health_problem(self, tasks: Sequence[TaskSpec]) -> str | None:
        """The systemd watchdog's check (node/health.py): None while the node is healthy."""
        ctrl = self.ctrl
        now = self._clock.monotonic()
        return self.health.problem(
            now,
            tasks=self.task_record.health(tasks, now),
            control_up=ctrl is not None and ctrl.connection is not None,
            tor_gave_up=self.watchdog.consecutive_failures >= self.watchdog.policy.give_up_after,
        )

    # -- for status and metrics -------------------------------------------------------------

    def tor_snapshot(self) -> TorSnapshot:
        stats = self.watchdog.stats()
        return TorSnapshot(
            mode=self.config.tor.mode,
            running=self.guarded_tor.running if self.guarded_tor is not None else False,
            restarts=stats.restarts,
            restart_failures=stats.failures,
        )

    def proxy_stats(self) -> ProxyStats | None:
        return self.proxy.stats.snapshot() if self.proxy is not None else None

    def target_snapshot(self) -> TargetSnapshot | None:
        prober = self.prober
        if prober is None:
            return None
        last = prober.last_result
        return TargetSnapshot(
            healthy=prober.up,
            probes=prober.probes,
            consecutive_failures=prober.state.consecutive_failures,
            last_probe=last.detail if last is not None else None,
        )

    # -- shutdown ---------------------------------------------------------------------------

    async def drain_proxy(self) -> None:
        """Stop accepting and let open connections finish, bounded (Phase 2.5)."""
        proxy = self.proxy
        if proxy is not None and not self._proxy_closed:
            self._proxy_closed = True
            active = proxy.stats.active
            await proxy.close(self.config.proxy.drain_timeout_secs)
            log.info("Proxy stopped (%d connections were open)", active)

    async def stop_tor(self) -> None:
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
            await self.drain_proxy()
        with contextlib.suppress(Exception):
            await self.stop_tor()
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
