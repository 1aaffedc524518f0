"""node/torrc.py: exact torrc text, ob_config and validation (tor.md §10-§12)."""

from __future__ import annotations

import dataclasses

import pytest

from rustbalance.crypto.keys import IdentityKey
from rustbalance.errors import ConfigError
from rustbalance.node.torrc import (
    FrontDoorSettings,
    IntroDosSettings,
    OnionServiceSettings,
    PowSettings,
    include_directive,
    ob_config_text,
    onion_service_options,
    onion_service_torrc,
    system_include_text,
)

MASTER = IdentityKey.from_seed(bytes(range(32))).onion_address
BASE = OnionServiceSettings(hidden_service_dir="/var/lib/tor/rb_hs", proxy_port=8080)


def test_minimal_torrc_is_an_onionbalance_instance_publishing_descriptors() -> None:
    assert onion_service_torrc(BASE) == (
        "HiddenServiceDir /var/lib/tor/rb_hs\n"
        "HiddenServicePort 80 127.0.0.1:8080\n"
        "HiddenServiceOnionbalanceInstance 1\n"
        "HiddenServiceNumIntroductionPoints 3\n"
        "PublishHidServDescriptors 1\n"
    )


def test_front_door_lines_unix_socket_circuit_ids_and_tors_stream_limit() -> None:
    """Issue 15: the proxy on a unix socket, tor's PROXY line naming each stream's circuit,
    tor's own per-circuit stream limit (closing the circuit over it)."""
    front = FrontDoorSettings(
        proxy_unix="/run/rustbalance/proxy.sock",
        export_circuit_id=True,
        max_streams=64,
        max_streams_close_circuit=True,
    )
    settings = dataclasses.replace(BASE, proxy_port=0, front_door=front)
    assert onion_service_torrc(settings) == (
        "HiddenServiceDir /var/lib/tor/rb_hs\n"
        "HiddenServicePort 80 unix:/run/rustbalance/proxy.sock\n"
        "HiddenServiceOnionbalanceInstance 1\n"
        "HiddenServiceNumIntroductionPoints 3\n"
        "HiddenServiceExportCircuitID haproxy\n"
        "HiddenServiceMaxStreams 64\n"
        "HiddenServiceMaxStreamsCloseCircuit 1\n"
        "PublishHidServDescriptors 1\n"
    )
    # tor's defaults are written as nothing: no limit, no line.
    quiet = dataclasses.replace(BASE, front_door=FrontDoorSettings(max_streams_close_circuit=True))
    assert onion_service_torrc(quiet) == onion_service_torrc(BASE)


@pytest.mark.parametrize(
    "front",
    [
        FrontDoorSettings(max_streams=65536),
        FrontDoorSettings(max_streams=-1),
        FrontDoorSettings(proxy_unix="relative.sock"),
        FrontDoorSettings(proxy_unix="/run/a b.sock"),
        FrontDoorSettings(proxy_unix="/run/x.sock\nHiddenServicePort 81 127.0.0.1:1"),
    ],
)
def test_bad_front_door_settings_are_refused(front: FrontDoorSettings) -> None:
    with pytest.raises(ConfigError):
        onion_service_torrc(dataclasses.replace(BASE, front_door=front))


def test_full_torrc_with_pow_and_intro_dos_in_tor_order() -> None:
    settings = dataclasses.replace(
        BASE,
        virtual_port=443,
        proxy_port=18080,
        num_intro_points=20,
        publish_descriptors=False,
        pow=PowSettings(queue_rate=250, queue_burst=2500),
        intro_dos=IntroDosSettings(rate_per_sec=25, burst_per_sec=200),
    )
    assert onion_service_torrc(settings) == (
        "HiddenServiceDir /var/lib/tor/rb_hs\n"
        "HiddenServicePort 443 127.0.0.1:18080\n"
        "HiddenServiceOnionbalanceInstance 1\n"
        "HiddenServiceNumIntroductionPoints 20\n"
        "HiddenServicePoWDefensesEnabled 1\n"
        "HiddenServicePoWQueueRate 250\n"
        "HiddenServicePoWQueueBurst 2500\n"
        "HiddenServiceEnableIntroDoSDefense 1\n"
        "HiddenServiceEnableIntroDoSRatePerSec 25\n"
        "HiddenServiceEnableIntroDoSBurstPerSec 200\n"
        "PublishHidServDescriptors 0\n"
    )


