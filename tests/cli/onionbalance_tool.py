"""The real ``onionbalance-config`` (PyPI ``onionbalance``), in a venv of its own.

The same cache as the benchmarks' (``.bench-venv``, git-ignored, the same version): created on
first use with ``pip install onionbalance==0.2.4`` (needs PyPI), reused afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OB_VERSION = "0.2.4"
OB_VENV = Path(__file__).resolve().parents[2] / ".bench-venv"


def onionbalance_bin(name: str = "onionbalance-config") -> Path:
    binary = OB_VENV / "bin" / name
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OB_VENV)], check=True, timeout=120)
        subprocess.run(
            [str(OB_VENV / "bin" / "pip"), "install", "-q", f"onionbalance=={OB_VERSION}"],
            check=True,
            timeout=600,
        )
    return binary


def generate_config(out: Path, instances: int = 2, *extra: str) -> tuple[Path, list[Path]]:
    """Run ``onionbalance-config --no-interactive``; returns (config.yaml, master key files)."""
    subprocess.run(
        [str(onionbalance_bin()), "--no-interactive", "-n", str(instances), "--output",
         str(out), *extra],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out / "config.yaml", sorted(out.glob("*.key"))


def fill_instances(config: Path, addresses: list[str]) -> None:
    """What the operator does next: put the instances' addresses over the placeholders."""
    text = config.read_text()
    for address in addresses:
        text = text.replace("<Enter the instance onion address here>", address, 1)
    config.write_text(text)
