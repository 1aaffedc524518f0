"""The node's onion-service torrc lines, ``ob_config`` and the system-mode include file (pure).

Why these options (tor.md §10-§11, system.md W7/W19):

- ``HiddenServiceOnionbalanceInstance 1`` plus ``ob_config`` naming the master address makes the
  node's tor accept INTRODUCE2 cells encrypted with the master's subcredentials of the previous,
  current and next time period on every intro point. Without it, intro points read from tor's
  first descriptor fail from 12:00 to 00:00 UTC ("Could not get valid INTRO2 keys"). Tor 0.4.9
  accepts an ``ob_config`` naming the service's own address, so this holds even when the node's
  tor hosts the master key itself (``identity_mode = "shared"``); in ``"instance"`` mode tor
  hosts the node's own key and the same ``ob_config`` names the master (node/identity.py).
- The options live in a torrc include (system mode) or are re-applied after every tor restart
  (managed mode), because anything set with SETCONF vanishes when tor restarts (W7).
- ``PublishHidServDescriptors`` is a global option; it sticks only when it is in the torrc.

Every function here is pure: it returns text or option pairs and never touches the disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from rustbalance.crypto.onion_address import decode_onion_address
from rustbalance.errors import ConfigError, InvalidKeyError
from rustbalance.rules import torrc_value_problem

# tor.md §11: HiddenServiceNumIntroductionPoints is 1..20 (default 3).
MAX_INTRO_POINTS = 20
# tor.md §11 / tor's man page: intro DoS defense parameters are 0..INT32_MAX.
_INT32_MAX = 0x7FFFFFFF

OB_CONFIG_FILENAME = "ob_config"


@dataclass(frozen=True)
class PowSettings:
    """Proof-of-work defenses (tor.md §12): on each node for local queueing."""

    queue_rate: int | None = None  # tor's default 250
    queue_burst: int | None = None  # tor's default 2500


@dataclass(frozen=True)
class IntroDosSettings:
    """Intro-point DoS defense (tor.md §11): enforced at the intro relay, survives merging."""

    rate_per_sec: int | None = None  # tor's default 25
    burst_per_sec: int | None = None  # tor's default 200


@dataclass(frozen=True)
class OnionServiceSettings:
    """What the node's tor needs to host the master onion service behind our reverse proxy."""

    hidden_service_dir: str
    proxy_port: int
    virtual_port: int = 80
    proxy_host: str = "127.0.0.1"
    num_intro_points: int = 3
    onionbalance_instance: bool = True
    publish_descriptors: bool = True
    pow: PowSettings | None = None
    intro_dos: IntroDosSettings | None = None
    front_door: FrontDoorSettings | None = None


# --- the front door (issue 15): what tor tells the proxy and tor's own stream limit ---------


@dataclass(frozen=True)
class FrontDoorSettings:
    """How tor hands streams to the proxy (tor's man page, ``HiddenServicePort``,
    ``HiddenServiceExportCircuitID``, ``HiddenServiceMaxStreams``; hs_config.c)."""

    # The proxy listens on this unix socket: ``HiddenServicePort <virtual> unix:PATH``.
    proxy_unix: str | None = None
    # A PROXY protocol v1 line naming the circuit before each stream's bytes.
    export_circuit_id: bool = False
    # Streams one rendezvous circuit may hold at once, 0..65535 (0 = tor's default: no limit).
    max_streams: int = 0
    # Over max_streams, close the circuit instead of refusing the stream.
    max_streams_close_circuit: bool = False


# tor's hs_config.h: HS_CONFIG_MAX_STREAMS_PER_RDV_CIRCUIT.
MAX_STREAMS_PER_CIRCUIT = 65535


def _front_door_options(front: FrontDoorSettings) -> list[tuple[str, str]]:
    opts: list[tuple[str, str]] = []
    if front.export_circuit_id:
        opts.append(("HiddenServiceExportCircuitID", "haproxy"))
    if front.max_streams:
        opts.append(("HiddenServiceMaxStreams", str(front.max_streams)))
        if front.max_streams_close_circuit:
            opts.append(("HiddenServiceMaxStreamsCloseCircuit", "1"))
    return opts


def _validate_front_door(front: FrontDoorSettings) -> None:
    if front.proxy_unix is not None:
        _check_value("HiddenServicePort unix path", front.proxy_unix)
        if not front.proxy_unix.startswith("/") or " " in front.proxy_unix:
            raise ConfigError("HiddenServicePort unix path: must be absolute, without spaces")
    _check_int("HiddenServiceMaxStreams", front.max_streams, 0, MAX_STREAMS_PER_CIRCUIT)


def _check_value(name: str, value: str) -> None:
    # One rule for every value written into a torrc (rules.py).
    if problem := torrc_value_problem(value):
        raise ConfigError(f"{name}: value {problem}")


def _check_port(name: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{name}: port must be 1..65535, got {port!r}")


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name}: must be an integer in {low}..{high}, got {value!r}")


