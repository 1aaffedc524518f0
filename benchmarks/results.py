"""Structured benchmark results, next to the Markdown tables.

Each benchmark module records the numbers its tables show (``record(section, key, value)``,
JSON values only); ``benchmarks.run`` writes them to ``benchmarks/results.json`` and
``benchmarks.charts`` draws the PNG charts of BENCHMARKS.md from that file, never from the
Markdown. A ``--only`` run replaces just the sections its module recorded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

RESULTS_FILE = Path(__file__).resolve().parent / "results.json"

_current: dict[str, dict[str, Any]] = {}


def record(section: str, key: str, value: Any) -> None:
    """Store ``value`` (made of dicts, lists, str, numbers, None) under ``section``/``key``."""
    json.dumps(value, allow_nan=False)  # fail at once on what JSON cannot hold
    _current.setdefault(section, {})[key] = value


def take() -> dict[str, dict[str, Any]]:
    """The sections recorded since the last call (and forget them)."""
    out = dict(_current)
    _current.clear()
    return out


def finite(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (JSON has no inf/nan)."""
    return value if value is not None and math.isfinite(value) else None


def load(path: Path = RESULTS_FILE) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def save(data: dict[str, Any], path: Path = RESULTS_FILE) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
