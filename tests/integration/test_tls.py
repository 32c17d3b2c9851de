"""Redis over TLS: a private TLS-only redis-server, a CA of the test's own, a commit via rediss://.

The store needs no setting of its own for TLS: redis-py reads `ssl_ca_certs`, `ssl_certfile`
and `ssl_keyfile` from the URL's query (docs/security.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from infra.errors import BackendUnavailable
from infra.redis_store import RedisModelStore
from schemas import JobConfig, StrategyConfig, VersionMeta
from schemas.codec import encode, schema_of, sha256_hex
from tests.integration.helpers import INITIAL, delta

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, name: str, usage: x509.ObjectIdentifier
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """Make a throwaway CA and the certificates it signs."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedq test CA")
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = Pki(*(tmp_path / n for n in ("ca.pem", "s.pem", "s.key", "c.pem", "c.key")))
    paths.ca.write_bytes(ca_cert.public_bytes(pem))
    for cert_path, key_path, usage in (
        (paths.server_cert, paths.server_key, ExtendedKeyUsageOID.SERVER_AUTH),
        (paths.client_cert, paths.client_key, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert, key = _issue(ca_key, ca_name, "127.0.0.1", usage)
        cert_path.write_bytes(cert.public_bytes(pem))
        _write_key(key_path, key)
    return paths


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def tls_redis(pki: Pki, tmp_path: Path) -> Iterator[int]:
    """A private redis-server that speaks only TLS and wants client certificates."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server must be installed"
    port = _free_port()
    argv = [
        binary,
        *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
        *("--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key)),
        *("--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "yes"),
        *("--save", "", "--appendonly", "no", "--dir", str(tmp_path)),
    ]
    log = tmp_path / "redis.log"
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                # A fail, not a skip: a skip would let CI pass on a machine where TLS was
                # never tested (the project's machines run Debian's TLS-capable build).
                said = log.read_text(errors="replace")[-300:]
                pytest.fail(f"redis-server exited: it must be built with TLS to run this: {said}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the TLS redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _job(job: str) -> tuple[JobConfig, bytes, VersionMeta]:
    model = encode(INITIAL)
    config = JobConfig(
        job=job,
        task="tiny",
        strategy=StrategyConfig(name="fedbuff", buffer_size=1),
        model_schema=schema_of(INITIAL),
        created_at=time.time(),
    )
    meta = VersionMeta(
        version=0, created_at=time.time(), sha256=sha256_hex(model), model_bytes=len(model)
    )
    return config, model, meta


async def test_a_commit_goes_through_rediss_with_the_ca_and_a_client_certificate(
    pki: Pki, tls_redis: int, job_id: str
) -> None:
    # Arrange: trust the test CA and present the client certificate, all in the URL
    url = (
        f"rediss://127.0.0.1:{tls_redis}/0?ssl_ca_certs={pki.ca}"
        f"&ssl_certfile={pki.client_cert}&ssl_keyfile={pki.client_key}"
    )
    store = RedisModelStore.from_url(url, job_id, timeout=10.0)
    config, model, meta = _job(job_id)
    new_model = encode({k: v + delta(1.0)[k] for k, v in INITIAL.items()})
    meta_1 = VersionMeta(
        version=1,
        created_at=time.time(),
        sha256=sha256_hex(new_model),
        model_bytes=len(new_model),
    )
    try:
        # Act
        await store.create_job(config, model, meta)
        await store.commit(0, new_model, meta_1)
        # Assert
        assert await store.latest() == (1, new_model)
        assert await store.get_meta(1) == meta_1
    finally:
        await store.close()


async def test_a_store_that_does_not_trust_the_ca_is_refused(
    pki: Pki, tls_redis: int, job_id: str
) -> None:
    # Without ssl_ca_certs the system CAs are used, which never signed the test's server.
    # (A missing client certificate or plain redis:// only show as timeouts after redis-py's
    # retries, so they are not timed here.)
    url = (
        f"rediss://127.0.0.1:{tls_redis}/0?ssl_certfile={pki.client_cert}"
        f"&ssl_keyfile={pki.client_key}"
    )
    store = RedisModelStore.from_url(url, job_id, timeout=2.0)
    try:
        with pytest.raises(BackendUnavailable, match="certificate verify failed"):
            await store.current_version()
    finally:
        await store.close()
