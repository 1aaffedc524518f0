"""Build hook; the metadata is in pyproject.toml.

The wheel carries the systemd unit and the config example as package data of
``rustbalance.deploy``, copied at build time from ``deploy/`` (their only source, so the two
never drift), and leaves out ``rustbalance.demo`` (with the test network it needs; pyproject
excludes that package): both serve a checkout (``make demo``, the tests, the benchmarks), not
an installed node. ``tests/packaging/test_wheel.py`` builds the wheel and checks all of this.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEPLOY_FILES = ("deploy/rustbalance.service", "deploy/config.example.toml")
CHECKOUT_ONLY_MODULES = {("rustbalance", "demo")}


class BuildPy(build_py):
    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) not in CHECKOUT_ONLY_MODULES]

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "rustbalance" / "deploy"
        target.mkdir(parents=True, exist_ok=True)
        for name in DEPLOY_FILES:
            shutil.copyfile(ROOT / name, target / Path(name).name)


setup(cmdclass={"build_py": BuildPy})
