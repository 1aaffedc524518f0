"""How a config key is declared, once: its reader (type and bounds), default, doc and example.

``schema.py`` declares every key as a field of a ``@section`` class made with :func:`key`.
The parser reads a section by walking those fields and ``docs.py`` writes docs/config.md from
the same fields, so a key cannot be checked one way and documented another.

A reader turns a TOML value into a typed value or raises :class:`Invalid` with a message that
names what is wrong but not the key (the parser prefixes ``section.key: ``).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, dataclass_transform

from rustbalance.errors import ConfigError

__all__ = [
    "MAX_DURATION_SECS",
    "Array",
    "Boolean",
    "Derived",
    "Duration",
    "Integer",
    "Invalid",
    "InvalidItems",
    "Key",
    "Number",
    "PathValue",
    "Reader",
    "Relation",
    "Text",
    "describe",
    "key",
    "key_of",
    "section",
]

T = TypeVar("T")
C = TypeVar("C")

# A year: longer durations are certainly a typo, and bounding them keeps every duration a
# finite float that asyncio timers accept.
MAX_DURATION_SECS = 365 * 24 * 3600


class Invalid(Exception):
    """A value a reader refuses; ``message`` says why, without naming the key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidItems(Exception):
    """Array items a reader refuses, as ``(index, message)`` pairs. ``parsed`` is the whole
    array when every item could be read (only repeats were refused), for checks that relate
    it to other keys; else None."""

    def __init__(self, items: list[tuple[int, str]], parsed: tuple[Any, ...] | None) -> None:
        super().__init__(f"{len(items)} invalid items")
        self.items = items
        self.parsed = parsed


def describe(value: object) -> str:
    """Name a TOML value's type (and the value, if short) for an error message."""
    kinds: tuple[tuple[type, str], ...] = (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "table"),
        (datetime, "date-time"),
        (date, "date"),
        (time, "time"),
    )
    kind = next((name for cls, name in kinds if isinstance(value, cls)), type(value).__name__)
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, int | float | str):
        shown = repr(value)
    else:
        return kind
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{kind} {shown}"


# --- readers --------------------------------------------------------------------------------


class Reader(ABC, Generic[T]):
    """TOML value -> typed value."""

    @property
    @abstractmethod
    def type_doc(self) -> str:
        """The Type column of docs/config.md."""

    @abstractmethod
    def read(self, value: object, base: Path) -> T:
        """Convert ``value``; relative paths resolve against ``base``. Raises Invalid."""


@dataclass(frozen=True)
class Text(Reader[T]):
    """A string, then ``parse`` (which may canonicalise it, or raise Invalid/ConfigError)."""

    parse: Callable[[str], T]
    type_doc: str = "string"
    expect: str = "a string"

    def read(self, value: object, base: Path) -> T:
        if not isinstance(value, str):
            raise Invalid(f"must be {self.expect}, got {describe(value)}")
        try:
            return self.parse(value)
        except ConfigError as exc:
            raise Invalid(str(exc)) from None


def choice(*options: str) -> Text[str]:
    """One of ``options`` (a ``Literal`` field)."""

    def parse(value: str) -> str:
        if value not in options:
            raise Invalid(f"must be {' or '.join(repr(o) for o in options)}, got {value!r}")
        return value

    quoted = [f'`"{o}"`' for o in options]
    return Text(parse, type_doc=", ".join(quoted[:-1]) + f" or {quoted[-1]}")


@dataclass(frozen=True)
class Boolean(Reader[bool]):
    type_doc: str = "boolean"

    def read(self, value: object, base: Path) -> bool:
        if not isinstance(value, bool):
            raise Invalid(f"must be true or false, got {describe(value)}")
        return value


@dataclass(frozen=True)
class Integer(Reader[int]):
    low: int
    high: int | None = None

    @property
    def type_doc(self) -> str:
        return (
            f"integer {self.low}..{self.high}" if self.high is not None else f"integer ≥ {self.low}"
        )

    def read(self, value: object, base: Path) -> int:
        # bool is a subclass of int in Python, but `priority = true` is a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"must be an integer, got {describe(value)}")
        if value < self.low or (self.high is not None and value > self.high):
            bound = f"{self.low}..{self.high}" if self.high is not None else f">= {self.low}"
            raise Invalid(f"must be {bound}, got {value}")
        return value


@dataclass(frozen=True)
class Duration(Reader[float]):
    """Seconds (or minutes where the key says ``_mins``) as a float: > 0, at most a year."""

    zero_means_off: bool = False

    @property
    def type_doc(self) -> str:
        return "duration, 0 = off" if self.zero_means_off else "duration"

    def read(self, value: object, base: Path) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"must be a number of seconds, got {describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise Invalid(f"must be a finite number of seconds, got {value}")
        if value < 0 or (value == 0 and not self.zero_means_off):
            raise Invalid(
                f"must be {'>= 0 (0 = off)' if self.zero_means_off else '> 0'}, got {value}"
            )
        if value > MAX_DURATION_SECS:
            raise Invalid(f"must be at most {MAX_DURATION_SECS} (a year), got {value}")
        return float(value)


