"""Hypothesis example budgets: each fuzz test states its full budget; `make unit` runs less.

A test writes ``@settings(max_examples=budget(300))``: 300 in `make test` and in any plain
``pytest`` run, 30 with ``pytest --fuzz-scale 0.1`` (what `make unit` passes), never fewer
than :data:`MIN_EXAMPLES`. Tests that state no budget get Hypothesis' default of 100, scaled
the same way (tests/conftest.py loads the matching profile).
"""

from __future__ import annotations

__all__ = ["DEFAULT_EXAMPLES", "MIN_EXAMPLES", "budget", "set_scale"]

DEFAULT_EXAMPLES = 100  # Hypothesis' own default max_examples
MIN_EXAMPLES = 10
_scale = [1.0]


def set_scale(scale: float) -> None:
    """Called once by tests/conftest.py, before any test module is imported."""
    if not 0 < scale <= 1:
        raise ValueError(f"the fuzz scale must be in (0, 1], got {scale}")
    _scale[0] = scale


def budget(full: int) -> int:
    """The number of examples to run for a test whose full budget is ``full``."""
    return max(min(full, MIN_EXAMPLES), round(full * _scale[0]))
