"""``testnet/`` is a layer below the demo: it builds networks and runs nodes; the demo uses it.

Import cycles between them made ``testnet`` unusable without the demo's module (and its
argument parsing, signal handling and console output) loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rustbalance.testnet

TESTNET = Path(rustbalance.testnet.__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            modules.add(node.module)
    return modules


def test_testnet_never_imports_the_demo() -> None:
    importers = {
        path.name
        for path in TESTNET.glob("*.py")
        if any(
            m == "rustbalance.demo" or m.startswith("rustbalance.demo.")
            for m in imported_modules(path)
        )
    }
    assert importers == set()


def test_testnet_uses_only_layers_below_it() -> None:
    """Tor processes, keys, the node's status reader and the shared modules; never the
    command line, the daemon's internals or the demo."""
    allowed = (
        "rustbalance.testnet",
        "rustbalance.tor",
        "rustbalance.crypto",
        "rustbalance.errors",
        "rustbalance.node.status",
    )
    # previous_release.py is a process entry point (``python -m``) standing in for the release
    # before issue 14: it loads the command line to run it with one rule lifted. The layer's
    # modules only name it (cluster.py imports its MODULE string); test_previous_release_is_
    # only_named checks that.
    found = {
        m
        for path in TESTNET.glob("*.py")
        if path.name != "previous_release.py"
        for m in imported_modules(path)
        if m.startswith("rustbalance") and not m.startswith(allowed)
    }
    assert found == set()


def test_previous_release_is_only_named() -> None:
    """No testnet module uses the stand-in's code, only its module name."""
    for path in TESTNET.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "rustbalance.testnet.previous_release"
            ):
                assert [alias.name for alias in node.names] == ["MODULE"], path.name
