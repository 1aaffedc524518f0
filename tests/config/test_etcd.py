"""``[coordination] backend`` and the ``[etcd]`` section: defaults, and every mistake named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rustbalance.config.schema import Endpoint
from tests.config import parse, problems

ETCD = {
    "endpoints": ["127.0.0.1:2379", "etcd-2.example:2379", "[::1]:2379"],
    "ca_path": "etcd/ca.pem",
    "cert_path": "etcd/node-a.pem",
    "key_path": "/etc/rustbalance/etcd/node-a-key.pem",
}


def etcd_mode(**etcd: Any) -> dict[str, dict[str, Any]]:
    return {"coordination": {"backend": "etcd"}, "etcd": {**ETCD, **etcd}}


def test_embedded_is_the_default_and_etcd_keys_have_documented_defaults() -> None:
    config = parse()
    assert config.coordination.backend == "embedded"
    etcd = config.etcd
    assert etcd.endpoints == ()
    assert (etcd.ca_path, etcd.cert_path, etcd.key_path) == (None, None, None)
    assert (etcd.prefix, etcd.lease_ttl_secs) == ("/rustbalance/", 10)


def test_a_complete_etcd_section() -> None:
    config = parse(**etcd_mode(prefix="/rb/prod/", lease_ttl_secs=5))
    assert config.coordination.backend == "etcd"
    etcd = config.etcd
    assert etcd.endpoints == (
        Endpoint(host="127.0.0.1", port=2379),
        Endpoint(host="etcd-2.example", port=2379),
        Endpoint(host="::1", port=2379),
    )
    # Relative paths are relative to the config file's folder.
    assert etcd.ca_path == Path("/etc/rustbalance/etcd/ca.pem")
    assert etcd.key_path == Path("/etc/rustbalance/etcd/node-a-key.pem")
    assert (etcd.prefix, etcd.lease_ttl_secs) == ("/rb/prod/", 5)


def test_etcd_mode_requires_endpoints_and_the_three_tls_files() -> None:
    found = problems(coordination={"backend": "etcd"})
    assert "etcd.endpoints: is required when coordination.backend = 'etcd'" in found
    for key in ("ca_path", "cert_path", "key_path"):
        assert f"etcd.{key}: is required when coordination.backend = 'etcd'" in found


def test_an_etcd_section_without_the_etcd_backend_is_accepted_unused() -> None:
    assert parse(etcd={"endpoints": ["127.0.0.1:2379"]}).coordination.backend == "embedded"


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"coordination": {"backend": "zookeeper"}},
            "coordination.backend: must be 'embedded' or 'etcd'",
        ),
        (etcd_mode(endpoints="127.0.0.1:2379"), "etcd.endpoints: must be an array"),
        (etcd_mode(endpoints=["127.0.0.1"]), "etcd.endpoints[0]:"),
        (etcd_mode(endpoints=[2379]), "etcd.endpoints[0]: must be a 'HOST:PORT' string"),
        (etcd_mode(endpoints=["a:1", "a:1"]), "etcd.endpoints[1]: a:1 is listed twice"),
        (etcd_mode(prefix="rustbalance"), "etcd.prefix: must be 2-128 characters"),
        (etcd_mode(prefix="/a b/"), "etcd.prefix: must be printable ASCII without spaces"),
        (etcd_mode(prefix="/" + "x" * 128 + "/"), "etcd.prefix: must be 2-128 characters"),
        (etcd_mode(lease_ttl_secs=1), "etcd.lease_ttl_secs: must be 2..3600, got 1"),
        (etcd_mode(lease_ttl_secs=2.5), "etcd.lease_ttl_secs: must be an integer"),
        (etcd_mode(lease_ttl_secs=True), "etcd.lease_ttl_secs: must be an integer"),
        (etcd_mode(key_path=7), "etcd.key_path: must be a path"),
        (etcd_mode(ttl=10), "etcd.ttl: unknown key"),
        (
            {
                **etcd_mode(),
                "coordination": {"backend": "etcd", "peers": ["10.0.0.2:51821"]},
            },
            "coordination.peers: must be empty with backend = 'etcd'",
        ),
    ],
)
def test_mistakes_are_named_with_their_key(
    sections: dict[str, dict[str, Any]], expected: str
) -> None:
    found = problems(**sections)
    assert any(p.startswith(expected) for p in found), found


def test_joins_are_refused_with_the_etcd_backend() -> None:
    sections = etcd_mode()
    sections["join"] = {"enabled": True}
    sections["wireguard"] = {
        "private_key_path": "wg.key",
        "address": "10.99.0.1/24",
        "endpoint": "203.0.113.5:51820",
    }
    assert "join.enabled: must be false with coordination.backend = 'etcd'" in problems(**sections)
