"""The Debian package's sources (debian/), checked without building it.

tests/systemd/test_deb.py builds the package with ``make deb`` and installs it on a clean
Debian 12 under systemd; these checks keep the sources consistent with the rest of the
checkout (version, locks, unit, copyright) and test debian/finish-venv's rewriting of the
venv built under debian/rustbalance/ without a build.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from tests.packaging.test_wheel import _lock, _norm

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
UNIT = (ROOT / "deploy" / "rustbalance.service").read_text(encoding="utf-8")


def _finish_venv() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("finish_venv", str(DEBIAN / "finish-venv"))
    spec = importlib.util.spec_from_loader("finish_venv", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _control() -> list[dict[str, str]]:
    """debian/control's paragraphs (comments dropped, continuation lines joined)."""
    paragraphs: list[dict[str, str]] = []
    for block in (DEBIAN / "control").read_text(encoding="utf-8").split("\n\n"):
        fields: dict[str, str] = {}
        name = ""
        for line in block.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t"):
                fields[name] += "\n" + line.strip()
            elif line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if fields:
            paragraphs.append(fields)
    return paragraphs


def test_the_package_version_is_the_projects() -> None:
    first = (DEBIAN / "changelog").read_text(encoding="utf-8").splitlines()[0]
    match = re.match(r"^rustbalance \(([^)]+)\) unstable; urgency=", first)
    assert match is not None, first
    # A native package: the version is the project's, exactly.
    assert match.group(1) == PYPROJECT["project"]["version"]
    assert (DEBIAN / "source" / "format").read_text().strip() == "3.0 (native)"


def test_the_package_depends_on_tor_and_the_interpreter_it_was_built_for() -> None:
    source, binary = _control()
    depends = [d.strip() for d in binary["Depends"].split(",")]
    assert "tor" in depends
    assert "${rustbalance:Python}" in depends  # python3.X, set by debian/rules
    assert "${shlibs:Depends}" in depends and "${misc:Depends}" in depends
    assert "dh-sequence-installsysusers" in source["Build-Depends"]
    rules = (DEBIAN / "rules").read_text(encoding="utf-8")
    assert "-Vrustbalance:Python=python$(PYVERSION)" in rules


def _joined(text: str) -> str:
    """A makefile with its continuation lines joined (one command per line)."""
    return re.sub(r"\s*\\\n\s*", " ", text)


def test_the_venv_is_filled_from_the_hash_locked_requirements_only() -> None:
    rules = _joined((DEBIAN / "rules").read_text(encoding="utf-8"))
    assert "--require-hashes -r requirements/runtime.lock" in rules
    assert "--require-hashes -r requirements/build.lock" in rules
    assert "OFFLINE := --no-index --find-links $(RB_WHEELHOUSE)" in rules
    makefile = _joined((ROOT / "Makefile").read_text(encoding="utf-8"))
    assert "--require-hashes --only-binary=:all:" in makefile
    assert "-r $(RUNTIME_LOCK) -r $(BUILD_LOCK)" in makefile


def test_the_build_lock_is_the_dev_locks_build_backend() -> None:
    dev = _lock(ROOT / "requirements" / "dev.lock")
    build = _lock(ROOT / "requirements" / "build.lock")
    assert {name.split("==")[0] for name, _ in build} == {"setuptools"}
    for key, hashes in build.items():
        assert dev.get(key) == hashes, key


def test_the_copyright_file_names_every_package_of_the_venv() -> None:
    copyright_text = (DEBIAN / "copyright").read_text(encoding="utf-8")
    covered = {
        _norm(match.group(1))
        for match in re.finditer(r"\$?site-packages/([A-Za-z0-9_]+)-\*", copyright_text)
    }
    runtime = {name.split("==")[0] for name, _ in _lock(ROOT / "requirements" / "runtime.lock")}
    assert runtime == covered
    assert "site-packages" in copyright_text and "$SP" not in copyright_text


