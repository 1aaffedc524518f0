"""docs/config.md and the README stay true: its examples parse and it documents every key."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from rustbalance.config import parse_config
from rustbalance.config.schema import Config
from tests.config import MINIMAL_DOC

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_docs_minimal_config_is_the_minimal_config() -> None:
    minimal, _full = toml_blocks()
    assert tomllib.loads(minimal) == MINIMAL_DOC
    config = parse_config(minimal, "/etc/rustbalance")
    assert config.node.id == "node-a"


def test_docs_full_example_is_valid_and_sets_every_key() -> None:
    _minimal, full = toml_blocks()
    config = parse_config(full, "/etc/rustbalance")
    assert config.is_multi_node
    assert config.tor.mode == "system"
    written = tomllib.loads(full)
    for section in dataclasses.fields(Config):
        keys = set(written[section.name])
        documented = {f.name for f in dataclasses.fields(getattr(config, section.name))}
        assert keys == documented, section.name


README = DOC.parents[1] / "README.md"


@pytest.mark.parametrize("path", [DOC, README], ids=["docs/config.md", "README.md"])
def test_docs_tables_list_every_key(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    _minimal, full = toml_blocks()
    for section, table in tomllib.loads(full).items():
        part = re.split(rf"#+ `\[{section}\]`", text, maxsplit=1)[1].split("\n#", 1)[0]
        for key in table:
            assert f"| `{key}` |" in part, f"{section}.{key} is not documented in {path.name}"
