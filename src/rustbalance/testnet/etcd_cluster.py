"""A real 3-member etcd cluster on 127.0.0.1 with TLS, client-certificate auth and RBAC.

For the etcd coordination backend's tests (and, in phase 2, its demo and benchmark). Runs
Debian's ``etcd`` (package ``etcd-server``, 3.4) and ``etcdctl`` (``etcd-client``):

- :class:`TestPki` makes, with ``cryptography``, a test CA, one server certificate per member
  (also used between members: peer TLS with peer client-certificate auth), a client
  certificate per user (``root`` and each node; the certificate's CN is the etcd user name,
  which etcd uses for RBAC when ``--client-cert-auth`` is on), and on request a certificate
  from a foreign CA. Keys are 0600 in 0700 folders; nothing secret goes on a command line
  (``etcdctl`` gets file paths).
- :class:`EtcdCluster` starts the members (each by PID, its log in its own folder), waits
  until every member answers (bounded), enables auth with the RBAC of docs/etcd.md (each node
  may write only its own keys and read the whole prefix) and can stop, SIGKILL, SIGSTOP and
  restart single members.
- :class:`TcpCutter` is a TCP relay the test controls, in front of one member: ``cut()``
  stops carrying bytes both ways without closing anything (what a partition looks like to
  the client: no RST, just silence), ``heal()`` carries them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rustbalance.tor.process import pick_free_ports

__all__ = [
    "ETCDCTL_BINARY",
    "ETCD_BINARY",
    "ClientCert",
    "EtcdCluster",
    "EtcdMember",
    "TcpCutter",
    "TestPki",
    "etcd_sections",
    "rbac_commands",
]

ETCD_BINARY = "etcd"
ETCDCTL_BINARY = "etcdctl"
LOCALHOST = "127.0.0.1"
_START_TIMEOUT_SECS = 30.0
_STOP_TIMEOUT_SECS = 10.0
_ETCDCTL_TIMEOUT_SECS = 20.0


# -- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCert:
    """A client identity: the CA that signed it, its certificate and key files."""

    name: str
    cert_path: Path
    key_path: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class _Authority:
    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, common_name: str, *, server: bool
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            # A member's certificate serves clients and authenticates it to the other members.
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.IPv4Address(LOCALHOST)),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


class TestPki:
    """A test CA and the certificates of one test (see the module docstring)."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.directory = directory
        self._ca = _Authority("rustbalance test etcd CA")
        self.ca_path = directory / "ca.pem"
        self.ca_path.write_bytes(self._ca.cert.public_bytes(serialization.Encoding.PEM))

    def _write(self, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (self.directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(self.directory / f"{stem}-key.pem", _key_pem(key))

    def server(self, member: str) -> tuple[Path, Path]:
        """A member's certificate and key (issued once, then the same files)."""
        paths = self.directory / f"server-{member}.pem", self.directory / f"server-{member}-key.pem"
        if not paths[0].exists():
            cert, key = self._ca.issue(member, server=True)
            self._write(f"server-{member}", cert, key)
        return paths

    def client(self, user: str) -> ClientCert:
        """A client certificate whose CN (= etcd user name) is ``user``, from the test CA
        (issued once, then the same files)."""
        found = ClientCert(
            user, self.directory / f"client-{user}.pem", self.directory / f"client-{user}-key.pem"
        )
        if not found.cert_path.exists():
            cert, key = self._ca.issue(user, server=False)
            self._write(f"client-{user}", cert, key)
        return found

    def foreign_client(self, user: str) -> ClientCert:
        """A client certificate with CN ``user`` from another CA, which etcd must refuse."""
        authority = _Authority("some other CA")
        cert, key = authority.issue(user, server=False)
        self._write(f"foreign-{user}", cert, key)
        return ClientCert(
            user, self.directory / f"foreign-{user}.pem", self.directory / f"foreign-{user}-key.pem"
        )


# -- RBAC --------------------------------------------------------------------------------------


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def rbac_commands(prefix: str, node_ids: Iterable[str]) -> list[list[str]]:
    """The ``etcdctl`` arguments that set up RBAC for RustBalance nodes (docs/etcd.md).

    ``root`` (needed before ``auth enable``) and one user per node, all without a password:
    with ``--client-cert-auth`` etcd takes the user name from the client certificate's CN. Each
    node's role may read the whole prefix and write only its own two keys: its member record
    ``<prefix>nodes/<id>`` and its election candidacy ``<prefix>election/<id>``.
    """
    commands: list[list[str]] = [
        ["user", "add", "root", "--no-password"],
        ["user", "grant-role", "root", "root"],
    ]
    for node_id in node_ids:
        role = f"rustbalance-{node_id}"
        commands += [
            ["role", "add", role],
            ["role", "grant-permission", role, "--prefix=true", "read", prefix],
            ["role", "grant-permission", role, "readwrite", f"{prefix}nodes/{node_id}"],
            ["role", "grant-permission", role, "readwrite", f"{prefix}election/{node_id}"],
            ["user", "add", node_id, "--no-password"],
            ["user", "grant-role", node_id, role],
        ]
    commands.append(["auth", "enable"])
    return commands


# -- a node's config ---------------------------------------------------------------------------


def etcd_sections(
    pki: TestPki,
    client: ClientCert,
    endpoints: Iterable[str],
    *,
    prefix: str = "/rustbalance/",
    lease_ttl_secs: int = 10,
) -> dict[str, dict[str, object]]:
    """The ``[coordination]`` and ``[etcd]`` sections of a node that authenticates as
    ``client`` (its key stays 0600 where the PKI wrote it; the config names only paths)."""
    return {
        "coordination": {"backend": "etcd"},
        "etcd": {
            "endpoints": list(endpoints),
            "ca_path": pki.ca_path,
            "cert_path": client.cert_path,
            "key_path": client.key_path,
            "prefix": prefix,
            "lease_ttl_secs": lease_ttl_secs,
        },
    }


# -- the cluster -------------------------------------------------------------------------------


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    cert_path: Path
    key_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{LOCALHOST}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class EtcdCluster:
    """Three (or ``size``) etcd members on loopback; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        pki: TestPki,
        *,
        size: int = 3,
        prefix: str = "/rustbalance/",
        node_ids: Iterable[str] = ("node-a", "node-b", "node-c"),
    ) -> None:
        self.directory = directory
        self.pki = pki
        self.prefix = prefix
        self.node_ids = tuple(node_ids)
        self.root = pki.client("root")
        ports = pick_free_ports(2 * size)
        self.members: list[EtcdMember] = []
        for index in range(size):
            name = f"m{index + 1}"
            cert, key = pki.server(name)
            data_dir = directory / name
            self.members.append(
                EtcdMember(
                    name=name,
                    client_port=ports[2 * index],
                    peer_port=ports[2 * index + 1],
                    data_dir=data_dir,
                    log_path=directory / f"{name}.log",
                    cert_path=cert,
                    key_path=key,
                )
            )
        self._initial_cluster = ",".join(
            f"{m.name}=https://{LOCALHOST}:{m.peer_port}" for m in self.members
        )

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def member(self, name: str) -> EtcdMember:
        return next(m for m in self.members if m.name == name)

    def _command(self, member: EtcdMember, state: str) -> list[str]:
        url = f"https://{LOCALHOST}"
        ca = str(self.pki.ca_path)
        return [
            ETCD_BINARY,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={url}:{member.client_port}",
            f"--advertise-client-urls={url}:{member.client_port}",
            f"--listen-peer-urls={url}:{member.peer_port}",
            f"--initial-advertise-peer-urls={url}:{member.peer_port}",
            f"--initial-cluster={self._initial_cluster}",
            f"--initial-cluster-state={state}",
            "--initial-cluster-token=rustbalance-test",
            f"--cert-file={member.cert_path}",
            f"--key-file={member.key_path}",
            "--client-cert-auth",
            f"--trusted-ca-file={ca}",
            f"--peer-cert-file={member.cert_path}",
            f"--peer-key-file={member.key_path}",
            "--peer-client-cert-auth",
            f"--peer-trusted-ca-file={ca}",
            "--logger=zap",
            f"--log-outputs={member.log_path}",
        ]

    def _spawn(self, member: EtcdMember) -> None:
        state = "existing" if (member.data_dir / "member").exists() else "new"
        member.process = subprocess.Popen(
            self._command(member, state),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start(self) -> None:
        """Start every member, wait for the cluster, then enable auth and the RBAC roles."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            for member in self.members:
                self._spawn(member)
            self.wait_healthy(self.members, _START_TIMEOUT_SECS)
            for args in rbac_commands(self.prefix, self.node_ids):
                self.etcdctl(args)
        except BaseException:
            self.stop()
            raise

    def etcdctl(
        self,
        args: list[str],
        *,
        client: ClientCert | None = None,
        endpoints: Iterable[str] | None = None,
        check: bool = True,
        stdin: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``etcdctl`` (as ``root`` unless ``client`` is given), bounded in time."""
        who = client or self.root
        command = [
            ETCDCTL_BINARY,
            f"--endpoints={','.join(endpoints or self.endpoints)}",
            f"--cacert={self.pki.ca_path}",
            f"--cert={who.cert_path}",
            f"--key={who.key_path}",
            "--dial-timeout=3s",
            "--command-timeout=5s",
            *args,
        ]
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            timeout=_ETCDCTL_TIMEOUT_SECS,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"etcdctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result

    def wait_healthy(self, members: Iterable[EtcdMember], timeout: float) -> None:
        """Wait until each of ``members`` serves a linearizable read (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        for member in members:
            while True:
                if not member.running:
                    raise RuntimeError(f"etcd member {member.name} exited; see {member.log_path}")
                result = self.etcdctl(
                    ["endpoint", "health"], endpoints=[member.endpoint], check=False
                )
                if result.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"etcd member {member.name} not healthy after {timeout:g} s: "
                        f"{result.stderr.decode(errors='replace').strip()}"
                    )
                time.sleep(0.2)

    def kill(self, name: str) -> None:
        """SIGKILL one member (its data stays; :meth:`restart` brings it back)."""
        member = self.member(name)
        if member.process is not None and member.process.poll() is None:
            os.kill(member.process.pid, signal.SIGKILL)
            member.process.wait(_STOP_TIMEOUT_SECS)

    def restart(self, name: str, *, wait: bool = True) -> None:
        member = self.member(name)
        if member.running:
            raise RuntimeError(f"etcd member {name} is still running")
        self._spawn(member)
        if wait:
            self.wait_healthy([member], _START_TIMEOUT_SECS)

    def stop(self) -> None:
        """Stop every member by its PID: SIGTERM, then SIGKILL after a bounded wait."""
        for member in self.members:
            process = member.process
            if process is None or process.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a stopped member cannot exit
                os.kill(process.pid, signal.SIGTERM)
        for member in self.members:
            process = member.process
            if process is None:
                continue
            try:
                process.wait(_STOP_TIMEOUT_SECS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait(_STOP_TIMEOUT_SECS)


# -- a relay the test can cut ------------------------------------------------------------------


class TcpCutter:
    """A TCP relay from ``127.0.0.1:<port>`` to ``target``; ``cut()`` silences it both ways.

    While cut, bytes already accepted are held back (not forwarded) and new connections are
    accepted but carry nothing, exactly like a network partition without resets. ``heal()``
    drops the silenced connections (as a long partition eventually does) and relays again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    async def start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, LOCALHOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _gate(self) -> asyncio.Event:
        if self._flowing is None:
            raise RuntimeError("TcpCutter not started")
        return self._flowing

    def cut(self) -> None:
        self._gate().clear()

    def heal(self) -> None:
        self._gate().set()
        for writer in list(self._writers):
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_STOP_TIMEOUT_SECS)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), _STOP_TIMEOUT_SECS)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            # While cut, a new connection is accepted and then hears nothing.
            await self._gate().wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(up_writer)
            tasks = [
                asyncio.create_task(self._pump(reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            self._tasks.update(tasks)
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                    self._tasks.discard(task)
                up_writer.close()
                self._writers.discard(up_writer)
        finally:
            writer.close()
            self._writers.discard(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                # While cut, hold the bytes back: silence, not a reset.
                await self._gate().wait()
                writer.write(data)
                await writer.drain()
