"""The fal fake speaks what the official ``fal-client`` expects.

fal-client builds ``https://{FAL_RUN_HOST}/`` and ``https://{FAL_QUEUE_RUN_HOST}/`` at import time and always
uses https, so the fake is served here with TLS: a throwaway CA and a 127.0.0.1 certificate are generated
with ``cryptography``, and the client trusts that CA through ``SSL_CERT_FILE`` (httpx reads it when a client
is created). One test drives the client in a subprocess purely through its environment variables; the others
run in-process and point the two URL constants at the fake (what those variables would have produced).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fal_client", reason="fal-client is not installed")
x509 = pytest.importorskip("cryptography.x509", reason="cryptography is not installed")

import fal_client
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fakes.fal_fake import Failure, FalFake
from tests.servers import serve_app

KEY = "fal-sdk-test-key-0123456789"
APP = "fal-ai/fast-sdxl"


def _make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf for 127.0.0.1 signed by it → (ca.pem, leaf.pem, leaf.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagegate test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FalFake, Path]]:
    ca, leaf, key = _make_certs(tmp_path_factory.mktemp("fal-tls"))
    fake = FalFake(key=KEY)
    tls_files: dict[str, Any] = {"ssl_certfile": str(leaf), "ssl_keyfile": str(key)}
    with serve_app(fake.queue_app, **tls_files) as queue_url, serve_app(fake.run_app, **tls_files) as run_url:
        fake.queue_url, fake.run_url = queue_url, run_url
        yield fake, ca


@pytest.fixture
def fake(tls: tuple[FalFake, Path], monkeypatch: pytest.MonkeyPatch) -> FalFake:
    served, ca = tls
    served.reset()
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", served.run_url + "/")
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", served.queue_url + "/")
    return served


@pytest.fixture
def client(fake: FalFake) -> Iterator[fal_client.SyncClient]:
    sdk = fal_client.SyncClient(key=KEY, default_timeout=10)
    yield sdk
    if "_client" in sdk.__dict__:
        sdk._client.close()


def _host(url: str) -> str:
    return url.split("://", 1)[1]


def test_env_vars_drive_the_client_to_the_fake(tls: tuple[FalFake, Path]) -> None:
    """FAL_RUN_HOST / FAL_QUEUE_RUN_HOST / FAL_KEY / SSL_CERT_FILE alone, as a user would configure it."""
    fake, ca = tls
    fake.reset(queue_polls=2)
    script = f"""
import json, fal_client
seen = []
out = fal_client.subscribe({APP!r}, arguments={{"prompt": "a fox", "image_size": "square"}}, with_logs=True,
                           on_queue_update=lambda s: seen.append(type(s).__name__), interval=0.01)
ran = fal_client.run({APP!r}, arguments={{"prompt": "a fox", "num_images": 2, "sync_mode": True}})
print(json.dumps({{"seen": seen, "queued": out, "ran": ran}}))
"""
    env = {
        **os.environ,
        "FAL_RUN_HOST": _host(fake.run_url),
        "FAL_QUEUE_RUN_HOST": _host(fake.queue_url),
        "FAL_KEY": KEY,
        "SSL_CERT_FILE": str(ca),
        "HOME": str(ca.parent),
    }
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["seen"][:2] == ["Queued", "Queued"] and result["seen"][-1] == "Completed"
    assert "InProgress" in result["seen"]
    assert result["queued"]["images"][0]["width"] == 512 and result["queued"]["images"][0]["url"].startswith(
        fake.queue_url + "/files/"
    )
    assert [i["url"][:22] for i in result["ran"]["images"]] == ["data:image/jpeg;base64"] * 2


def test_queue_lifecycle(fake: FalFake, client: fal_client.SyncClient) -> None:
    fake.reset(queue_polls=3, inference_time=0.5)
    handle = client.submit("fal-ai/flux/schnell", {"prompt": "a fox"}, start_timeout=30)
    # The returned URLs drop the sub-path.
    assert handle.status_url == f"{fake.queue_url}/fal-ai/flux/requests/{handle.request_id}/status"
    events = list(handle.iter_events(with_logs=True, interval=0.01))
    assert [e.position for e in events if isinstance(e, fal_client.Queued)] == [2, 1, 0]
    assert isinstance(events[-2], fal_client.InProgress) and events[-2].logs
    done = events[-1]
    assert isinstance(done, fal_client.Completed) and done.metrics == {"inference_time": 0.5} and done.error is None
    result = handle.get()
    assert result["images"][0]["content_type"] == "image/jpeg" and result["timings"] == {"inference": 0.5}
    assert fake.log[0][2]["x-fal-request-timeout"] == "30.0"
    assert fake.log[0][1] == "/fal-ai/flux/schnell"


def test_cancel(fake: FalFake, client: fal_client.SyncClient) -> None:
    fake.reset(progress_polls=10**6)
    handle = client.submit(APP, {"prompt": "a fox"})
    assert isinstance(handle.status(), fal_client.InProgress)
    handle.cancel()
    assert fake.cancelled == [handle.request_id]
    done = handle.status()
    assert isinstance(done, fal_client.Completed) and done.error_type == "request_cancelled"
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        handle.cancel()  # already done
    assert info.value.status_code == 400


def test_completed_with_error(fake: FalFake, client: fal_client.SyncClient) -> None:
    fake.reset(completed_error=Failure(500, {"detail": "CUDA out of memory"}))
    handle = client.submit(APP, {"prompt": "a fox"})
    done = [e for e in handle.iter_events(interval=0.01)][-1]
    assert isinstance(done, fal_client.Completed) and done.error == "CUDA out of memory"
    with pytest.raises(fal_client.client.FalClientHTTPError, match="CUDA out of memory"):
        handle.get()


def test_validation_error(fake: FalFake, client: fal_client.SyncClient) -> None:
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        client.run(APP, {"prompt": "a fox", "num_images": 20})
    assert info.value.status_code == 422
    assert info.value.message[0]["loc"] == ["body", "num_images"]


def test_runner_error_and_user_timeout_are_not_retried(fake: FalFake, client: fal_client.SyncClient) -> None:
    fake.reset(fail_submit=[Failure.infra("runner_scheduling_failure"), Failure.user_timeout()])
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        client.submit(APP, {"prompt": "a fox"})
    assert info.value.status_code == 503 and info.value.error_type == "runner_scheduling_failure"
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        client.run(APP, {"prompt": "a fox"}, start_timeout=5)
    assert info.value.status_code == 504 and info.value.response_headers["x-fal-request-timeout-type"] == "user"
    assert len(fake.log) == 2  # each answered once: the client recognised fal's own answers


def test_rate_limit_is_retried_by_the_client(fake: FalFake, client: fal_client.SyncClient) -> None:
    fake.reset(fail_submit=[Failure.rate_limited(0)])
    result = client.run(APP, {"prompt": "a fox", "image_size": {"width": 640, "height": 480}})
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (640, 480)
    assert len(fake.log) == 2


def test_wrong_key(fake: FalFake) -> None:
    sdk = fal_client.SyncClient(key="not-the-key", default_timeout=10)
    try:
        with pytest.raises(fal_client.client.FalClientHTTPError) as info:
            sdk.run(APP, {"prompt": "a fox"})
    finally:
        sdk._client.close()
    assert info.value.status_code == 401