def test_pow_and_dos_without_parameters_only_enable_the_defense() -> None:
    settings = dataclasses.replace(BASE, pow=PowSettings(), intro_dos=IntroDosSettings())
    keys = [key for key, _ in onion_service_options(settings)]
    assert "HiddenServicePoWDefensesEnabled" in keys
    assert "HiddenServiceEnableIntroDoSDefense" in keys
    assert "HiddenServicePoWQueueRate" not in keys
    assert "HiddenServiceEnableIntroDoSRatePerSec" not in keys


def test_options_are_setconf_pairs() -> None:
    assert onion_service_options(BASE)[:2] == [
        ("HiddenServiceDir", "/var/lib/tor/rb_hs"),
        ("HiddenServicePort", "80 127.0.0.1:8080"),
    ]


def test_ob_config_names_the_master_address() -> None:
    assert ob_config_text(MASTER) == f"MasterOnionAddress {MASTER}\n"
    # Upper case and a missing suffix are normalised.
    assert ob_config_text(MASTER.removesuffix(".onion").upper()) == f"MasterOnionAddress {MASTER}\n"


def test_ob_config_rejects_invalid_address() -> None:
    broken = ("b" if MASTER[0] == "a" else "a") + MASTER[1:]
    with pytest.raises(ConfigError, match="checksum"):
        ob_config_text(broken)
    with pytest.raises(ConfigError, match="must not contain"):
        ob_config_text(MASTER + "\nHiddenServiceDir /tmp/x")


def test_system_include_file_text() -> None:
    assert system_include_text(BASE, MASTER) == (
        "# Written by rustbalance; regenerated at every start - do not edit.\n"
        f"# Onion service for master {MASTER} (Onionbalance instance, tor.md §11).\n"
        "HiddenServiceDir /var/lib/tor/rb_hs\n"
        "HiddenServicePort 80 127.0.0.1:8080\n"
        "HiddenServiceOnionbalanceInstance 1\n"
        "HiddenServiceNumIntroductionPoints 3\n"
        "PublishHidServDescriptors 1\n"
    )
    assert include_directive("/etc/tor/torrc.d/rustbalance.conf") == (
        "%include /etc/tor/torrc.d/rustbalance.conf\n"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_service_dir": "/var/lib/tor/x\nControlPort 9999"}, "must not contain"),
        ({"hidden_service_dir": "/var/lib/tor/x\rA"}, "must not contain"),
        ({"hidden_service_dir": "/var/lib/tor/x # c"}, "must not contain"),
        ({"hidden_service_dir": "relative/dir"}, "absolute"),
        ({"hidden_service_dir": ""}, "must not be empty"),
        ({"proxy_port": 0}, "port must be 1..65535"),
        ({"virtual_port": 65536}, "port must be 1..65535"),
        ({"proxy_host": "127.0.0.1 9"}, "spaces"),
        ({"num_intro_points": 21}, "HiddenServiceNumIntroductionPoints"),
        ({"num_intro_points": 0}, "HiddenServiceNumIntroductionPoints"),
        ({"pow": PowSettings(queue_rate=0)}, "HiddenServicePoWQueueRate"),
        ({"intro_dos": IntroDosSettings(burst_per_sec=-1)}, "BurstPerSec"),
    ],
)
def test_invalid_settings_are_rejected(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        onion_service_torrc(dataclasses.replace(BASE, **change))  # type: ignore[arg-type]


def test_include_directive_rejects_relative_and_multiline_paths() -> None:
    with pytest.raises(ConfigError, match="absolute"):
        include_directive("torrc.d/x.conf")
    with pytest.raises(ConfigError, match="must not contain"):
        include_directive("/etc/tor/x\n%include /tmp")
