"""The node layer's shape (docs/architecture.md, "The node layer"), measured from the code.

The daemon is wiring only; components read time only through the injected clock; the pure
cores do no I/O; imports go one way (the daemon imports components, never the reverse); the
embedded coordinator is used behind one adapter."""

from __future__ import annotations

import ast
from pathlib import Path

NODE = Path(__file__).resolve().parents[2] / "src" / "rustbalance" / "node"
# Modules of other owners or older than this layout that keep their own structure.
NOT_COMPONENTS = {"join.py", "mesh.py"}
PURE = (
    "cluster_mode.py",
    "publication.py",
    "distinct_round.py",
    "snapshot.py",
    "intro_tracker.py",
    "backend_state.py",
    "rotation.py",
)
IO_MODULES = {"asyncio", "socket", "subprocess", "os", "time", "rustbalance.tor.control"}


def tree(name: str) -> ast.Module:
    return ast.parse((NODE / name).read_text())


def imported(module: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def components() -> list[str]:
    return sorted(p.name for p in NODE.glob("*.py") if p.name not in NOT_COMPONENTS)


def test_the_daemon_is_wiring_only() -> None:
    lines = (NODE / "daemon.py").read_text().splitlines()
    assert len(lines) <= 250
    daemon = next(
        n for n in tree("daemon.py").body if isinstance(n, ast.ClassDef) and n.name == "Daemon"
    )
    methods = [n for n in daemon.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    assert len(methods) <= 12
    assert max(m.end_lineno - m.lineno + 1 for m in methods if m.end_lineno) <= 60


def test_components_read_time_only_through_the_clock() -> None:
    offenders = []
    for name in components():
        if name == "clock.py":
            continue
        for node in ast.walk(tree(name)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "time"
                and node.func.attr in ("time", "monotonic")
            ):
                offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


def test_pure_cores_do_no_io() -> None:
    for name in PURE:
        assert imported(tree(name)) & IO_MODULES == set(), name


def test_imports_go_from_the_daemon_to_the_components() -> None:
    for name in components():
        if name != "daemon.py":
            assert "rustbalance.node.daemon" not in imported(tree(name)), name


def test_the_coordinator_is_used_behind_one_adapter() -> None:
    users = [
        name
        for name in components()
        if any(
            isinstance(node, ast.ImportFrom)
            and node.module == "rustbalance.cluster.coordinator"
            and any(alias.name == "Coordinator" for alias in node.names)
            for node in ast.walk(tree(name))
        )
    ]
    assert users == ["coordination.py"]
