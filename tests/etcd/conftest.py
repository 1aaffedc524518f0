"""Fixtures: a test PKI (one per session) and a fresh 3-member etcd cluster per test.

The cluster runs with TLS, client-certificate auth and the RBAC of docs/etcd.md (each node may
write only its own keys and read the prefix); every member is stopped by its PID after the
test, also when it fails (its logs stay in the test's temp folder).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from rustbalance.cluster.etcd_backend import EtcdBackend
from rustbalance.cluster.etcd_client import EtcdClient, TlsMaterial
from rustbalance.cluster.etcd_state import EtcdKeys, LeaseTimings
from rustbalance.testnet.etcd_cluster import ClientCert, EtcdCluster, TestPki

NODES = ("node-a", "node-b", "node-c")
# Short so that expiry and takeover fit a lean test: keep-alive every 1.33 s, a cut-off
# publisher steps down 3 s after its last answered keep-alive was sent, etcd expires at 4 s.
TTL = 4


def identity(point: bytes) -> bytes:
    return point


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    pki = TestPki(tmp_path_factory.mktemp("etcd-pki"))
    for node_id in NODES:
        pki.client(node_id)
    pki.client("stranger")  # right CA, but no etcd user of that name
    pki.foreign_client("node-a")  # the right name, from a CA etcd does not trust
    return pki


@pytest.fixture
def etcd(pki: TestPki, tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd", pki, node_ids=NODES)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def cert(pki: TestPki, name: str, *, foreign: bool = False) -> ClientCert:
    stem = f"foreign-{name}" if foreign else f"client-{name}"
    return ClientCert(name, pki.directory / f"{stem}.pem", pki.directory / f"{stem}-key.pem")


def tls(pki: TestPki, who: ClientCert) -> TlsMaterial:
    return TlsMaterial(
        pki.ca_path.read_bytes(), who.cert_path.read_bytes(), who.key_path.read_bytes()
    )


class Fleet:
    """Starts backends against the test's cluster; :meth:`kill` ends one without revoking its
    lease (what SIGKILL does to a node: its keep-alives stop, its keys expire)."""

    def __init__(self, etcd: EtcdCluster, pki: TestPki) -> None:
        self.etcd = etcd
        self.pki = pki
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.backends: list[EtcdBackend[bytes]] = []

    def start(
        self,
        node_id: str,
        *,
        endpoints: list[str] | None = None,
        client_cert: ClientCert | None = None,
        eligible: bool = True,
        ttl: int = TTL,
    ) -> EtcdBackend[bytes]:
        timings = LeaseTimings(ttl)
        client = EtcdClient(
            endpoints or self.etcd.endpoints,
            tls(self.pki, client_cert or cert(self.pki, node_id)),
            timeout=timings.rpc_timeout,
        )
        backend: EtcdBackend[bytes] = EtcdBackend(
            node_id=node_id,
            priority=10,
            publisher_eligible=eligible,
            client=client,
            keys=EtcdKeys(self.etcd.prefix),
            timings=timings,
            encode_intro_point=identity,
            decode_intro_point=identity,
        )
        backend.report_intro_points([f"{node_id}-ip1".encode(), f"{node_id}-ip2".encode()])
        self.tasks[id(backend)] = asyncio.create_task(backend.run(), name=f"etcd-{node_id}")
        self.backends.append(backend)
        return backend

    async def kill(self, backend: EtcdBackend[bytes]) -> None:
        task = self.tasks.pop(id(backend))
        task.cancel()
        await asyncio.wait([task], timeout=10)

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for backend in self.backends:  # the daemon closes it in leave(); a killed node never
            await backend.client.close()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise AssertionError(f"{task.get_name()} failed: {task.exception()!r}")


@pytest.fixture
async def fleet(etcd: EtcdCluster, pki: TestPki) -> AsyncIterator[Fleet]:
    fleet = Fleet(etcd, pki)
    try:
        yield fleet
    finally:
        await fleet.close()


async def until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> float:  # noqa: ASYNC109
    """Wait (bounded) until ``predicate()`` holds; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - start


def holders(nodes: list[EtcdBackend[bytes]]) -> list[str]:
    return [b.node_id for b in nodes if b.is_publisher]
