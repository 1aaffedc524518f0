"""cluster/etcd_backend.py's shell without etcd: a fault real etcd cannot produce on demand.

grpc cancels the calls of a closed channel with ``asyncio.CancelledError``; the client turns
that into ``EtcdUnavailable`` (tests/etcd proves it against a real cluster). Should any such
cancellation still reach one of the backend's tasks, the backend must fail loudly (its
supervisor restarts it) rather than go on without a watcher: a TaskGroup drops a child that
was cancelled from within without a word. The client here is a real ``EtcdClient`` whose
calls are replaced; nothing connects anywhere."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rustbalance.cluster.etcd_backend import EtcdBackend
from rustbalance.cluster.etcd_client import EtcdClient, KeyValue, Lease, TlsMaterial
from rustbalance.cluster.etcd_state import EtcdKeys, LeaseTimings
from rustbalance.testnet.etcd_cluster import TestPki


def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EtcdBackend[bytes]:
    pki = TestPki(tmp_path / "pki")
    who = pki.client("node-a")
    tls = TlsMaterial(
        pki.ca_path.read_bytes(), who.cert_path.read_bytes(), who.key_path.read_bytes()
    )
    client = EtcdClient(["127.0.0.1:9"], tls, timeout=0.5)

    async def grant(ttl: int) -> Lease:
        return Lease(1, ttl)

    async def keep_alive(lease_id: int) -> int:
        return 4

    async def cancelled_listing(prefix: bytes) -> tuple[int, list[KeyValue]]:
        raise asyncio.CancelledError  # what grpc raised for a call on a closed channel

    async def put(key: bytes, value: bytes, lease: int) -> int:
        return 2

    async def create(key: bytes, value: bytes, lease: int) -> int | None:
        return 3

    for name, call in (
        ("grant", grant),
        ("keep_alive", keep_alive),
        ("get_prefix", cancelled_listing),
        ("put", put),
        ("create", create),
    ):
        monkeypatch.setattr(client, name, call)
    return EtcdBackend(
        node_id="node-a",
        priority=10,
        publisher_eligible=True,
        client=client,
        keys=EtcdKeys("/rustbalance/"),
        timings=LeaseTimings(4),
        encode_intro_point=bytes,
        decode_intro_point=bytes,
    )


async def test_a_task_cancelled_from_within_fails_the_run_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = backend(tmp_path, monkeypatch)
    run = asyncio.create_task(node.run())
    done, _ = await asyncio.wait([run], timeout=5)
    assert done, "the backend went on without its watcher"
    error = run.exception()
    assert isinstance(error, ExceptionGroup)
    assert [str(e) for e in error.exceptions] == ["etcd watch task was cancelled from within"]


async def test_cancelling_the_run_itself_is_a_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = backend(tmp_path, monkeypatch)

    async def listing(prefix: bytes) -> tuple[int, list[KeyValue]]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(node.client, "get_prefix", listing)
    run = asyncio.create_task(node.run())
    await asyncio.sleep(0.05)
    run.cancel()
    await asyncio.wait([run], timeout=5)
    assert run.cancelled()
