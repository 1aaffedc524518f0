"""Command groups print their own help; the shell completions and the man page in ``share/``
are generated from the argparse definitions and must match them (regenerate: ``make
cli-files``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rustbalance.cli.main import build_parser, main
from tests.cli import cli_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "usage", "listed"),
    [
        (["debug"], "usage: rustbalance debug", ["decode-descriptor", "publish", "show-onion"]),
        (["config"], "usage: rustbalance config", ["check"]),
    ],
)
def test_a_command_group_alone_prints_its_own_help(
    capsys: pytest.CaptureFixture[str], argv: list[str], usage: str, listed: list[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    for name in listed:
        assert name in err
    # Not the top-level help.
    assert "keygen" not in err


def test_no_command_prints_the_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: rustbalance [-h]")


@pytest.mark.parametrize("name", sorted(cli_files.FILES))
def test_generated_file_is_up_to_date(name: str) -> None:
    path = ROOT / name
    assert path.is_file(), f"{name} is missing: run make cli-files"
    assert path.read_text(encoding="utf-8") == cli_files.FILES[name](), (
        f"{name} is out of date with the argparse definitions: run make cli-files"
    )


def test_every_command_is_in_the_completions_and_the_man_page() -> None:
    bash = (ROOT / cli_files.BASH).read_text(encoding="utf-8")
    zsh = (ROOT / cli_files.ZSH).read_text(encoding="utf-8")
    man = (ROOT / cli_files.MAN).read_text(encoding="utf-8")
    for words in cli_files.command_paths(build_parser()):
        assert words[-1] in bash and words[-1] in zsh
        assert " ".join(words) in man.replace("\\-", "-")


def test_bash_completes_commands_options_and_files(tmp_path: Path) -> None:
    """Sourced into a real bash, the completion function offers what a user would type."""
    (tmp_path / "master.key").write_text("x")
    script = f"""
source {ROOT / cli_files.BASH}
complete_words() {{
  COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}
  COMPREPLY=(); _shtab_rustbalance; printf '%s\\n' "${{COMPREPLY[@]}}"; echo --
}}
cd {tmp_path}
complete_words rustbalance de
complete_words rustbalance debug dec
complete_words rustbalance debug decode-descriptor --cl
complete_words rustbalance debug show-onion --key mas
complete_words rustbalance status --format ''
"""
    out = subprocess.run(
        ["bash", "--norc", "-c", script], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    debug, decode, flag, key, fmt = out.split("--\n")[:5]
    assert debug.split() == ["debug"]
    assert decode.split() == ["decode-descriptor"]
    assert flag.split() == ["--client-auth-key"]
    assert key.split() == ["master.key"]
    assert sorted(fmt.split()) == ["json", "text"]


def test_zsh_loads_the_completion() -> None:
    out = subprocess.run(
        [
            "zsh",
            "-f",
            "-c",
            f"autoload -U compinit; compinit -u; source {ROOT / cli_files.ZSH}"
            "; whence -w _shtab_rustbalance",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "function" in out


def test_man_renders_the_page() -> None:
    out = subprocess.run(
        ["man", "--warnings", "-l", str(ROOT / cli_files.MAN)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "MAN_KEEP_FORMATTING": ""},
    )
    assert "rustbalance debug decode-descriptor" in out.stdout
    assert "EXIT STATUS" in out.stdout and "RUSTBALANCE_TOR_PASSWORD" in out.stdout
    assert out.stderr == ""
