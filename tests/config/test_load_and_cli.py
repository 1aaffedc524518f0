"""load_config (the one read) and `rustbalance config check FILE`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import tomli_w

from rustbalance.cli import config_cmd
from rustbalance.config import ConfigProblems, load_config
from rustbalance.crypto.keys import IdentityKey, write_seed_key_file
from tests.config import MINIMAL_DOC, document


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="rustbalance")
    commands = parser.add_subparsers(dest="command")
    debug = commands.add_parser("debug").add_subparsers(dest="debug_command")
    config_cmd.register(commands, debug)
    args = parser.parse_args(list(argv))
    result: int = args.func(args)
    return result


def test_load_config_resolves_relative_paths_against_the_file_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    doc = document(master={"identity_key_path": "master.key"}, node={"state_dir": "../state"})
    config = load_config(write(folder, tomli_w.dumps(doc)))
    assert config.master.identity_key_path == folder / "master.key"
    assert config.node.state_dir == folder / "../state"


def test_load_config_does_not_open_the_key_file(tmp_path: Path) -> None:
    # The key is checked by the daemon at start; a config naming a missing key is valid here.
    config = load_config(write(tmp_path, tomli_w.dumps(MINIMAL_DOC)))
    assert config.master.identity_key_path is not None
    assert not config.master.identity_key_path.exists()


def test_load_config_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigProblems) as info:
        load_config(missing)
    assert str(info.value).startswith(f"{missing}: cannot read config file")


def test_load_config_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigProblems) as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_load_config_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[node]\nid = "n\xe9"\n')
    with pytest.raises(ConfigProblems) as info:
        load_config(path)
    assert info.value.problems == ("config file is not UTF-8 (line 2)",)


def test_load_config_prefixes_every_problem_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nid = "x y"\n')
    with pytest.raises(ConfigProblems) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert info.value.source == str(path)


def with_master_key(tmp_path: Path) -> dict[str, dict[str, object]]:
    """The minimal document naming a real 0600 key: `config check` opens the key files too
    (tests/cli/test_config_check.py)."""
    key = tmp_path / "master.key"
    write_seed_key_file(IdentityKey.generate(os.urandom), key)
    return document(master={"identity_key_path": str(key)})


def test_cli_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, tomli_w.dumps(with_master_key(tmp_path)))
    assert run_cli("config", "check", str(path)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{path}: ok",
        "node node-a, single-node, tor managed, target 127.0.0.1:8000",
    ]


def test_cli_check_multi_node_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = with_master_key(tmp_path)
    doc["tor"] = {"mode": "system"}
    doc["coordination"] = {"peers": ["10.0.0.2:51821"]}
    doc["target"]["use_tls"] = True
    assert run_cli("config", "check", str(write(tmp_path, tomli_w.dumps(doc)))) == 0
    summary = capsys.readouterr().out.splitlines()[1]
    assert summary == ("node node-a, multi-node (1 peers), tor system, target 127.0.0.1:8000 (tls)")


def test_cli_check_prints_each_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = document(node={"priority": True}, tor={"mode": "foo"})
    path = write(tmp_path, tomli_w.dumps(doc))
    assert run_cli("config", "check", str(path)) == 2  # 2 = configuration (cli/main.py)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{path}: node.priority: must be an integer, got boolean true",
        f"{path}: tor.mode: must be 'managed' or 'system', got 'foo'",
        f"{path}: 2 problems",
    ]


def test_cli_check_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("config", "check", str(tmp_path / "none.toml")) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_cli_config_without_subcommand_prints_help_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_cli("config") == 2
    assert "check" in capsys.readouterr().err
