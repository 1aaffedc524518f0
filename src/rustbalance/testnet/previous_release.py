"""``rustbalance`` as the release before issue 14 ran it: ``shared`` mode allowed in a cluster.

Issue 14 refuses ``node.identity_mode = "shared"`` with 2+ nodes (config/identity_mode.py):
the parser's rule and the start-up check of saved peers. An existing ``shared`` cluster is
moved to ``instance`` mode node by node (docs/config.md, "Identity modes"), so during that
rolling change nodes of the older release still run ``shared`` next to upgraded ones. No older
release can be installed on the test machine (the project publishes no package), so this entry
point stands in for one: today's code with exactly that refusal lifted; every other rule and
code path, the ``shared`` mode's included, is today's. Used by the rolling-migration test
(tests/reliability/test_availability.py) and by the benchmark's ``shared`` peer
(benchmarks/bench_availability.py), through :class:`rustbalance.testnet.node.NodeProcess`::

    python -m rustbalance.testnet.previous_release run --config FILE
"""

from __future__ import annotations

import sys

from rustbalance.cli.main import main
from rustbalance.config import parser
from rustbalance.config.schema import Config
from rustbalance.node import startup

__all__ = ["MODULE", "lift_shared_cluster_refusal"]

MODULE = "rustbalance.testnet.previous_release"


def _no_refusal(config: Config, problems: list[str]) -> None:
    """The release before issue 14 had no rule about the identity mode in a cluster."""
    del config, problems


def _no_problem(mode: str, clustered: bool) -> None:
    del mode, clustered


def lift_shared_cluster_refusal() -> None:
    """Lift the refusal of ``shared`` in a cluster in this process (config check and start)."""
    parser._check_identity_mode = _no_refusal
    startup.cluster_identity_problem = _no_problem  # type: ignore[attr-defined]


if __name__ == "__main__":
    lift_shared_cluster_refusal()
    sys.exit(main(sys.argv[1:]))
