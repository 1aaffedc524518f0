"""Fresh tor clients as a load generator for a master address: which node answers each one.

A *fresh client* is a tor client that remembers nothing about the address: before each fetch
the client's tor gets ``SIGNAL NEWNYM``, which purges its onion-service client state (the
descriptor cache and the HSDir request history: tor ``hs_client.c`` ``hs_client_purge_state``),
so it fetches the descriptor again from the HSDir it picks (``hs_pick_hsdir``: uniformly among
the fetch HSDirs) and then picks an intro point of that descriptor (``client_get_random_intro``).
That is the client model of docs/distinct-descriptors.md section 1, whose exact shares
``descriptor.distinct.reach_probabilities`` computes. Every request goes out on a new SOCKS
isolation (``IsolateSOCKSAuth``: new circuits, and a client intro circuit serves one
introduction), and the target of each node answers ``hello from <node>-target``
(``testnet.apps.NamedHTTPServer``), which names the node.

tor carries out at most one NEWNYM per 10 s and delays the others (``mainloop.c``
``MAX_SIGNEWNYM_RATE``), so one client gives one fresh descriptor fetch per 10 s; several
clients run in parallel, and ``requests_per_fetch`` > 1 adds requests on the same fetched
descriptor (same marginal shares, correlated). Used by the end-to-end test of distinct
descriptors (tests/node_e2e/test_distinct.py) and by the benchmark (benchmarks/
bench_distinct.py): the same sampler, so what is measured is what is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rustbalance.testnet.apps import http_get_via_tor
from rustbalance.testnet.network import TorInstance
from rustbalance.tor.control import ControlConnection

__all__ = ["NEWNYM_INTERVAL_SECS", "Samples", "node_of", "sample_fresh_clients"]

# One NEWNYM per 10 s is carried out at once (MAX_SIGNEWNYM_RATE); a little more, so that
# tor never delays ours (a delayed one would leave the next request on the old descriptor).
NEWNYM_INTERVAL_SECS = 10.5

_PREFIX, _SUFFIX = "hello from ", "-target"


def node_of(body: str) -> str | None:
    """``hello from node-c-target`` -> ``node-c``; None for anything else."""
    text = body.strip()
    if not (text.startswith(_PREFIX) and text.endswith(_SUFFIX)):
        return None
    return text[len(_PREFIX) : -len(_SUFFIX)] or None


@dataclass
class Samples:
    """What the fresh clients got: answers per node, failed requests, descriptor fetches."""

    by_node: Counter[str] = field(default_factory=Counter)
    failures: int = 0
    fetches: int = 0  # NEWNYMs, i.e. fresh descriptor fetches

    @property
    def answered(self) -> int:
        return sum(self.by_node.values())

    @property
    def requests(self) -> int:
        return self.answered + self.failures


async def sample_fresh_clients(
    clients: Sequence[TorInstance],
    address: str,
    *,
    max_requests: int,
    deadline_s: float,
    done: Callable[[Samples], bool] = lambda _samples: False,
    requests_per_fetch: int = 1,
    request_timeout: float = 30.0,
) -> Samples:
    """Run every client as a fresh client until ``done(samples)``, ``max_requests`` requests
    or ``deadline_s`` seconds, whichever comes first; the samples so far. A failed request
    (timeout, no route, an error status) counts as a failure, never raises."""
    if not clients or max_requests < 1 or requests_per_fetch < 1:
        raise ValueError("need at least one client, one request and one request per fetch")
    samples = Samples()
    run_id = secrets.token_hex(4)
    loop = asyncio.get_running_loop()

    def finished() -> bool:
        return samples.requests >= max_requests or done(samples)

    async def one_client(client: TorInstance) -> None:
        socks = client.socks_address
        if socks is None:
            raise ValueError(f"{client.name} has no SOCKS port")
        async with await ControlConnection.connect(client.control_address) as conn:
            count = 0
            while not finished():
                fetched_at = loop.time()
                await conn.signal("NEWNYM")
                samples.fetches += 1
                for _ in range(requests_per_fetch):
                    if finished():
                        return
                    count += 1
                    isolation = f"fresh-{run_id}-{client.name}-{count}"
                    try:
                        status, body = await http_get_via_tor(
                            socks, address, isolation=isolation, timeout=request_timeout
                        )
                    except Exception:  # python-socks and asyncio raise their own types
                        samples.failures += 1
                        continue
                    node = node_of(body) if status == 200 else None
                    if node is None:
                        samples.failures += 1
                    else:
                        samples.by_node[node] += 1
                await asyncio.sleep(max(0.0, fetched_at + NEWNYM_INTERVAL_SECS - loop.time()))

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(deadline_s), asyncio.TaskGroup() as group:
            for client in clients:
                group.create_task(one_client(client))
    return samples
