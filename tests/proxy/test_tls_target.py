"""TLS to the target: verified for a plain host (SNI and certificate checks), refused with a
502 when the certificate does not verify."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rustbalance.proxy import ProxySettings, Target
from tests.proxy.helpers import HttpClient, counting_splice, running_proxy


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` (DNS) and 127.0.0.1 (IP)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@asynccontextmanager
async def _tls_target(
    cert: Path, key: Path, sni_seen: list[str], body: bytes = b"secure hello"
) -> AsyncIterator[int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def on_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni_seen.append(name or "")

    context.sni_callback = on_sni

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("size", [0, 2 * 1024 * 1024], ids=["small", "large"])
async def test_tls_target_is_verified_and_reached(tmp_path: Path, size: int) -> None:
    # A large body is copied through TLS (http mode splices large bodies only between
    # plain sockets: the bytes on a TLS socket are not the body's).
    cert, key = _self_signed(tmp_path, "localhost")
    body = os.urandom(size) if size else b"secure hello"
    sni: list[str] = []
    with counting_splice() as splices:
        async with _tls_target(cert, key, sni, body) as port:
            target = Target(host="localhost", port=port, is_onion=False, use_tls=True)
            settings = ProxySettings(target=target, tls_ca_file=str(cert), connect_timeout=5.0)
            async with running_proxy(settings) as proxy:
                response = await HttpClient.get_once(proxy.port)
    assert response.status == 200
    assert response.body == body
    assert sni == ["localhost"]
    assert splices == []


async def test_tls_target_with_an_untrusted_certificate_gets_502(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path, "localhost")
    other, _ = _self_signed(tmp_path, "elsewhere")
    async with _tls_target(cert, key, []) as port:
        target = Target(host="localhost", port=port, is_onion=False, use_tls=True)
        # The proxy trusts only another CA: a plain-host target's certificate is checked.
        settings = ProxySettings(target=target, tls_ca_file=str(other), connect_timeout=5.0)
        async with running_proxy(settings) as proxy:
            response = await HttpClient.get_once(proxy.port)
    assert response.status == 502
    assert b"secure hello" not in response.body