@dataclass(frozen=True)
class Number(Reader[float]):
    """A finite number (integer or float) in ``low..high``, as a float."""

    low: float
    high: float
    zero_means_off: bool = False

    @property
    def type_doc(self) -> str:
        off = ", 0 = off" if self.zero_means_off else ""
        return f"number {_number(self.low)}..{_number(self.high)}{off}"

    def read(self, value: object, base: Path) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"must be a number, got {describe(value)}")
        if not math.isfinite(value) or not self.low <= value <= self.high:
            off = " (0 = off)" if self.zero_means_off else ""
            raise Invalid(
                f"must be {_number(self.low)}..{_number(self.high)}{off}, got {_number(value)}"
            )
        return float(value)


def path_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if "\0" in value:
        return "must not contain NUL characters"
    return None


@dataclass(frozen=True)
class PathValue(Reader[Path]):
    """A file or folder; relative to the config file's folder."""

    type_doc: str = "path"

    def read(self, value: object, base: Path) -> Path:
        if not isinstance(value, str):
            raise Invalid(f"must be a path (string), got {describe(value)}")
        if message := path_problem(value):
            raise Invalid(message)
        return base / value


@dataclass(frozen=True)
class Array(Reader[tuple[T, ...]]):
    """An array of ``item``; each bad item is reported with its index. With ``duplicate``,
    an item equal to an earlier one is refused with ``duplicate(item)`` as the message."""

    item: Reader[T]
    type_doc: str = "array of strings"
    duplicate: Callable[[T], str] | None = None

    def read(self, value: object, base: Path) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise Invalid(f"must be an array, got {describe(value)}")
        items: list[T] = []
        problems: list[tuple[int, str]] = []
        unreadable = False
        for index, raw in enumerate(value):
            try:
                item = self.item.read(raw, base)
            except Invalid as exc:
                problems.append((index, exc.message))
                unreadable = True
                continue
            if self.duplicate is not None and item in items:
                problems.append((index, self.duplicate(item)))
            items.append(item)
        if problems:
            raise InvalidItems(problems, None if unreadable else tuple(items))
        return tuple(items)


# --- the declaration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """This key compared with an earlier key of its section: ``value <op> factor × other``."""

    op: Literal[">=", ">", "<="]
    other: str
    factor: int = 1

    def holds(self, value: float, other: float) -> bool:
        bound = self.factor * other
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound}[self.op]

    def problem(self, section: str, value: float, other: float) -> str:
        words = {">=": ">=", ">": "more than", "<=": "<="}[self.op]
        times = f"{self.factor} x " if self.factor != 1 else ""
        return (
            f"must be {words} {times}{section}.{self.other} "
            f"({_number(self.factor * other)}), got {_number(value)}"
        )

    @property
    def type_doc(self) -> str:
        symbol = {">=": "≥", ">": ">", "<=": "≤"}[self.op]
        times = f"{self.factor} × " if self.factor != 1 else ""
        return f"{symbol} {times}`{self.other}`"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class Derived:
    """What a derived default may look at: the section's keys read so far (``own``) and the
    sections built before it (``built``, by name)."""

    own: Mapping[str, Any]
    built: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class Key:
    """Everything about one key but its name and Python type (the field's)."""

    reader: Reader[Any]
    doc: str
    # The value in docs/config.md's full example; None = the default (the key has one).
    example: object = None
    required: bool = False
    # A default computed from other keys (the dataclass then has no default of its own).
    derive: Callable[[Derived], Any] | None = None
    # The Default column when the plain default does not say it (derived, conditional).
    default_doc: str | None = None
    relation: Relation | None = None
    # (other key, value, problem): the key is only read when the other key has that value;
    # set otherwise it is the problem, unset it is None.
    only_if: tuple[str, str, str] | None = None


_KEY = "rustbalance.config.key"


def key(
    reader: Reader[Any],
    *,
    doc: str,
    example: object = None,
    default: Any = dataclasses.MISSING,
    required: bool = False,
    derive: Callable[[Derived], Any] | None = None,
    default_doc: str | None = None,
    relation: Relation | None = None,
    only_if: tuple[str, str, str] | None = None,
) -> Any:
    """Declare one config key as a dataclass field of a :func:`section` class."""
    if example is None and default in (None, dataclasses.MISSING):
        raise TypeError("a key without a default needs an example value for docs/config.md")
    declared = Key(
        reader=reader,
        doc=doc,
        example=example,
        required=required,
        derive=derive,
        default_doc=default_doc,
        relation=relation,
        only_if=only_if,
    )
    metadata = {_KEY: declared}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def key_of(field: dataclasses.Field[Any]) -> Key:
    declared = field.metadata.get(_KEY)
    if not isinstance(declared, Key):
        raise TypeError(f"{field.name} is not declared with config.keys.key()")
    return declared


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(key,))
def section(cls: type[C]) -> type[C]:
    """A config section: a frozen, keyword-only dataclass whose fields are :func:`key`\\ s."""
    return dataclass(frozen=True, kw_only=True)(cls)
