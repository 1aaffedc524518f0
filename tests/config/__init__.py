"""Builders shared by the config tests: a valid document as a dict, rendered to TOML."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import tomli_w

from rustbalance.config import Config, ConfigProblems, parse_config

BASE = Path("/etc/rustbalance")
# Valid v3 addresses (ed25519 keys from seeds 0x01.. and 0x02..) and x25519 client keys.
ONION_A = "rkeohxlubhyzl7ks3mwtzos5olfgocn7dwkbeg7toseadnapn5optfad.onion"
ONION_B = "qe4xodvipulv6vvdkrtmgtd6ztfy3curwtxdpis56yhvxd6jwokbr4qd.onion"
CLIENT_A = "CO7E72XK6ICMP7JTLD6JYADSDCA5C5BHQEUCE7WGOTZX677JPNWQ"
CLIENT_B = "GHKKW2WO5SLBCN4ROA3ZG3TAOFX2YVZ272KNTWUEVABAISG7YEJA"

MINIMAL_DOC: dict[str, dict[str, Any]] = {
    "node": {"id": "node-a"},
    "master": {"identity_key_path": "/etc/rustbalance/master.key"},
    "target": {"address": "127.0.0.1:8000"},
    "tor": {"mode": "managed", "data_dir": "/var/lib/rustbalance/tor", "extra_torrc": []},
}


def document(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The minimal document with ``sections`` merged in (a value of None removes the key)."""
    doc = copy.deepcopy(MINIMAL_DOC)
    for name, values in sections.items():
        table = doc.setdefault(name, {})
        for key, value in values.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    return doc


def parse(**sections: dict[str, Any]) -> Config:
    return parse_config(tomli_w.dumps(document(**sections)), BASE)


def problems(**sections: dict[str, Any]) -> tuple[str, ...]:
    """The problems reported for the minimal document with ``sections`` merged in."""
    text = tomli_w.dumps(document(**sections))
    try:
        parse_config(text, BASE)
    except ConfigProblems as exc:
        return exc.problems
    raise AssertionError(f"expected problems, config was accepted:\n{text}")
