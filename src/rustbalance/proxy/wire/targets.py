"""The request-target: only origin-form goes on to the target (RFC 9112 §3.2, pure).

A reverse proxy sets Host to the target's authority itself, so whatever authority a client
names in its request-target must not reach the target: a target that honours absolute-form
(RFC 9112 §3.2.2 says a server must) would otherwise see the attacker's host.

- origin-form (``/path?query``) passes, unless it begins with ``//`` (a network-path
  reference to anything that resolves it as a URL: ``//evil.example/x``);
- absolute-form with the ``http`` or ``https`` scheme becomes origin-form (``OPTIONS`` of a
  bare authority becomes ``*``, §3.2.4); userinfo is refused (RFC 9110 §4.2.4), so is an
  empty host (§4.2.1);
- asterisk-form only for ``OPTIONS`` (§3.2.4);
- authority-form (CONNECT's), other schemes (``ws://``, ``ftp://``), fragments and anything
  else are a 400.
"""

from __future__ import annotations

import re

from .errors import MessageError

# RFC 3986 §3.2: host = IP-literal / IPv4address / reg-name, then an optional port; no
# userinfo. Then path-abempty and an optional query; no fragment in a request-target.
_ABSOLUTE = re.compile(
    rb"(?i:https?)://"
    rb"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~!$&'()*+,;=%]+)(?::[0-9]*)?"
    rb"(/[^?#]*)?(\?[^#]*)?"
)


def origin_form(method: bytes, target: bytes) -> bytes:
    """The request-target to send on, in origin-form (or ``*``); raises MessageError(400)."""
    if target[:1] == b"/":
        if target[:2] == b"//" or b"#" in target:
            raise MessageError(400, "request-target is not an absolute path")
        return target
    if target == b"*":
        if method != b"OPTIONS":
            raise MessageError(400, "asterisk-form request-target outside OPTIONS")
        return target
    match = _ABSOLUTE.fullmatch(target)
    if match is None:
        raise MessageError(400, "request-target must be origin-form or http(s) absolute-form")
    path, query = match.group(1) or b"", match.group(2) or b""
    if not path and not query and method == b"OPTIONS":
        return b"*"
    path = path or b"/"
    if path[:2] == b"//":
        raise MessageError(400, "request-target is not an absolute path")
    return path + query