def test_the_rules_rewrite_of_the_unit_still_matches_it() -> None:
    """debian/rules installs deploy/rustbalance.service with two substitutions; if the unit
    changes so that they no longer apply, the package would run a path that does not exist."""
    rules = (DEBIAN / "rules").read_text(encoding="utf-8")
    assert "s|/opt/rustbalance/venv/bin/rustbalance|/usr/bin/rustbalance|g" in rules
    exec_lines = [line for line in UNIT.splitlines() if line.startswith("Exec")]
    assert exec_lines and all("/opt/rustbalance/venv/bin/rustbalance " in x for x in exec_lines)
    header = re.search(r"-e 's\|\^(.*?)\|# RustBalance node daemon, installed", rules)
    assert header is not None
    # The sed expression is a basic regular expression that reads the same in Python.
    assert re.match(header.group(1), UNIT.splitlines()[0])


INSTALLED = "#!/usr/lib/rustbalance/bin/python3.11\n"


@pytest.mark.parametrize(
    ("script", "body"),
    [
        ("#!{venv}/bin/python\n", "# -*- coding: utf-8 -*-\nimport sys\n"),
        ("#!{venv}/bin/python3.11\n", "import sys\n"),
        # pip's form when the interpreter's path is too long for a shebang line
        ("#!/bin/sh\n'''exec' \"{venv}/bin/python\" \"$0\" \"$@\"\n' '''\n", "import sys\n"),
    ],
)
def test_finish_venv_points_the_entry_point_at_the_installed_interpreter(
    tmp_path: Path, script: str, body: str
) -> None:
    finish = _finish_venv()
    dest, build = _fake_venv(tmp_path)
    venv = dest / "usr/lib/rustbalance"
    (venv / "bin" / "rustbalance").write_text(script.format(venv=venv) + body)
    assert finish.main(dest, "/usr/lib/rustbalance", str(build)) == 0
    assert (venv / "bin" / "rustbalance").read_text() == INSTALLED + body


def test_finish_venv_drops_the_build_path_activate_and_foreign_scripts(tmp_path: Path) -> None:
    finish = _finish_venv()
    dest, build = _fake_venv(tmp_path)
    venv = dest / "usr/lib/rustbalance"
    (venv / "bin" / "rustbalance").write_text(f"#!{venv}/bin/python\nimport sys\n")
    assert finish.main(dest, "/usr/lib/rustbalance", str(build)) == 0
    assert sorted(p.name for p in (venv / "bin").iterdir()) == [
        "python",
        "python3",
        "python3.11",
        "rustbalance",
    ]
    assert "command =" not in (venv / "pyvenv.cfg").read_text()
    assert not (venv / "share").exists()


def test_finish_venv_fails_when_a_file_still_names_the_build_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    finish = _finish_venv()
    dest, build = _fake_venv(tmp_path)
    venv = dest / "usr/lib/rustbalance"
    (venv / "bin" / "rustbalance").write_text(f"#!{venv}/bin/python\nimport sys\n")
    leaky = venv / "lib/python3.11/site-packages/x.dist-info/direct_url.json"
    leaky.parent.mkdir(parents=True)
    leaky.write_text(f'{{"url": "file://{build}/dist/x.whl"}}')
    assert finish.main(dest, "/usr/lib/rustbalance", str(build)) == 1
    assert "direct_url.json" in capsys.readouterr().err


def test_finish_venv_fails_without_the_entry_point(tmp_path: Path) -> None:
    finish = _finish_venv()
    dest, build = _fake_venv(tmp_path)
    assert finish.main(dest, "/usr/lib/rustbalance", str(build)) == 1


def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """What ``python3.11 -m venv`` and pip leave under debian/rustbalance/ (no interpreter)."""
    build = tmp_path / "src"
    dest = build / "debian" / "rustbalance"
    venv = dest / "usr/lib/rustbalance"
    bindir = venv / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python3.11").symlink_to("/usr/bin/python3.11")
    (bindir / "python3").symlink_to("python3.11")
    (bindir / "python").symlink_to("python3.11")
    (bindir / "activate").write_text(f'VIRTUAL_ENV="{venv}"\n')
    (bindir / "cffi-gen-src").write_text(f"#!{bindir}/python\nimport sys\n")
    (venv / "pyvenv.cfg").write_text(
        "home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11.2\n"
        f"executable = /usr/bin/python3.11\ncommand = /usr/bin/python3.11 -m venv {venv}\n"
    )
    (venv / "share/man/man1").mkdir(parents=True)
    (venv / "share/man/man1/rustbalance.1").write_text(".TH RUSTBALANCE 1\n")
    return dest, build
