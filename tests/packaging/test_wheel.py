"""The wheel a user installs, and the lock files CI and the Debian package install from.

The wheel is built for real (``pip wheel`` with the locked setuptools, as ``make`` installs it)
and read back: its metadata, its package data (unit file, config example: byte-identical to
``deploy/``), its data files (completions, man page) and what it must not carry (the test
network and the demo, which serve a checkout). Then it is installed and run.
"""

from __future__ import annotations

import email.parser
import re
import subprocess
import sys
import tomllib
import zipfile
from email.message import Message
from pathlib import Path

import pytest

from rustbalance.config import load_config

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DEV_LOCK = ROOT / "requirements" / "dev.lock"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.lock"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build-tree")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        check=True, timeout=300, cwd=build,
    )  # fmt: skip
    (found,) = out.glob("rustbalance-*.whl")
    return found


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(name).decode("utf-8"))


def test_metadata_is_complete(wheel: Path) -> None:
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "MIT"
    assert meta["License-File"] == "LICENSE"
    assert meta["Requires-Python"] == ">=3.11"  # no upper cap
    keywords = meta["Keywords"].split(",")
    assert {"tor", "onion-service", "load-balancer", "onionbalance"} <= set(keywords)
    classifiers = meta.get_all("Classifier") or []
    for minor in (11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    assert "Typing :: Typed" in classifiers
    assert meta["Summary"] and meta["Author"]
    assert meta["Description-Content-Type"] == "text/markdown"
    # Every runtime pin of pyproject.toml, exactly.
    requires = {r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r}
    assert requires == set(PYPROJECT["project"]["dependencies"])


def test_license_file_is_mit_and_in_the_wheel(wheel: Path) -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(name).decode("utf-8") == text


def test_wheel_carries_the_unit_config_example_completions_and_man_page(wheel: Path) -> None:
    expected = {
        "rustbalance/deploy/rustbalance.service": "deploy/rustbalance.service",
        "rustbalance/deploy/config.example.toml": "deploy/config.example.toml",
        "rustbalance/py.typed": "src/rustbalance/py.typed",
    }
    data = "rustbalance-0.1.0.data/data/"
    for name in (
        "share/bash-completion/completions/rustbalance",
        "share/zsh/vendor-completions/_rustbalance",
        "share/man/man1/rustbalance.1",
    ):
        expected[data + name] = name
    with zipfile.ZipFile(wheel) as archive:
        for inside, source in expected.items():
            assert archive.read(inside) == (ROOT / source).read_bytes(), inside


def test_wheel_leaves_out_the_test_network_and_the_demo(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert not [n for n in names if "testnet" in n or n == "rustbalance/demo.py"]
    # ...and carries every other module of the package.
    sources = {
        str(p.relative_to(ROOT / "src"))
        for p in (ROOT / "src" / "rustbalance").rglob("*.py")
        if "testnet" not in p.parts and p.name != "demo.py"
    }
    assert sources <= set(names)


def test_the_installed_wheel_runs_and_has_no_test_network(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    # The dependencies come from this venv; the package only from the installed wheel.
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PYTHONSAFEPATH": "1"}
    code = (
        "import importlib.util, rustbalance, rustbalance.cli.main as m;"
        "print(rustbalance.__file__);"
        "print(importlib.util.find_spec('rustbalance.testnet'));"
        "raise SystemExit(m.main(['--version']))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        capture_output=True, text=True, check=True, timeout=60, env=env,
    ).stdout.splitlines()  # fmt: skip
    assert out[0].startswith(str(target)) and out[1] == "None"
    assert out[2] == "rustbalance 0.1.0"


def test_the_config_example_is_valid() -> None:
    config = load_config(str(ROOT / "deploy" / "config.example.toml"))
    assert str(config.master.identity_key_path) == "/etc/rustbalance/master.key"
    unit = (ROOT / "deploy" / "rustbalance.service").read_text(encoding="utf-8")
    # The unit runs the config at the path the example names itself for.
    assert "--config /etc/rustbalance/config.toml" in unit
    assert "/etc/rustbalance/config.toml" in (ROOT / "deploy/config.example.toml").read_text()


_ENTRY = re.compile(r"^([A-Za-z0-9._-]+)==([^ ;\\]+)(?: ;([^\\]+))? \\$", re.M)


def _lock(path: Path) -> dict[tuple[str, str], set[str]]:
    """(name, marker) -> hashes, with the version in the key's name part: 'name==version'."""
    text = path.read_text(encoding="utf-8")
    entries: dict[tuple[str, str], set[str]] = {}
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    for block in blocks:
        match = _ENTRY.match(block)
        if match is None:
            assert block.startswith("#"), f"{path.name}: unparsed entry {block[:80]!r}"
            continue
        name = f"{_norm(match[1])}=={match[2]}"
        hashes = set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
        assert hashes, f"{path.name}: {name} has no hash"
        entries[(name, (match[3] or "").strip())] = hashes
    return entries


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(requirements: list[str]) -> set[str]:
    pins = set()
    for requirement in requirements:
        name, version = requirement.split("==")
        pins.add(f"{_norm(name.split('[')[0])}=={version}")
    return pins


def test_dev_lock_pins_every_direct_dependency_with_hashes() -> None:
    locked = {name for name, _ in _lock(DEV_LOCK)}
    project = PYPROJECT["project"]
    assert _pins(project["dependencies"]) <= locked
    assert _pins(project["optional-dependencies"]["dev"]) <= locked
    # The build backend the Makefile builds with (--no-build-isolation) is locked too, and
    # satisfies [build-system] requires.
    (setuptools,) = [n for n in locked if n.startswith("setuptools==")]
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]
    assert int(setuptools.split("==")[1].split(".")[0]) >= 77


def test_runtime_lock_is_the_dev_locks_subset_for_the_product() -> None:
    dev, runtime = _lock(DEV_LOCK), _lock(RUNTIME_LOCK)
    assert _pins(PYPROJECT["project"]["dependencies"]) <= {name for name, _ in runtime}
    for key, hashes in runtime.items():
        assert dev.get(key) == hashes, key
    dev_tools = _pins(PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert not dev_tools & {name for name, _ in runtime}


def test_makefile_installs_exactly_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "pip install -q --require-hashes -r $(DEV_LOCK)" in makefile
    assert "pip install -q --no-deps --no-build-isolation -e ." in makefile
    assert "pip install -q -e" not in makefile