def validate_settings(settings: OnionServiceSettings) -> None:
    """Raise ConfigError naming the first invalid field."""
    _check_value("HiddenServiceDir", settings.hidden_service_dir)
    if not settings.hidden_service_dir.startswith("/"):
        raise ConfigError("HiddenServiceDir: must be an absolute path")
    _check_value("proxy host", settings.proxy_host)
    if " " in settings.proxy_host:
        raise ConfigError("proxy host: must not contain spaces")
    _check_port("HiddenServicePort virtual port", settings.virtual_port)
    front = settings.front_door
    if front is not None:
        _validate_front_door(front)
    if front is None or front.proxy_unix is None:
        _check_port("HiddenServicePort proxy port", settings.proxy_port)
    _check_int("HiddenServiceNumIntroductionPoints", settings.num_intro_points, 1, MAX_INTRO_POINTS)
    if settings.pow is not None:
        if settings.pow.queue_rate is not None:
            _check_int("HiddenServicePoWQueueRate", settings.pow.queue_rate, 1, _INT32_MAX)
        if settings.pow.queue_burst is not None:
            _check_int("HiddenServicePoWQueueBurst", settings.pow.queue_burst, 1, _INT32_MAX)
    if settings.intro_dos is not None:
        dos = settings.intro_dos
        if dos.rate_per_sec is not None:
            _check_int("HiddenServiceEnableIntroDoSRatePerSec", dos.rate_per_sec, 0, _INT32_MAX)
        if dos.burst_per_sec is not None:
            _check_int("HiddenServiceEnableIntroDoSBurstPerSec", dos.burst_per_sec, 0, _INT32_MAX)


def onion_service_options(settings: OnionServiceSettings) -> list[tuple[str, str]]:
    """The options in torrc order, as (key, value) pairs (usable for SETCONF and the torrc).

    Per-service options follow ``HiddenServiceDir`` (tor groups them by the preceding dir);
    the global ``PublishHidServDescriptors`` comes last.
    """
    validate_settings(settings)
    front = settings.front_door
    where = f"{settings.proxy_host}:{settings.proxy_port}"
    if front is not None and front.proxy_unix is not None:
        where = f"unix:{front.proxy_unix}"
    opts: list[tuple[str, str]] = [
        ("HiddenServiceDir", settings.hidden_service_dir),
        ("HiddenServicePort", f"{settings.virtual_port} {where}"),
    ]
    if settings.onionbalance_instance:
        opts.append(("HiddenServiceOnionbalanceInstance", "1"))
    opts.append(("HiddenServiceNumIntroductionPoints", str(settings.num_intro_points)))
    if settings.pow is not None:
        opts.append(("HiddenServicePoWDefensesEnabled", "1"))
        if settings.pow.queue_rate is not None:
            opts.append(("HiddenServicePoWQueueRate", str(settings.pow.queue_rate)))
        if settings.pow.queue_burst is not None:
            opts.append(("HiddenServicePoWQueueBurst", str(settings.pow.queue_burst)))
    if settings.intro_dos is not None:
        opts.append(("HiddenServiceEnableIntroDoSDefense", "1"))
        if settings.intro_dos.rate_per_sec is not None:
            opts.append(
                ("HiddenServiceEnableIntroDoSRatePerSec", str(settings.intro_dos.rate_per_sec))
            )
        if settings.intro_dos.burst_per_sec is not None:
            opts.append(
                ("HiddenServiceEnableIntroDoSBurstPerSec", str(settings.intro_dos.burst_per_sec))
            )
    if front is not None:
        opts += _front_door_options(front)
    opts.append(("PublishHidServDescriptors", "1" if settings.publish_descriptors else "0"))
    return opts


def render_torrc_lines(options: list[tuple[str, str]]) -> str:
    """``Key value`` lines, newline-terminated."""
    for key, value in options:
        if not key.isalnum():
            raise ConfigError(f"torrc option name {key!r} is not alphanumeric")
        _check_value(key, value)
    return "".join(f"{key} {value}\n" for key, value in options)


def onion_service_torrc(settings: OnionServiceSettings) -> str:
    """The node's onion-service torrc lines."""
    return render_torrc_lines(onion_service_options(settings))


def normalize_onion_address(address: str) -> str:
    """``<56 chars>.onion`` in lower case; raises ConfigError if it is not a valid v3 address."""
    _check_value("master onion address", address)
    try:
        decode_onion_address(address)
    except InvalidKeyError as exc:
        raise ConfigError(f"master onion address: {exc}") from exc
    lowered = address.lower()
    return lowered if lowered.endswith(".onion") else f"{lowered}.onion"


def ob_config_text(master_onion_address: str) -> str:
    """Content of ``<HiddenServiceDir>/ob_config`` (tor.md §11); must exist before tor starts."""
    return f"MasterOnionAddress {normalize_onion_address(master_onion_address)}\n"


def include_directive(include_path: str) -> str:
    """The line the system torrc needs to load our include file."""
    _check_value("include path", include_path)
    if not include_path.startswith("/"):
        raise ConfigError("include path: must be an absolute path")
    return f"%include {include_path}\n"


def system_include_text(settings: OnionServiceSettings, master_onion_address: str) -> str:
    """The system-mode include file (e.g. ``/etc/tor/torrc.d/rustbalance.conf``).

    It persists the service across tor restarts (W7); the header names the master address so
    an operator can tell which cluster the file belongs to.
    """
    master = normalize_onion_address(master_onion_address)
    header = (
        "# Written by rustbalance; regenerated at every start - do not edit.\n"
        f"# Onion service for master {master} (Onionbalance instance, tor.md §11).\n"
    )
    return header + onion_service_torrc(settings)
