"""End-to-end tests of the node daemon on the private Tor network.

:func:`running_node` is the reusable piece: it starts ``rustbalance run`` as a subprocess (a
managed tor joining the session's private network through ``tor.extra_torrc``, a
:class:`~tests.torhelpers.NamedHTTPServer` as the target) and always stops it by PID, with
SIGTERM and then SIGKILL, also when the test fails. Survival tests (watchdog, timeouts, HSPOST
failures, both halves of a period) build on it with ``overrides``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from rustbalance.demo import NodeProcess, write_node_config
from rustbalance.testnet import PrivateTorNetwork
from rustbalance.tor.process import pid_is_alive
from tests.torhelpers import NamedHTTPServer

__all__ = ["RunningNode", "running_node"]

# Managed tor bootstrap + intro circuits + first publish: ~10 s observed on the private
# network; generous because CI machines are slower and the network may be busy.
NODE_PUBLISH_TIMEOUT = 180.0


@dataclass
class RunningNode:
    process: NodeProcess
    config_path: Path
    master: IdentityKey
    target: NamedHTTPServer
    work_dir: Path

    @property
    def address(self) -> str:
        return self.master.onion_address

    def tor_pid(self) -> int | None:
        """PID of the node's managed tor (from the daemon's log), None if not logged yet."""
        found = re.findall(r"started tor pid (\d+)", self.process.log_text())
        return int(found[-1]) if found else None

    def wait_published(self, timeout: float = NODE_PUBLISH_TIMEOUT) -> None:
        self.process.wait_for_log(r"Published descriptor for", timeout)


def _is_tor(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "tor"
    except OSError:
        return False


@contextlib.contextmanager
def running_node(
    network: PrivateTorNetwork,
    work_dir: Path,
    name: str = "node-a",
    *,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    master: IdentityKey | None = None,
) -> Iterator[RunningNode]:
    """Start a node daemon joined to ``network``; stop it (and its target) afterwards."""
    work_dir.mkdir(parents=True, exist_ok=True)
    master = master or IdentityKey.generate(secrets.token_bytes)
    key_file = work_dir / "master.key"
    write_seed_key_file(master, key_file)
    target = NamedHTTPServer(f"{name}-target")
    node: NodeProcess | None = None
    try:
        config = write_node_config(
            work_dir / "config.toml",
            node_id=name,
            key_file=key_file,
            master_address=master.onion_address,
            target=f"127.0.0.1:{target.port}",
            work_dir=work_dir,
            extra_torrc=network.client_torrc_lines(),
            overrides=overrides,
        )
        node = NodeProcess(config, work_dir / "node.log")
        node.start()
        yield RunningNode(node, config, master, target, work_dir)
    finally:
        if node is not None:
            running = RunningNode(node, work_dir / "config.toml", master, target, work_dir)
            tor_pid = running.tor_pid()
            node.stop()
            # The managed tor exits with the daemon (SIGTERM, or __OwningControllerProcess
            # after a SIGKILL); make sure by PID.
            if tor_pid is not None and pid_is_alive(tor_pid) and _is_tor(tor_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(tor_pid, signal.SIGKILL)
        target.close()
