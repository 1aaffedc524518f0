"""Text armor shared by every layer of a v3 descriptor: items, objects and base64.

A descriptor document (dir-spec section 1.2 "document meta-format", used unchanged by
rend-spec-v3 section 2.4) is a sequence of *items*: ``Keyword [SP arg]* NL``, optionally
followed by an *object* ``-----BEGIN <TYPE>-----`` NL base64 lines ``-----END <TYPE>-----``.
Tor writes objects as base64 in 64-character lines (tor ``src/lib/encoding/binascii.c``
``base64_encode`` with ``BASE64_ENCODE_MULTILINE``).

The tokenizer follows tor's ``src/feature/dirparse/parsecommon.c`` closely enough for
descriptors: whitespace (including blank lines) between items is skipped, a keyword is a run
of ``[A-Za-z0-9-]``, arguments are split on spaces and tabs, and an object's END type must
match its BEGIN type. Everything here raises only :class:`DescriptorError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rustbalance.errors import DescriptorError

__all__ = [
    "Item",
    "b64decode",
    "b64encode_nopad",
    "count_keywords",
    "encode_object",
    "tokenize",
]

# tor src/lib/encoding/binascii.c: BASE64_ENCODE_MULTILINE wraps at 64 characters.
_B64_LINE = 64
# dir-spec 1.2: KeywordChar ::= "A".."Z" | "a".."z" | "0".."9" | "-"
_KEYWORD_RE = re.compile(r"[A-Za-z0-9-]+")
_BEGIN_RE = re.compile(r"-----BEGIN ([A-Za-z0-9 ]+)-----")
_END_RE = re.compile(r"-----END ([A-Za-z0-9 ]+)-----")
_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


@dataclass(frozen=True, slots=True)
class Item:
    """One item of a document.

    ``start`` is the character offset of the keyword in the tokenized text (the signature
    check needs the exact bytes before the ``signature`` item).
    """

    keyword: str
    args: tuple[str, ...]
    object_type: str | None
    object_data: bytes | None
    start: int


def b64encode_nopad(data: bytes) -> str:
    """Base64 without ``=`` padding (tor ``base64_encode_nopad``)."""
    return base64.b64encode(data).decode("ascii").rstrip("=")


def b64decode(text: str, what: str, length: int | None = None) -> bytes:
    """Decode base64 with or without padding, as tor's ``base64_decode`` accepts both.

    ``what`` names the field in the error message; ``length`` is the exact decoded size
    required, if any.
    """
    if not _B64_CHARS.issuperset(text) or "=" in text.rstrip("="):
        raise DescriptorError(f"{what} is not valid base64")
    body = text.rstrip("=")
    if len(text) - len(body) > 2 or len(body) % 4 == 1:
        raise DescriptorError(f"{what} is not valid base64")
    try:
        data = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DescriptorError(f"{what} is not valid base64") from exc
    if length is not None and len(data) != length:
        raise DescriptorError(f"{what} must be {length} bytes, got {len(data)}")
    return data


def encode_object(object_type: str, data: bytes) -> str:
    """Return ``-----BEGIN T-----\\n<64-char base64 lines>\\n-----END T-----`` (no final NL)."""
    encoded = base64.b64encode(data).decode("ascii")
    lines = [encoded[i : i + _B64_LINE] for i in range(0, len(encoded), _B64_LINE)]
    body = "\n".join(lines)
    return f"-----BEGIN {object_type}-----\n{body}\n-----END {object_type}-----"


def tokenize(text: str, what: str) -> list[Item]:
    """Split ``text`` into items. ``what`` names the document in error messages."""
    items: list[Item] = []
    lines = text.split("\n")
    offsets: list[int] = []
    pos = 0
    for line in lines:
        offsets.append(pos)
        pos += len(line) + 1
    index = 0
    while index < len(lines):
        raw = lines[index]
        line = raw.strip(" \t\r")
        if not line:
            index += 1
            continue
        start = offsets[index] + (len(raw) - len(raw.lstrip(" \t\r")))
        parts = line.replace("\t", " ").split(" ")
        keyword = parts[0]
        if not _KEYWORD_RE.fullmatch(keyword):
            raise DescriptorError(f"{what}: malformed line starting {keyword[:20]!r}")
        args = tuple(p for p in parts[1:] if p)
        index += 1
        object_type: str | None = None
        object_data: bytes | None = None
        if index < len(lines) and lines[index].startswith("-----BEGIN "):
            begin = _BEGIN_RE.fullmatch(lines[index].rstrip("\r"))
            if begin is None:
                raise DescriptorError(f"{what}: malformed object header after {keyword!r}")
            object_type = begin.group(1)
            index += 1
            body: list[str] = []
            while True:
                if index >= len(lines):
                    raise DescriptorError(f"{what}: unterminated {object_type} object")
                current = lines[index].rstrip("\r")
                index += 1
                if current.startswith("-----END "):
                    end = _END_RE.fullmatch(current)
                    if end is None or end.group(1) != object_type:
                        raise DescriptorError(
                            f"{what}: object END line does not match BEGIN {object_type}"
                        )
                    break
                body.append(current.strip())
            object_data = b64decode("".join(body), f"{what}: {object_type} object")
        items.append(Item(keyword, args, object_type, object_data, start))
    return items


def count_keywords(items: Iterable[Item]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.keyword] = counts.get(item.keyword, 0) + 1
    return counts


def require_once(items: Sequence[Item], keyword: str, what: str) -> Item:
    """Return the single item ``keyword``; tor's T1 rule (exactly once)."""
    found = [item for item in items if item.keyword == keyword]
    if len(found) != 1:
        raise DescriptorError(
            f"{what}: {keyword!r} must appear exactly once, found {len(found)} times"
        )
    return found[0]


def optional_once(items: Sequence[Item], keyword: str, what: str) -> Item | None:
    """Return the item ``keyword`` or None; tor's T01 rule (at most once)."""
    found = [item for item in items if item.keyword == keyword]
    if len(found) > 1:
        raise DescriptorError(f"{what}: {keyword!r} must appear at most once")
    return found[0] if found else None


def require_object(item: Item, object_type: str, what: str) -> bytes:
    if item.object_type != object_type or item.object_data is None:
        raise DescriptorError(f"{what}: {item.keyword!r} needs a {object_type} object")
    return item.object_data


def require_no_object(item: Item, what: str) -> None:
    if item.object_type is not None:
        raise DescriptorError(f"{what}: {item.keyword!r} must not carry an object")
