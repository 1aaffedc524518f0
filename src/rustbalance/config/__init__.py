"""TOML configuration: schema (frozen dataclasses) and a pure, collect-every-problem parser.

``load_config(path)`` reads one file; ``parse_config(text, base_dir)`` is the I/O-free core.
Both raise :class:`ConfigProblems` (a :class:`~rustbalance.errors.ConfigError`) listing every
problem, one per line, each naming its key. See docs/config.md for every key.
"""

from rustbalance.config.addresses import parse_client_auth_key
from rustbalance.config.parser import ConfigProblems, load_config, parse_config
from rustbalance.config.schema import (
    Config,
    CoordinationConfig,
    Endpoint,
    HealthConfig,
    MasterConfig,
    MetricsConfig,
    NodeConfig,
    ProxyConfig,
    ProxyMode,
    PublishConfig,
    TargetConfig,
    TorConfig,
    TorMode,
)
from rustbalance.rules import parse_endpoint, parse_host

__all__ = [
    "Config",
    "ConfigProblems",
    "CoordinationConfig",
    "Endpoint",
    "HealthConfig",
    "MasterConfig",
    "MetricsConfig",
    "NodeConfig",
    "ProxyConfig",
    "ProxyMode",
    "PublishConfig",
    "TargetConfig",
    "TorConfig",
    "TorMode",
    "load_config",
    "parse_client_auth_key",
    "parse_config",
    "parse_endpoint",
    "parse_host",
]
