"""benchmarks/bench_distinct.py: the chi-square p-value against known quantiles, the rows."""

from __future__ import annotations

from collections import Counter

import pytest
from benchmarks.bench_distinct import _chi2_sf, _chi_square_p, _row

from rustbalance.testnet.fresh_clients import Samples, node_of


@pytest.mark.parametrize(
    ("x", "dof", "p"),
    [(3.841, 1, 0.05), (6.635, 1, 0.01), (18.307, 10, 0.05), (9.342, 10, 0.5), (0.0, 3, 1.0),
     (100.0, 5, 5.3e-20), (1.145, 5, 0.95)],
)  # fmt: skip
def test_the_chi_square_tail_matches_the_tables(x: float, dof: int, p: float) -> None:
    assert _chi2_sf(x, dof) == pytest.approx(p, rel=2e-3, abs=1e-12)


def test_counts_as_expected_pass_and_a_skew_fails() -> None:
    expected = {"a": 0.25, "b": 0.25, "c": 0.5, "d": 0.0}
    fair = _chi_square_p(Counter(a=25, b=25, c=50), expected)
    skewed = _chi_square_p(Counter(a=60, b=20, c=20), expected)
    assert fair is not None and fair > 0.99
    assert skewed is not None and skewed < 1e-6
    assert _chi_square_p(Counter(), expected) is None


def test_a_row_reports_min_median_max_and_the_nodes_reached() -> None:
    samples = Samples(Counter({"node-00": 6, "node-01": 3, "node-02": 1}), failures=2, fetches=6)
    expected = {"node-00": 0.5, "node-01": 0.3, "node-02": 0.2}
    row = _row(3, "auto", samples, expected, 3, 12.0)
    assert (row["answered"], row["failed"], row["reached"]) == (10, 2, 3)
    assert (row["share_min"], row["share_median"], row["share_max"]) == (0.1, 0.3, 0.6)
    assert row["expected_reached"] == 3 and row["chi2_p"] is not None


def test_the_target_names_the_node() -> None:
    assert node_of("hello from node-c-target\n") == "node-c"
    assert node_of("hello from -target") is None
    assert node_of("<html>") is None
