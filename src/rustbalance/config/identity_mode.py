"""Which identity mode a node runs in, and which it may not (issue 14). Pure.

``node.identity_mode`` left out gives the mode that stays reachable for this node's setup:

- ``instance`` for a node that is part of a cluster (coordination peers, ``[join]`` answering
  joins, a ``[wireguard]`` mesh, or members admitted in an earlier run): every intro point it
  publishes survives tor's next descriptor rotation (docs/architecture.md, "Descriptor
  rotation and time periods");
- ``shared`` for a lone node: tor publishes the master descriptor itself (and with it
  proof-of-work, config/pow.py).

``shared`` with 2+ nodes is refused, with one line that names the fix: its tor shows, and
keeps alive, only the intro points of the descriptor it drops at its next rotation
(hs_service.c ``rotate_service_descriptors``; control_getinfo.c ->
``hs_service_lookup_current_desc``), so every listed intro point dies at once and clients
that fetch before the publisher's next upload fail.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "SHARED_CLUSTER_PROBLEM",
    "IdentityMode",
    "cluster_identity_problem",
    "effective_identity_mode",
]

IdentityMode = Literal["shared", "instance"]

# The refusal (one line; the parser and the daemon prefix nothing else to it but the key).
SHARED_CLUSTER_PROBLEM = (
    'node.identity_mode: "shared" loses every intro point at tor\'s daily descriptor rotation '
    'when 2+ nodes serve the master (docs/architecture.md): set identity_mode = "instance" '
    "or leave it out, node by node (the master address does not change)"
)


def effective_identity_mode(configured: IdentityMode | None, clustered: bool) -> IdentityMode:
    """The mode a node runs in: the configured one, else ``instance`` in a cluster and
    ``shared`` alone (see the module doc)."""
    if configured is not None:
        return configured
    return "instance" if clustered else "shared"


def cluster_identity_problem(mode: IdentityMode, clustered: bool) -> str | None:
    """Why ``mode`` is refused for this node (None when it is fine): ``shared`` in a
    cluster cannot be made gap-free (see the module doc)."""
    if mode == "shared" and clustered:
        return SHARED_CLUSTER_PROBLEM
    return None
