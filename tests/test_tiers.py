"""`make unit` selects no test of the tor, slow or root tiers, and says what it left out.

Collects the whole suite the way the Makefile's ``unit`` target runs it (in a subprocess, as
a user would) and checks the selection against the places that must never be in it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Modules whose every test starts tor, runs for seconds or needs root.
NEVER_IN_UNIT = (
    "tests/cluster_net/test_coordinator_udp.py",
    "tests/cluster_net/test_forged_gossip_address.py",
    "tests/cluster_net/test_hostile_datagrams.py",
    "tests/cluster_net/test_nontransitive_udp.py",
    "tests/cluster_net/test_wireguard_netns.py",
    "tests/node_e2e/",
    "tests/ops/test_mesh_wireguard_netns.py",
    "tests/ops/test_init_run_join_e2e.py",
    "tests/reliability/test_full_disk.py",
    "tests/reliability/test_availability.py",
    "tests/tor/test_process.py",
    "tests/tor/test_control_real_tor.py",
    "tests/testnet/test_network.py",
)


def unit_arguments() -> list[str]:
    """The pytest arguments of the Makefile's ``unit`` target."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(r'^unit:.*\n\t\$\(VENV\)/bin/pytest -m "([^"]+)"(.*)$', makefile, re.M)
    assert match, "the Makefile has no `unit` target running pytest -m"
    return ["-m", match.group(1), *match.group(2).split()]


@pytest.mark.slow
def test_make_unit_leaves_out_every_tor_slow_and_root_test() -> None:
    arguments = unit_arguments()
    assert arguments[1] == "not tor and not slow and not root"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *arguments,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    selected = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(selected) > 1000
    wrong = [test for test in selected if test.startswith(NEVER_IN_UNIT)]
    assert wrong == []
    summary = re.search(r"(\d+) tests deselected: tor (\d+), slow (\d+), root (\d+)", result.stdout)
    assert summary, result.stdout[-2000:]
    assert all(int(count) > 0 for count in summary.groups())
