"""docs/config.md and the README stay true.

The key reference in docs/config.md is generated from the declarations in
``config/schema.py``; these tests fail when the committed text is not what the generator
writes, when its examples do not parse, and when the README grows its own key tables again.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from rustbalance.config import parse_config
from rustbalance.config.docs import BEGIN, END, render
from rustbalance.config.keys import key_of
from rustbalance.config.parser import SECTIONS
from rustbalance.config.schema import Config
from tests.config import MINIMAL_DOC

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"
README = DOC.parents[1] / "README.md"


def toml_blocks(path: Path) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def test_committed_reference_is_what_the_declarations_generate() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert render(text) == text, (
        "docs/config.md is out of date with src/rustbalance/config/schema.py: "
        "run `make config-docs` and commit the result"
    )


def test_every_key_is_documented_with_a_type_default_and_meaning() -> None:
    text = DOC.read_text(encoding="utf-8")
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0]
    for name, cls in SECTIONS.items():
        part = generated.split(f"## `[{name}]`", 1)[1].split("\n## ", 1)[0]
        for field in dataclasses.fields(cls):
            row = next(line for line in part.splitlines() if line.startswith(f"| `{field.name}` |"))
            cells = [cell.strip() for cell in row.strip("|").split(" | ")]
            assert len(cells) == 4 and all(cells), row
            assert key_of(field).doc in row


def test_docs_minimal_config_is_the_minimal_config() -> None:
    minimal, _full = toml_blocks(DOC)
    assert tomllib.loads(minimal) == MINIMAL_DOC
    config = parse_config(minimal, "/etc/rustbalance")
    assert config.node.id == "node-a"


def test_docs_full_example_is_valid_and_sets_every_key() -> None:
    _minimal, full = toml_blocks(DOC)
    config = parse_config(full, "/etc/rustbalance")
    assert config.is_multi_node
    assert config.tor.mode == "system"
    written = tomllib.loads(full)
    for section in dataclasses.fields(Config):
        keys = set(written[section.name])
        documented = {f.name for f in dataclasses.fields(getattr(config, section.name))}
        assert keys == documented, section.name


def test_readme_points_to_the_reference_instead_of_copying_it() -> None:
    text = README.read_text(encoding="utf-8")
    assert "docs/config.md" in text
    # Key tables in the README went stale; only the generated reference has them.
    assert "| Key | Type | Default | Meaning |" not in text
    assert toml_blocks(README)[0] == toml_blocks(DOC)[0]
