"""How the commands log: journald-native under systemd, JSON lines, -v/-q after the subcommand.

journald itself is exercised by tests/systemd/test_container.py (real systemd, real journald,
``journalctl -p warning``); here the stream is a real file whose device and inode go into
``JOURNAL_STREAM`` exactly as systemd sets them (systemd.exec(5)).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from rustbalance.cli.logging_setup import (
    FOLD,
    LogSettings,
    configure_logging,
    journal_priority,
    on_journal,
)
from rustbalance.cli.main import build_parser, log_settings

REPO = Path(__file__).resolve().parents[2]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def journal_env(stream: TextIO) -> dict[str, str]:
    info = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[TextIO]:
    root = logging.getLogger()
    handlers, level, hook = list(root.handlers), root.level, sys.excepthook
    with (tmp_path / "stderr.log").open("w+", encoding="utf-8") as stream:
        yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    sys.excepthook = hook


def emit_events() -> None:
    log = logging.getLogger("rustbalance.test")
    log.debug("debug detail")
    log.info("tor bootstrapped")
    log.warning("control port\nunavailable")  # a multi-line message is still one event
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("publish failed")


def lines_of(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_journal_stream_gives_priority_prefixes_no_timestamps_one_line_per_event(
    log_file: TextIO,
) -> None:
    journal = configure_logging(
        LogSettings(level=logging.DEBUG), env=journal_env(log_file), stream=log_file
    )
    assert journal
    emit_events()
    lines = lines_of(log_file)
    assert lines[:3] == [
        "<7>rustbalance.test: debug detail",
        "<6>rustbalance.test: tor bootstrapped",
        f"<4>rustbalance.test: control port{FOLD}unavailable",
    ]
    # The traceback is folded into the error's own line: 4 events, 4 lines.
    assert len(lines) == 4
    error = lines[3]
    assert error.startswith(f"<3>rustbalance.test: publish failed{FOLD}Traceback")
    assert error.endswith(f"{FOLD}ValueError: boom")
    assert not any(TIMESTAMP.search(line) for line in lines)


def test_a_stale_journal_stream_is_ignored(log_file: TextIO, tmp_path: Path) -> None:
    # A child of a service keeps JOURNAL_STREAM although its stderr now goes to a file.
    with (tmp_path / "other").open("w") as other:
        env = journal_env(other)
    assert not configure_logging(LogSettings(), env=env, stream=log_file)
    emit_events()
    lines = lines_of(log_file)
    assert TIMESTAMP.match(lines[0]) and " INFO rustbalance.test: tor bootstrapped" in lines[0]
    assert not lines[0].startswith("<")
    assert "Traceback (most recent call last):" in lines  # a terminal keeps Python's layout


@pytest.mark.parametrize("value", ["", "12", "a:b", "1:2:3", ":", "-1:5"], ids=lambda v: repr(v))
def test_malformed_journal_stream_is_not_the_journal(log_file: TextIO, value: str) -> None:
    assert not on_journal({"JOURNAL_STREAM": value}, log_file)


def test_json_lines(log_file: TextIO) -> None:
    configure_logging(LogSettings(format="json"), stream=log_file, env={})
    emit_events()
    docs = [json.loads(line) for line in lines_of(log_file)]
    assert [d["level"] for d in docs] == ["info", "warning", "error"]  # INFO level: no debug
    assert docs[0]["logger"] == "rustbalance.test"
    assert docs[0]["message"] == "tor bootstrapped"
    assert docs[1]["message"] == "control port\nunavailable"  # JSON keeps it, escaped
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", docs[0]["time"])
    assert docs[2]["exception"].endswith(f"{FOLD}ValueError: boom")


def test_json_under_journald_has_the_prefix_and_no_time(log_file: TextIO) -> None:
    configure_logging(LogSettings(format="json"), env=journal_env(log_file), stream=log_file)
    emit_events()
    lines = lines_of(log_file)
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
    docs = [json.loads(line[3:]) for line in lines]
    assert all("time" not in doc for doc in docs)


def test_uncaught_exception_is_one_critical_line(log_file: TextIO) -> None:
    configure_logging(LogSettings(), env=journal_env(log_file), stream=log_file)
    try:
        raise RuntimeError("unexpected")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    (line,) = lines_of(log_file)
    assert line.startswith("<2>rustbalance: Uncaught exception | Traceback")
    assert line.endswith("RuntimeError: unexpected")


def test_priorities_follow_sd_daemon() -> None:
    assert [journal_priority(level) for level in (50, 40, 30, 20, 10, 5)] == [2, 3, 4, 6, 7, 7]
    assert journal_priority(35) == 4  # between WARNING and ERROR: the less severe bound


@pytest.mark.parametrize(
    ("argv", "level", "fmt"),
    [
        (["run", "--config", "c.toml"], logging.INFO, "text"),
        (["-v", "run", "--config", "c.toml"], logging.DEBUG, "text"),
        (["run", "-v", "--config", "c.toml"], logging.DEBUG, "text"),
        (["run", "--config", "c.toml", "-q"], logging.WARNING, "text"),
        (["-q", "status"], logging.WARNING, "text"),
        (["status", "--log-format", "json"], logging.INFO, "json"),
        (["--log-format", "json", "config", "check", "c.toml", "-v"], logging.DEBUG, "json"),
        (["debug", "tor", "--control", "127.0.0.1:9", "-q"], logging.WARNING, "text"),
        (["keygen", "--out", "k", "--verbose"], logging.DEBUG, "text"),
    ],
)
def test_logging_options_before_or_after_the_subcommand(
    argv: list[str], level: int, fmt: str
) -> None:
    settings = log_settings(build_parser().parse_args(argv))
    assert settings == LogSettings(level=level, format=fmt)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "argv", [["-v", "run", "-q"], ["run", "-v", "-q"], ["status", "--log-format", "xml"]]
)
def test_conflicting_logging_options_are_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from rustbalance.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def run_cli(tmp_path: Path, *argv: str, journal: bool) -> tuple[int, str]:
    """The real command in a child process, stderr into a file (journald's stream socket
    stands in as a file: systemd only compares device and inode)."""
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        if journal:
            env.update(journal_env(err))
        else:
            env.pop("JOURNAL_STREAM", None)
        result = subprocess.run(
            [sys.executable, "-m", "rustbalance.cli.main", *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            timeout=120,
            check=False,
        )
    return result.returncode, err_path.read_text()


def test_a_failed_command_is_one_error_line_under_journald(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    code, err = run_cli(tmp_path, "run", "--config", str(missing), journal=True)
    assert code == 2
    assert err.startswith(f"<3>rustbalance: error: invalid config {missing}: ")
    assert err.count("\n") == 1
    code, err = run_cli(tmp_path, "run", "--config", str(missing), journal=False)
    assert code == 2
    assert err.startswith(f"rustbalance: error: invalid config {missing}: ")


def test_config_check_problems_carry_the_error_priority(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[node]\nid = "x y"\n')
    code, err = run_cli(tmp_path, "config", "check", str(config), journal=True)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) >= 2
    assert all(line.startswith(f"<3>{config}: ") for line in lines)
