"""How every ``rustbalance`` command logs: on a terminal, into journald, or as JSON lines.

Under systemd the service's stderr is a stream socket into journald, and systemd names it in
``JOURNAL_STREAM=<device>:<inode>`` (systemd.exec(5), "Environment variables in spawned
processes"). A child keeps the variable even when its stderr goes elsewhere, so the variable
counts only when it names the stderr we really have (fstat). There, each line:

- starts with ``<N>``, the syslog priority journald files it under (sd-daemon(3): ``<3>`` error,
  ``<4>`` warning, ``<6>`` info, ``<7>`` debug), so ``journalctl -p warning`` works; journald
  strips the prefix (``SyslogLevelPrefix=yes``, the default);
- has no timestamp (journald stamps every entry itself);
- is one event: a record's newlines (a traceback, a multi-line error from tor) are folded into
  ``" | "``, because journald stores every line of a stream as its own entry with the default
  priority (info), which would split an error and hide its traceback from ``-p warning``.

``--log-format json`` writes one JSON object per line (``time`` only off the journal, ``level``,
``logger``, ``message``, ``exception`` with the folded traceback), for log shippers.

Everything the CLI prints about a failed command (``rustbalance: error: ...``) goes through
:func:`error_line`, so it carries ``<3>`` under journald as well.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TextIO

__all__ = [
    "FOLD",
    "LOG_FORMATS",
    "JournalFormatter",
    "JsonFormatter",
    "LogSettings",
    "TextFormatter",
    "configure_logging",
    "error_line",
    "journal_priority",
    "on_journal",
    "write_error",
]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
# What a newline inside one log record becomes in a one-line-per-event stream.
FOLD = " | "
# The text format off the journal: the one every command used before (tests grep it).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# syslog(3) priorities, as sd-daemon(3) prefixes them (SD_ERR "<3>", SD_WARNING "<4>", ...).
_PRIORITY_CRIT = 2
_PRIORITY_ERR = 3
_PRIORITY_WARNING = 4
_PRIORITY_INFO = 6
_PRIORITY_DEBUG = 7


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level (a level between two maps to the more severe)."""
    if levelno >= logging.CRITICAL:
        return _PRIORITY_CRIT
    if levelno >= logging.ERROR:
        return _PRIORITY_ERR
    if levelno >= logging.WARNING:
        return _PRIORITY_WARNING
    if levelno >= logging.INFO:
        return _PRIORITY_INFO
    return _PRIORITY_DEBUG


def on_journal(env: Mapping[str, str], stream: TextIO) -> bool:
    """True when ``stream`` is the journald stream ``JOURNAL_STREAM`` names (device:inode)."""
    value = env.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        # A stream without a descriptor (pytest's capture, io.StringIO) is not the journal.
        return False
    return info.st_dev == int(device) and info.st_ino == int(inode)


def _fold(text: str) -> str:
    return FOLD.join(line for line in text.splitlines() if line.strip()) if text else ""


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    parts = []
    if record.exc_info:
        parts.append(formatter.formatException(record.exc_info))
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return _fold("\n".join(parts))


class TextFormatter(logging.Formatter):
    """Terminals and plain files: a timestamp per line, tracebacks as Python prints them."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)


class JournalFormatter(logging.Formatter):
    """``<N>logger: message`` on one line: no timestamp, everything folded (module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.name}: {_fold(record.getMessage())}"
        exception = _exception_text(self, record)
        if exception:
            line += FOLD + exception
        return f"<{journal_priority(record.levelno)}>{line}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; under journald with the ``<N>`` prefix and without ``time``."""

    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {}
        if not self._journal:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            doc["time"] = f"{stamp}.{int(record.msecs):03d}Z"
        doc["level"] = record.levelname.lower()
        doc["logger"] = record.name
        doc["message"] = record.getMessage()
        exception = _exception_text(self, record)
        if exception:
            doc["exception"] = exception
        # ensure_ascii: a newline or a control character in a message can never break the line.
        line = json.dumps(doc, ensure_ascii=True, separators=(",", ":"))
        return f"<{journal_priority(record.levelno)}>{line}" if self._journal else line


@dataclass(frozen=True)
class LogSettings:
    """What the command line asked for: ``-v`` (DEBUG), ``-q`` (WARNING), ``--log-format``."""

    level: int = logging.INFO
    format: LogFormat = "text"


def _formatter(settings: LogSettings, journal: bool) -> logging.Formatter:
    if settings.format == "json":
        return JsonFormatter(journal=journal)
    return JournalFormatter() if journal else TextFormatter()


def configure_logging(
    settings: LogSettings,
    *,
    env: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> bool:
    """Send the root logger's records to ``stream`` (stderr) in the chosen format.

    Replaces any handler a previous call installed (``main()`` may run more than once in one
    process, as in the tests). Uncaught exceptions are logged as one CRITICAL record, so a
    crash is one ``<2>`` journal entry too. Returns whether the journal format is in use.
    """
    env = os.environ if env is None else env
    stream = sys.stderr if stream is None else stream
    journal = on_journal(env, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_formatter(settings, journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    sys.excepthook = _log_uncaught
    return journal


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("rustbalance").critical("Uncaught exception", exc_info=(kind, value, tb))


def error_line(
    message: str, *, prefix: str = "rustbalance: error: ", env: Mapping[str, str] | None = None
) -> str:
    """The one line a failed command prints on stderr (with ``<3>`` under journald)."""
    env = os.environ if env is None else env
    line = prefix + _fold(message)
    return f"<{_PRIORITY_ERR}>{line}" if on_journal(env, sys.stderr) else line


def write_error(message: str, *, prefix: str = "rustbalance: error: ") -> None:
    """Print :func:`error_line` to stderr."""
    print(error_line(message, prefix=prefix), file=sys.stderr)
