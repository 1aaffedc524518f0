"""Run every benchmark and write BENCHMARKS.md (`make bench`).

Each benchmark module exposes ``run() -> list[str]`` returning Markdown lines. Figures are ratios
against a peer measured in the same run (stem, HAProxy, the direct path), never absolute claims.

``python -m benchmarks.run --only bench_onion`` runs one module and replaces only its sections
(its ``## `` headings) in the existing BENCHMARKS.md, marked with the date of that run; a module
that fails then leaves the file alone.

The modules also record their numbers (``benchmarks.results``): the run writes them to
``benchmarks/results.json`` and draws the PNG charts of the ``## Charts`` section from that
file into ``benchmarks/charts/`` (``benchmarks.charts``).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import charts, results

MODULES: tuple[str, ...] = (
    "benchmarks.bench_descriptor",
    "benchmarks.bench_coordination",
    "benchmarks.bench_proxy",
    "benchmarks.bench_frontdoor",
    "benchmarks.bench_memory",
    "benchmarks.bench_onion",
    "benchmarks.bench_failover",
    "benchmarks.bench_availability",
    "benchmarks.bench_distinct",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument(
        "--only",
        metavar="MODULE",
        help="run one module (e.g. bench_onion) and replace only its sections in BENCHMARKS.md",
    )
    args = parser.parse_args(argv)
    if args.only is not None:
        name = args.only if args.only.startswith("benchmarks.") else f"benchmarks.{args.only}"
        if name not in MODULES:
            parser.error(f"unknown module {args.only!r}; one of: {', '.join(MODULES)}")
        return _run_one(name)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out: list[str] = [
        "# Benchmarks",
        "",
        f"Run {started} on {platform.machine()}, Python {platform.python_version()}, "
        f"{_cpu_count()} cores. Regenerate with `make bench`.",
        "",
    ]
    failed = False
    results.take()
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            lines: list[str] = module.run()
        except Exception as exc:  # a failed benchmark is reported, the others still run
            failed = True
            lines = [f"## {name}", "", f"FAILED: {type(exc).__name__}: {exc}", ""]
        out.extend(lines)
        out.append("")
    data: dict[str, Any] = {"run": _run_facts(started), **results.take()}
    results.save(data)
    text = "\n".join(with_charts(out, _charts_section(data))).rstrip() + "\n"
    Path("BENCHMARKS.md").write_text(text, encoding="utf-8")
    print(text)
    return 1 if failed else 0


def _run_one(name: str) -> int:
    """Run one module; splice its sections into BENCHMARKS.md (written only on success)."""
    print(f"running {name} ...", file=sys.stderr, flush=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    results.take()
    lines: list[str] = importlib.import_module(name).run()
    data = results.load()
    taken = results.take()
    data.update(taken)
    provenance = {k: v for k, v in data.get("provenance", {}).items() if k not in taken}
    data.pop("provenance", None)
    if provenance:
        data["provenance"] = provenance
    results.save(data)
    note = (
        f"_This section: run {started} on its own (`python -m benchmarks.run --only "
        f"{name.removeprefix('benchmarks.')}`), {_cpu_count()} cores._"
    )
    path = Path("BENCHMARKS.md")
    old = path.read_text(encoding="utf-8").splitlines() if path.exists() else ["# Benchmarks"]
    spliced = _splice(old, lines, note)
    text = "\n".join(with_charts(spliced, _charts_section(data))).rstrip() + "\n"
    path.write_text(text, encoding="utf-8")
    print("\n".join(lines))
    return 0


def _splice(old: list[str], new: list[str], note: str) -> list[str]:
    """``old`` with every section (a ``## `` heading up to the next one) whose heading ``new``
    also has replaced by ``new`` (at the first such section's place; at the end if none), and
    ``note`` after ``new``'s first heading."""
    headings = {line for line in new if line.startswith("## ")}
    first = next((i for i, line in enumerate(new) if line.startswith("## ")), None)
    if first is not None:
        new = [*new[: first + 1], "", note, *new[first + 1 :]]
    out: list[str] = []
    inserted = False
    skipping = False
    for line in old:
        if line.startswith("## "):
            skipping = line in headings
            if skipping and not inserted:
                out.extend([*new, ""])
                inserted = True
        if not skipping:
            out.append(line)
    if not inserted:
        out.extend(["", *new])
    return out


def with_charts(lines: list[str], section: list[str]) -> list[str]:
    """``lines`` without any ``## Charts`` section, and ``section`` (if any) put before the
    first ``## `` heading: the pictures come right after the run's intro."""
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith("## "):
            skipping = line == charts.HEADING
        if not skipping:
            kept.append(line)
    if not section:
        return kept
    first = next((i for i, line in enumerate(kept) if line.startswith("## ")), len(kept))
    return [*kept[:first], *section, *kept[first:]]


def _run_facts(started: str) -> dict[str, Any]:
    return {
        "started": started,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cores": _cpu_count(),
    }


def _charts_section(data: dict[str, Any]) -> list[str]:
    """The ``## Charts`` lines, after drawing every chart ``data`` has results for."""
    drawn = charts.render(data, charts.CHARTS_DIR)
    if not drawn:
        return []
    return charts.markdown(drawn, charts.CHARTS_DIR, Path.cwd(), data.get("provenance"))


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
