"""Whole-run log-secret scan (issue 7): no key, cookie, token or secret may appear in any log.

:func:`collect_secrets` walks the session's temp folders (after every test that uses the Tor
network, because tor deletes its control cookie when it stops, and at the end of the session)
and derives, from every secret file the run created, the forms in which that secret could leak
into a log: the raw bytes, hex, base64 (standard and URL-safe, padding stripped) and base32
of binary keys, the body lines of PEM keys, the text of token and passphrase files.
:func:`scan_logs` then searches every log file the run wrote (tor logs, ``rustbalance run``
logs, ``test-logs/``, the output pytest captured) for each form. A hit names the log file and
the kind of secret, never the secret itself.

Which files hold secrets:

- by name (:data:`SECRET_NAME_PATTERNS`): master, instance and node keys (``*.key``, tor's
  ``hs_ed25519_secret_key``), tor control cookies, join tokens (and protocol v2 cluster tokens
  and join secrets), passphrases and passwords, WireGuard private keys, a relay's or
  authority's secret keys;
- any other file of mode 0600/0400 (the product writes its secrets that way, docs/config.md)
  up to 4 KiB, except the public or non-secret files tor and rustbalance also write 0600
  (:data:`PUBLIC_NAME_PATTERNS`: the onion ``hostname``, public keys, tor's caches and state,
  torrc, peer lists) and anything inside a tor DataDirectory (tor writes its caches, votes and
  consensuses 0600 there). Only high-entropy tokens of such files count, so paths and names in
  them do not.

The module is pure apart from reading files; :mod:`tests.conftest` wires it into pytest.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Hit",
    "SecretSet",
    "collect_secrets",
    "find_logs",
    "scan_logs",
    "secret_forms",
]

# Shorter needles would match ordinary log text by chance (16 hex chars = 64 bits).
MIN_NEEDLE_CHARS = 16
# A generated secret (os.urandom, secrets.token_*) has many distinct bytes. A test fixture made
# of one repeated byte or character (bytes(32), "ttt...") is not one, and its forms (a run of
# zeros, of "t", of "A") turn up in unrelated logs by chance (a tor log's all-zero digest).
MIN_DISTINCT_SYMBOLS = 6
# A generic 0600 file larger than this is a cache or a database, not a key or token.
MAX_GENERIC_SECRET_BYTES = 4096
MAX_SECRET_FILE_BYTES = 64 * 1024
# Logs are read at most this far (a runaway log would otherwise blow the memory).
MAX_LOG_BYTES = 256 * 1024 * 1024
# Bounded walks: a run creates a few thousand files; stop well above that.
MAX_FILES_WALKED = 500_000

# Name patterns (fnmatch, on the file name) -> kind of secret.
SECRET_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    ("hs_ed25519_secret_key", "onion service key"),
    ("control_auth_cookie", "tor control cookie"),
    ("*cookie*", "cookie"),
    ("*.token", "token"),
    ("*token*", "token"),
    ("*join*secret*", "join secret"),
    ("*passphrase*", "passphrase"),
    ("*password*", "password"),
    ("*wg*private*", "WireGuard private key"),
    ("*private*key*", "private key"),
    ("*.auth_private", "client authorization key"),
    ("secret_*", "tor relay secret key"),
    ("ed25519_*secret_key*", "tor relay secret key"),
    ("authority_identity_key", "tor authority key"),
    ("authority_signing_key", "tor authority key"),
    ("*.key", "key"),
    ("*key.pem", "key"),
    ("*secret*", "secret"),
)

# Files that are never secret, whatever else their name says (public keys, certificates).
ALWAYS_PUBLIC_PATTERNS: tuple[str, ...] = (
    "hostname",
    "*public_key*",
    "*.pub",
    "*cert*",
    "*.crt",
    "torrc*",
    "cached-*",
)
# Further 0600 files that hold nothing secret (tor writes its caches and state 0600 too).
PUBLIC_NAME_PATTERNS: tuple[str, ...] = (
    *ALWAYS_PUBLIC_PATTERNS,
    "state",
    "sr-state",
    "lock",
    "*.json",
    "*.toml",
    "*.log",
    "*.pid",
    "ob_config",
    "fingerprint*",
    "hashed-fingerprint",
    "diff-cache",
    "unverified-*",
    "key-pinning-journal",
)

# tor's key files start with a 32-byte header such as "== ed25519v1-secret: type0 ==\0\0\0"
# (tor's crypto_write_tagged_contents_to_file, also cert-spec appendix "key file formats").
_TOR_TAGGED_HEADER = re.compile(rb"^== [a-z0-9]+v1-secret: [^=]{1,20} ==\x00*")
_TOR_HEADER_LEN = 32
_PEM_RE = re.compile(r"-----BEGIN [A-Z0-9 ]+-----(.*?)-----END [A-Z0-9 ]+-----", re.DOTALL)
_TOKEN_RE = re.compile(rf"[A-Za-z0-9+/=_\-]{{{MIN_NEEDLE_CHARS},}}")
_LOG_NAME_RE = re.compile(r"(\.log(\.\d+)?|\.out|\.err|stdout|stderr)$", re.IGNORECASE)


@dataclass(frozen=True)
class Hit:
    log: Path
    kind: str
    source: Path  # the secret file whose content leaked (its path is not secret)


@dataclass
class SecretSet:
    """Needles to search for: case-sensitive (base64, raw, text) and case-insensitive (hex,
    base32: a log may print them in either case), each with its kind and source file."""

    exact: dict[bytes, tuple[str, Path]] = field(default_factory=dict)
    folded: dict[bytes, tuple[str, Path]] = field(default_factory=dict)
    files: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    # (size, mtime_ns) of every file already read: repeated harvests skip unchanged files.
    seen: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def add_bytes(self, data: bytes, kind: str, source: Path) -> None:
        if len(set(data)) < MIN_DISTINCT_SYMBOLS:
            return
        exact, folded = secret_forms(data)
        for needle in exact:
            self.exact.setdefault(needle, (kind, source))
        for needle in folded:
            self.folded.setdefault(needle, (kind, source))

    def add_text(self, text: str, kind: str, source: Path) -> None:
        text = text.strip()
        if len(text) < MIN_NEEDLE_CHARS or len(set(text)) < MIN_DISTINCT_SYMBOLS:
            return
        raw = text.encode()
        self.exact.setdefault(raw, (kind, source))
        if re.fullmatch(r"[0-9a-fA-F]+", text):
            self.folded.setdefault(raw.lower(), (kind, source))
            if len(text) % 2 == 0:
                self.add_bytes(bytes.fromhex(text), kind, source)

    def __len__(self) -> int:
        return len(self.exact) + len(self.folded)


def secret_forms(data: bytes) -> tuple[set[bytes], set[bytes]]:
    """(case-sensitive, lower-cased case-insensitive) forms of a binary secret in a log."""
    exact: set[bytes] = set()
    folded: set[bytes] = set()
    if len(data) * 2 < MIN_NEEDLE_CHARS:
        return exact, folded
    if len(data) >= MIN_NEEDLE_CHARS:
        exact.add(data)
    folded.add(data.hex().encode())
    # Padding is stripped: the unpadded form is a prefix of the padded one, so it matches both.
    exact.add(base64.b64encode(data).rstrip(b"="))
    exact.add(base64.urlsafe_b64encode(data).rstrip(b"="))
    folded.add(base64.b32encode(data).rstrip(b"=").lower())
    return exact, folded


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)


def _secret_kind(name: str) -> str | None:
    for pattern, kind in SECRET_NAME_PATTERNS:
        if fnmatch.fnmatchcase(name.lower(), pattern.lower()):
            return kind
    return None


def _entropy_bits_per_char(text: str) -> float:
    counts = Counter(text)
    total = len(text)
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def _high_entropy_tokens(text: str) -> list[str]:
    """Tokens of a generic 0600 file that look like keys: long, varied, not paths or names."""
    found: list[str] = []
    for token in _TOKEN_RE.findall(text):
        if token.startswith("/") or ".onion" in token:
            continue
        if not (re.search(r"[0-9]", token) and re.search(r"[A-Za-z]", token)):
            continue
        if _entropy_bits_per_char(token) >= 3.0:
            found.append(token)
    return found


def _add_file(secrets: SecretSet, path: Path, data: bytes, kind: str, *, named: bool) -> None:
    header = _TOR_TAGGED_HEADER.match(data)
    if header is not None and len(data) > _TOR_HEADER_LEN:
        # tor's tagged key file: the key follows the 32-byte header; an expanded ed25519 key
        # (64 bytes) is two secrets, the scalar and the nonce prefix (rend-spec-v3 A.2).
        payload = data[_TOR_HEADER_LEN:]
        secrets.add_bytes(payload, kind, path)
        if len(payload) == 64:
            secrets.add_bytes(payload[:32], kind, path)
            secrets.add_bytes(payload[32:], kind, path)
        return
    try:
        text: str | None = data.decode("ascii")
    except UnicodeDecodeError:
        text = None
    if text is None or not all(c.isprintable() or c in "\r\n\t" for c in text):
        # A raw seed (32 bytes), cookie (32 bytes) or other binary secret.
        secrets.add_bytes(data, kind, path)
        return
    pems = _PEM_RE.findall(text)
    if pems:
        for body in pems:
            lines = [ln.strip() for ln in body.splitlines() if ln.strip() and ":" not in ln]
            for line in lines:
                if len(line) >= MIN_NEEDLE_CHARS:
                    secrets.exact.setdefault(line.encode(), (kind, path))
            joined = "".join(lines)
            if joined:
                secrets.exact.setdefault(joined.encode(), (kind, path))
        return
    if named:
        # A token, passphrase or base64 key file: its whole text is the secret, and each
        # line of it (token files end in a newline, some hold several lines).
        secrets.add_text(text, kind, path)
        for line in text.splitlines():
            secrets.add_text(line, kind, path)
        for token in _high_entropy_tokens(text):
            _add_token(secrets, token, kind, path)
        return
    for token in _high_entropy_tokens(text):
        _add_token(secrets, token, kind, path)


def _add_token(secrets: SecretSet, token: str, kind: str, path: Path) -> None:
    secrets.add_text(token, kind, path)
    stripped = token.rstrip("=")
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(stripped + "=" * (-len(stripped) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(raw) >= MIN_NEEDLE_CHARS // 2:
            secrets.add_bytes(raw, kind, path)


def _walk(roots: Iterable[Path]) -> Iterable[Path]:
    seen = 0
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                seen += 1
                if seen > MAX_FILES_WALKED:
                    return
                yield Path(dirpath) / name


# A tor DataDirectory holds ``lock`` (and ``cached-certs`` once bootstrapped); tor writes all
# its caches, votes and consensuses there 0600, so only named secrets count inside one.
_TOR_DATA_DIR_MARKERS = ("lock", "cached-certs")


def _in_tor_data_dir(path: Path, cache: dict[Path, bool]) -> bool:
    for directory in list(path.parents)[:3]:
        known = cache.get(directory)
        if known is None:
            known = any((directory / m).exists() for m in _TOR_DATA_DIR_MARKERS)
            cache[directory] = known
        if known:
            return True
    return False


def collect_secrets(roots: Iterable[Path], into: SecretSet | None = None) -> SecretSet:
    """Every secret under ``roots`` (see the module docstring), as log needles, added to
    ``into`` if given. tor deletes its control cookie when it stops, so a caller harvests
    while the tors run (repeatedly: files read before and unchanged are skipped)."""
    secrets = into if into is not None else SecretSet()
    tor_dirs: dict[Path, bool] = {}
    for path in _walk(roots):
        try:
            info = path.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SECRET_FILE_BYTES:
            continue
        name = path.name
        kind = _secret_kind(name)
        private = stat.S_IMODE(info.st_mode) & 0o077 == 0
        if _matches(name, ALWAYS_PUBLIC_PATTERNS):
            continue
        if kind is None:
            if _matches(name, PUBLIC_NAME_PATTERNS) or not private:
                continue
            if _in_tor_data_dir(path, tor_dirs):
                continue
            if info.st_size > MAX_GENERIC_SECRET_BYTES:
                continue
            kind = "0600 file"
        stamp = (info.st_size, info.st_mtime_ns)
        if secrets.seen.get(path) == stamp:
            continue
        secrets.seen[path] = stamp
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not data.strip():
            continue
        before = len(secrets)
        _add_file(secrets, path, data, kind, named=kind != "0600 file")
        if len(secrets) > before:
            secrets.files += 1
            secrets.kinds[kind] += 1
    return secrets


def find_logs(roots: Iterable[Path], extra_dirs: Iterable[Path] = ()) -> list[Path]:
    """Log files under ``roots`` (by name) and every file under ``extra_dirs`` (log folders)."""
    logs: list[Path] = []
    for path in _walk(roots):
        if _LOG_NAME_RE.search(path.name) and path.is_file() and not path.is_symlink():
            logs.append(path)
    for path in _walk(extra_dirs):
        if path.is_file() and not path.is_symlink():
            logs.append(path)
    return sorted(set(logs))


def scan_logs(logs: Iterable[Path], secrets: SecretSet) -> list[Hit]:
    """One :class:`Hit` per (log file, secret file) whose secret appears in that log."""
    hits: list[Hit] = []
    for log in logs:
        try:
            with log.open("rb") as fh:
                hay = fh.read(MAX_LOG_BYTES)
        except OSError:
            continue
        if not hay:
            continue
        folded = hay.lower()
        found: dict[Path, str] = {}
        for needle, (kind, source) in secrets.exact.items():
            if source not in found and needle in hay:
                found[source] = kind
        for needle, (kind, source) in secrets.folded.items():
            if source not in found and needle in folded:
                found[source] = kind
        hits.extend(Hit(log, kind, source) for source, kind in sorted(found.items()))
    return hits
