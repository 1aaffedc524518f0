"""node layer: the daemon's components (see docs/architecture.md, "The node layer").

Every component logs under :data:`DAEMON_LOGGER`, the name the daemon's lines have always
carried (``... INFO rustbalance.node.daemon: ...``), so splitting the daemon into components
changed no log line operators filter on.
"""

DAEMON_LOGGER = "rustbalance.node.daemon"
