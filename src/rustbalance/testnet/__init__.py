"""A private Tor network on 127.0.0.1 for tests, the demo and benchmarks (tor.md §13)."""

from rustbalance.testnet.network import (
    AUTHORITY_COUNT,
    DEFAULT_CONSENSUS_PARAMS,
    ConsensusSummary,
    PrivateTorNetwork,
    Role,
    TorInstance,
)

__all__ = [
    "AUTHORITY_COUNT",
    "DEFAULT_CONSENSUS_PARAMS",
    "ConsensusSummary",
    "PrivateTorNetwork",
    "Role",
    "TorInstance",
]
