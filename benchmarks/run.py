"""Run every benchmark and write BENCHMARKS.md (`make bench`).

Each benchmark module exposes ``run() -> list[str]`` returning Markdown lines. Figures are ratios
against a peer measured in the same run (stem, HAProxy, the direct path), never absolute claims.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path

MODULES: tuple[str, ...] = (
    "benchmarks.bench_descriptor",
    "benchmarks.bench_proxy",
    "benchmarks.bench_memory",
    "benchmarks.bench_onion",
)


def main() -> int:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out: list[str] = [
        "# Benchmarks",
        "",
        f"Run {started} on {platform.machine()}, Python {platform.python_version()}, "
        f"{_cpu_count()} cores. Regenerate with `make bench`.",
        "",
    ]
    failed = False
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
    text = "\n".join(out).rstrip() + "\n"
    Path("BENCHMARKS.md").write_text(text, encoding="utf-8")
    print(text)
    return 1 if failed else 0


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
