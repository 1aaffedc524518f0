"""docs/config.md's key reference, generated from the declarations in ``schema.py``.

``python -m rustbalance.config.docs [FILE]`` (``make config-docs``) rewrites the part of
docs/config.md between the BEGIN and END markers: every section's table (key, type, default,
meaning), the keys it no longer has, and a full example that sets every key. The prose around
the markers is written by hand. tests/config/test_docs.py fails when the committed file is not
what this writes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from rustbalance.config.keys import Key, key_of
from rustbalance.config.parser import SECTIONS
from rustbalance.rules import Endpoint

__all__ = ["BEGIN", "END", "example_toml", "reference", "render"]

BEGIN = (
    "<!-- BEGIN GENERATED from src/rustbalance/config/schema.py by "
    "`make config-docs`; edit the declarations there, not this text -->"
)
END = "<!-- END GENERATED -->"
_EXAMPLE_INTRO = (
    "A node of a three-node cluster, attached to the system tor, with every key spelt out."
)
_LINE = 100


def reference() -> str:
    """The generated block: one table per section, then the full example."""
    parts: list[str] = []
    for name, cls in SECTIONS.items():
        parts.append(f"## `[{name}]`\n")
        intro = getattr(cls, "section_doc", "")
        if intro:
            parts.append(f"{intro}\n")
        parts.append("| Key | Type | Default | Meaning |\n|---|---|---|---|")
        for field in dataclasses.fields(cls):
            declared = key_of(field)
            row = (field.name, _type_doc(declared), _default_doc(field, declared), declared.doc)
            parts.append("| `{}` | {} | {} | {} |".format(*row))
        removed = getattr(cls, "removed_keys", {})
        if removed:
            parts.append("")
            parts.append("Removed keys (a config that still sets one is refused with this reason):")
            parts.append("")
            parts.extend(f"- `{name}`: {why}." for name, why in removed.items())
        parts.append("")
    parts.append(f"## A full example\n\n{_EXAMPLE_INTRO}\n\n```toml\n{example_toml()}```")
    return "\n".join(parts)


def example_toml() -> str:
    """A config that sets every key to its declared example value."""
    sections = []
    for name, cls in SECTIONS.items():
        lines = [f"[{name}]"]
        for field in dataclasses.fields(cls):
            example = key_of(field).example
            lines.append(_assignment(field.name, field.default if example is None else example))
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def render(text: str) -> str:
    """``text`` (docs/config.md) with its generated block replaced by :func:`reference`."""
    head, begin, rest = text.partition(BEGIN)
    _old, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"the file lacks the markers {BEGIN!r} and {END!r}")
    return f"{head}{BEGIN}\n\n{reference()}\n\n{END}{tail}"


def _type_doc(declared: Key) -> str:
    text = declared.reader.type_doc
    if declared.relation is not None:
        # "duration > `x`" reads well; after a range, a comma keeps the two bounds apart.
        joint = ", " if "." in text else " "
        text = f"{text}{joint}{declared.relation.type_doc}"
    return text


def _default_doc(field: dataclasses.Field[Any], declared: Key) -> str:
    if declared.default_doc is not None:
        return declared.default_doc
    if declared.required:
        return "**required**"
    if field.default is None:
        return "unset"
    if isinstance(field.default, Path):
        return f"`{field.default}`"  # as the table has always shown paths
    return f"`{_toml(field.default)}`"


def _assignment(name: str, value: object) -> str:
    inline = f"{name} = {_toml(value)}"
    if len(inline) <= _LINE or not isinstance(value, list):
        return inline
    items = "".join(f"    {_toml(item)},\n" for item in value)
    return f"{name} = [\n{items}]"


def _toml(value: object) -> str:
    """A value as it is written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str | Endpoint | Path):
        # JSON string escapes are valid TOML basic-string escapes.
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "docs/config.md")
    text = path.read_text(encoding="utf-8")
    updated = render(text)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
        print(f"{path}: updated")
    else:
        print(f"{path}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
