"""The project's error types.

Every layer raises its own subclass of :class:`RustBalanceError`, with a message that names the
problem. Parsers of untrusted input (keys, addresses, certificates, descriptors, consensus
documents, control replies, coordination messages, config files) raise only these types: no
``ValueError``, ``IndexError`` or ``binascii.Error`` ever escapes them.
"""


class RustBalanceError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidKeyError(RustBalanceError):
    """A key, key file or onion address is malformed (length, checksum, header, torsion...)."""


class CertificateError(RustBalanceError):
    """A Tor ed25519 certificate (cert-spec) is malformed, expired or badly signed."""


class DescriptorError(RustBalanceError):
    """A v3 onion-service descriptor is malformed, forged, or cannot be built within limits."""


class ConsensusError(RustBalanceError):
    """A consensus or microdescriptor document is malformed or lacks what we need."""


class ControlError(RustBalanceError):
    """Talking to a Tor control port failed."""


class ConfigError(RustBalanceError):
    """A configuration file is malformed or invalid; the message names the key."""


class TorProcessError(RustBalanceError):
    """A Tor process could not be started, checked or restarted."""


class RuleError(ConfigError):
    """A value breaks one of the shared rules of :mod:`rustbalance.rules` (node id, endpoint,
    interface name, tunnel network). A ConfigError because the config was the rules' first
    user; every other caller turns it into its own layer's error."""


class UnsafePathError(RustBalanceError):
    """A path leads through something another user could have planted or can change: a
    symlink in a folder others can write, a folder of another user (rustbalance.secure_dir)."""
