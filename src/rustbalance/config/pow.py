"""Where tor's proof-of-work defence can work under the master address (pure; docs/pow.md).

A client binds its PoW solution to the blinded key of the descriptor it fetched and to the seed
in that descriptor's ``pow-params`` (tor ``hs_client.c`` ``consider_sending_introduce1``). The
tor that receives the INTRODUCE2 checks it against the blinded key of *its own* descriptor that
owns the intro point and against *its own* two seeds (``hs_cell.c``
``handle_introduce2_encrypted_cell_pow_extension`` -> ``hs_pow.c`` ``hs_pow_verify``), and drops
the request if it does not verify; a tor with PoW off drops every request that carries one.
Each tor draws its seed at random and rotates it on its own (``hs_service.c``
``initialize_pow_defenses``, ``rotate_pow_seeds``), and a descriptor may carry one ``v1`` seed
(``hs_descriptor.c`` ``decode_pow_params``).

So PoW works only where tor publishes the master descriptor itself: a lone node whose tor hosts
the master key (``identity_mode = "shared"``) with no peers, plain backends or joins. Wherever
RustBalance merges the master descriptor, ``tor.pow_enabled`` is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["POW_DOC", "pow_refusal"]

POW_DOC = "docs/pow.md"

_SEED_WHY = (
    "each node's tor checks a solution against its own random seed and the one master "
    "descriptor names one seed, so the other nodes' tors would drop every solved introduction"
)
_BLINDED_WHY = (
    "an instance's tor checks a solution against its own blinded key while clients solve for "
    "the master's, so it would drop every solved introduction"
)


def pow_refusal(
    *,
    identity_mode: str,
    peers: Sequence[object] = (),
    backends: Sequence[str] = (),
    join_enabled: bool = False,
    learned_peers: bool = False,
    etcd: bool = False,
) -> str | None:
    """The problem with ``tor.pow_enabled = true`` for this node, or None where PoW works.

    ``learned_peers``: the membership saved by an earlier run lists other members, which the
    config alone cannot show.
    """
    merged: list[str] = []
    if peers:
        merged.append("coordination.peers is set")
    if etcd:
        # The lease holder merges every member's intro points (docs/etcd.md).
        merged.append('coordination.backend = "etcd"')
    if learned_peers:
        merged.append("this node's saved membership lists other members")
    if join_enabled:
        merged.append("join.enabled = true")
    if backends:
        merged.append("master.backends is set")
    instance = identity_mode == "instance"
    if instance:
        merged.append('node.identity_mode = "instance"')
    if not merged:
        return None
    why = [_SEED_WHY] if len(merged) > int(instance) else []
    if instance:
        why.append(_BLINDED_WHY)
    return (
        "tor.pow_enabled: proof-of-work cannot work where RustBalance, not tor, writes the "
        f"master descriptor ({'; '.join(merged)}): {'; and '.join(why)}. It works only on a "
        'lone node with identity_mode = "shared" and no peers, backends or joins, whose tor '
        "publishes the master descriptor itself. Set tor.pow_enabled = false "
        "(tor.intro_dos_enabled rate-limits introductions at the intro points and works in a "
        f"cluster); see {POW_DOC}"
    )
