"""Coordination over real sockets: UDP on 127.0.0.1, and network namespaces with WireGuard."""
