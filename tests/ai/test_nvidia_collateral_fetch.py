"""Fetching NVIDIA collateral (teecloud.collateral.nvidia_fetch) from a local HTTP server that this test
starts and that answers like NVIDIA's services: real-format OCSP responses (RFC 6960, built with
cryptography's OCSP builder from the request the client sent) and RIM service envelopes, all signed by the
simulated GPU's development root. No internet. Every refused answer leaves the cache as it was."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from teecloud.attestation.errors import CertificateChainInvalid, VerificationError
from teecloud.attestation.nvidia import MAX_OCSP_BYTES, verify_nvidia_evidence
from teecloud.collateral.errors import CollateralError, CollateralNotFound, InvalidCollateral, PccsUnavailable
from teecloud.collateral.nvidia import NvidiaCollateralCache
from teecloud.collateral.nvidia_fetch import MAX_RIM_ENVELOPE_BYTES, NvidiaCollateralClient
from teecloud.tee.gpu import SimulatedGpu

NONCE = bytes(range(32))
DRIVER_ID = "NV_GPU_DRIVER_GH100_550.90.07"


def _root_key(gpu: SimulatedGpu) -> Any:
    """The simulated root's key, from the simulated GPU's own state file (development keys)."""
    data = (gpu.dir / "device.pem").read_bytes()
    first = data.split(b"-----BEGIN PRIVATE KEY-----")[1]
    return serialization.load_pem_private_key(b"-----BEGIN PRIVATE KEY-----" + first, None)


class NvidiaServices:
    """NVIDIA's OCSP responder and RIM service, as far as a client sees them. `mode` selects an answer."""

    def __init__(self, gpu: SimulatedGpu, foreign: SimulatedGpu) -> None:
        self.gpu, self.foreign = gpu, foreign
        self.mode = "good"
        self.rims: dict[str, bytes] = {DRIVER_ID: gpu.rim("driver")}
        self.requests: list[tuple[str, str, bytes]] = []

    def ocsp_answer(self, body: bytes) -> tuple[int, bytes]:
        mode = self.mode
        if mode == "http-500":
            return 500, b"busy"
        if mode == "garbage":
            return 200, b"\x30\x03\x0a\x01\x00junk"
        if mode == "oversized":
            return 200, b"\x00" * (MAX_OCSP_BYTES + 1)
        if mode == "unsuccessful":
            return 200, ocsp.OCSPResponseBuilder.build_unsuccessful(
                ocsp.OCSPResponseStatus.UNAUTHORIZED
            ).public_bytes(serialization.Encoding.DER)
        req = ocsp.load_der_ocsp_request(body)
        nonce = req.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        leaf, root = self.gpu.device_certificates()
        key = _root_key(self.gpu)
        if mode in ("other-cert", "foreign-signer"):
            other_leaf, other_root = self.foreign.device_certificates()
            if mode == "other-cert":
                leaf, root, key = other_leaf, other_root, _root_key(self.foreign)
            else:
                key = _root_key(self.foreign)  # the right certificate, signed by another key
        now = dt.datetime.now(dt.UTC)
        this = now - dt.timedelta(days=10) if mode == "stale" else now - dt.timedelta(minutes=1)
        nxt = this + dt.timedelta(days=2 if mode == "stale" else 7)
        revoked = mode == "revoked"
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=leaf,
            issuer=root,
            algorithm=hashes.SHA384(),
            cert_status=ocsp.OCSPCertStatus.UNKNOWN
            if mode == "unknown"
            else (ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD),
            this_update=this,
            next_update=nxt,
            revocation_time=this if revoked else None,
            revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
        )
        if mode != "no-nonce":
            echoed = b"\x00" * 32 if mode == "other-nonce" else nonce
            builder = builder.add_extension(x509.OCSPNonce(echoed), critical=False)
        signer = self.foreign.device_certificates()[1] if mode == "foreign-signer" else root
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, signer)
        der = builder.sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)
        if mode.startswith("mutate:"):  # one byte changed at a position and by an amount the test chose
            at, by = (int(x) for x in mode.split(":")[1:])
            mutated = bytearray(der)
            mutated[at % len(der)] = (mutated[at % len(der)] + by) % 256
            der = bytes(mutated)
        return 200, der

    def rim_answer(self, rim_id: str) -> tuple[int, bytes]:
        mode = self.mode
        if rim_id not in self.rims:
            return 404, b'{"detail": "not found"}'
        if mode == "http-500":
            return 500, b"busy"
        if mode == "slow":
            time.sleep(1.5)
        xml = self.rims[rim_id]
        if mode == "foreign-rim":
            xml = self.foreign.rim("driver")
        if mode == "tampered":
            xml = xml.replace(SimulatedGpu.measurement(1).hex().encode(), b"00" * 48)
        doc: dict[str, Any] = {
            "id": "NV_GPU_DRIVER_GH100_1.0" if mode == "other-id" else rim_id,
            "rim": base64.b64encode(xml).decode(),
            "sha256": hashlib.sha256(b"other" if mode == "bad-sha" else xml).hexdigest(),
            "rim_format": "CORIM" if mode == "corim" else "TCG",
            "last_updated": "2026-01-01T00:00:00",
            "request_id": "test",
        }
        if mode == "not-base64":
            doc["rim"] = "!!" + doc["rim"]
        body = json.dumps(doc).encode()
        if mode == "oversized":
            body = body + b" " * MAX_RIM_ENVELOPE_BYTES
        if mode == "not-json":
            body = b"<html>"
        return 200, body


@pytest.fixture(scope="module")
def gpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulatedGpu, SimulatedGpu]:
    return SimulatedGpu(tmp_path_factory.mktemp("gpu")), SimulatedGpu(tmp_path_factory.mktemp("foreign"))


@pytest.fixture(scope="module")
def server(gpus: tuple[SimulatedGpu, SimulatedGpu]) -> Iterator[tuple[NvidiaServices, str]]:
    services = NvidiaServices(*gpus)

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            services.requests.append(("POST", self.headers.get("content-type", ""), body))
            if self.path != "/ocsp":
                return self._answer(404, b"", "text/plain")
            status, out = services.ocsp_answer(body)
            self._answer(status, out, "application/ocsp-response")

        def do_GET(self) -> None:
            services.requests.append(("GET", self.path, b""))
            prefix = "/v1/rim/"
            if not self.path.startswith(prefix):
                return self._answer(404, b"", "text/plain")
            status, out = services.rim_answer(self.path[len(prefix) :])
            self._answer(status, out, "application/json")

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield services, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def client(server: tuple[NvidiaServices, str], tmp_path: Path) -> Iterator[NvidiaCollateralClient]:
    services, url = server
    services.mode = "good"
    c = NvidiaCollateralClient(
        NvidiaCollateralCache(tmp_path / "cache"),
        ocsp_url=f"{url}/ocsp",
        rim_url=f"{url}/v1/rim",
        timeout_s=1.0,
    )
    yield c
    c.close()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def verify_with(gpu: SimulatedGpu, cache: NvidiaCollateralCache, now: int) -> Any:
    [item] = gpu.collect(NONCE)
    return verify_nvidia_evidence(
        item["evidence"].encode(),
        cert_chain_pem=item["certificate_chain"].encode(),
        trust_anchors=[gpu.root_der()],
        now=now,
        expected_nonce=NONCE,
        revocation=cache.revocation(now=now),
        rims=list(cache.rims([gpu.driver_version], trust_anchors=[gpu.root_der()], now=now)),
    )


def test_ocsp_and_rim_fetched_cached_and_used(
    client: NvidiaCollateralClient,
    server: tuple[NvidiaServices, str],
    gpus: tuple[SimulatedGpu, SimulatedGpu],
) -> None:
    services, _ = server
    gpu = gpus[0]
    now = int(time.time())
    services.requests.clear()
    [got] = client.fetch_ocsp_chain(list(gpu.device_certificates()), now=now)
    assert got.entry.status == "good" and got.entry.serial == gpu.device_certificates()[0].serial_number
    method, ctype, body = services.requests[-1]
    assert (method, ctype) == ("POST", "application/ocsp-request")
    req = ocsp.load_der_ocsp_request(body)  # a real RFC 6960 request: SHA-384 CertID and a 32-byte nonce
    assert req.hash_algorithm.name == "sha384"
    assert len(req.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce) == 32
    rim = client.fetch_rim(DRIVER_ID, trust_anchors=[gpu.root_der()], now=now, expected_version="550.90.07")
    assert rim.version == gpu.driver_version
    assert services.requests[-1][:2] == ("GET", f"/v1/rim/{DRIVER_ID}")
    # the verifier now checks revocation and the driver RIM's measurements from the cache alone
    v = verify_with(gpu, client.cache, now)
    assert v.fields["revocation"]["checked"] and v.fields["revocation"]["complete"]
    assert [r["version"] for r in v.fields["rims"]] == [gpu.driver_version]
    # a second answer without a nonce (a pre-signed one) is accepted too; the cache keeps the newest
    services.mode = "no-nonce"
    client.fetch_ocsp_chain(list(gpu.device_certificates()), now=now)
    assert len(client.cache.ocsp_responses(now=now)) == 1


def test_a_revoked_answer_is_cached_and_the_gpu_then_refused(
    client: NvidiaCollateralClient,
    server: tuple[NvidiaServices, str],
    gpus: tuple[SimulatedGpu, SimulatedGpu],
) -> None:
    services, _ = server
    gpu = gpus[0]
    now = int(time.time())
    services.mode = "revoked"
    [got] = client.fetch_ocsp_chain(list(gpu.device_certificates()), now=now)
    assert got.entry.status == "revoked"
    with pytest.raises(CertificateChainInvalid, match="revoked"):
        verify_with(gpu, client.cache, now)


_REFUSALS = [
    ("ocsp", "stale", InvalidCollateral, "stale|not current"),
    ("ocsp", "http-500", PccsUnavailable, "HTTP 500"),
    ("ocsp", "unsuccessful", InvalidCollateral, "UNAUTHORIZED"),
    ("ocsp", "garbage", InvalidCollateral, "not a DER OCSP response"),
    ("ocsp", "oversized", InvalidCollateral, "over"),
    ("ocsp", "other-cert", InvalidCollateral, "another certificate"),
    ("ocsp", "other-nonce", InvalidCollateral, "another nonce"),
    ("ocsp", "foreign-signer", InvalidCollateral, "not signed"),
    ("ocsp", "unknown", InvalidCollateral, "does not know"),
    ("rim", "other-id", InvalidCollateral, "answered for"),
    ("rim", "bad-sha", InvalidCollateral, "sha256"),
    ("rim", "not-base64", InvalidCollateral, "base64"),
    ("rim", "not-json", InvalidCollateral, "not JSON"),
    ("rim", "corim", InvalidCollateral, "CORIM"),
    ("rim", "foreign-rim", InvalidCollateral, "refused"),
    ("rim", "tampered", InvalidCollateral, "refused"),
    ("rim", "oversized", InvalidCollateral, "over"),
    ("rim", "http-500", PccsUnavailable, "HTTP 500"),
    ("rim", "slow", PccsUnavailable, "Timeout"),
]


@pytest.mark.parametrize(("kind", "mode", "error", "match"), _REFUSALS)
def test_a_bad_answer_is_refused_and_the_cache_unchanged(
    client: NvidiaCollateralClient,
    server: tuple[NvidiaServices, str],
    gpus: tuple[SimulatedGpu, SimulatedGpu],
    kind: str,
    mode: str,
    error: type[Exception],
    match: str,
) -> None:
    """An OCSP answer for the GPU's chain or a RIM, answered badly in `mode`: refused with `error`, and the
    good answer cached before it (fetched first) is still the cache's, byte for byte."""
    services, _ = server
    now = int(time.time())
    chain, anchors = list(gpus[0].device_certificates()), [gpus[0].root_der()]

    def fetch() -> object:
        if kind == "ocsp":
            return client.fetch_ocsp_chain(chain, now=now)
        return client.fetch_rim(DRIVER_ID, trust_anchors=anchors, now=now)

    fetch()  # a good answer first: a refused one must not replace it
    before = snapshot(client.cache.dir)
    services.mode = mode
    with pytest.raises(error, match=match):
        fetch()
    assert snapshot(client.cache.dir) == before


def test_generated_mutations_of_an_ocsp_answer_are_refused_or_read_as_sent(
    client: NvidiaCollateralClient,
    server: tuple[NvidiaServices, str],
    gpus: tuple[SimulatedGpu, SimulatedGpu],
) -> None:
    """One byte of the responder's answer changed (120 generated mutations): refused with a collateral error
    (never another exception) and the cache unchanged, or -- where the change falls outside what is signed and
    read, such as the certificates' padding -- cached with exactly the status and dates of a good answer."""
    services, _ = server
    chain = list(gpus[0].device_certificates())
    now = int(time.time())
    rng = random.Random(2126)
    refused = 0
    for _ in range(120):
        before = snapshot(client.cache.dir)
        services.mode = f"mutate:{rng.randrange(4096)}:{rng.randrange(1, 256)}"
        try:
            [got] = client.fetch_ocsp_chain(chain, now=now)
        except CollateralError:
            refused += 1
            assert snapshot(client.cache.dir) == before
            continue
        assert got.entry.status == "good" and got.entry.serial == chain[0].serial_number
    assert refused > 100


def test_rim_refusals_before_any_request(
    client: NvidiaCollateralClient,
    server: tuple[NvidiaServices, str],
    gpus: tuple[SimulatedGpu, SimulatedGpu],
) -> None:
    services, _ = server
    anchors = [gpus[0].root_der()]
    now = int(time.time())
    with pytest.raises(CollateralNotFound):
        client.fetch_rim("NV_GPU_DRIVER_GH100_0.0.0", trust_anchors=anchors, now=now)
    with pytest.raises(InvalidCollateral, match=r"expected 470\.1"):
        client.fetch_rim(DRIVER_ID, trust_anchors=anchors, now=now, expected_version="470.1")
    with pytest.raises(InvalidCollateral, match="refused"):  # the development root not trusted
        client.fetch_rim(DRIVER_ID, trust_anchors=[gpus[1].root_der()], now=now)
    # expired by the time it is fetched: the RIM signing chain is not valid a century later
    with pytest.raises(InvalidCollateral):
        client.fetch_rim(DRIVER_ID, trust_anchors=anchors, now=now + 100 * 365 * 86400)
    assert snapshot(client.cache.dir) == {}
    sent = len(services.requests)
    for bad in ("../etc/passwd", "a/b", "", "x" * 200, "id?x=1"):
        with pytest.raises(ValueError):
            client.fetch_rim(bad, trust_anchors=anchors, now=now)
    assert len(services.requests) == sent  # refused before a request
    with pytest.raises(InvalidCollateral, match=r"2\.\.8"):
        client.fetch_ocsp_chain(list(gpus[0].device_certificates())[:1], now=now)


def test_unreachable_services(tmp_path: Path, gpus: tuple[SimulatedGpu, SimulatedGpu]) -> None:
    c = NvidiaCollateralClient(
        NvidiaCollateralCache(tmp_path), ocsp_url="http://127.0.0.1:9/", rim_url="http://127.0.0.1:9/v1/rim"
    )
    with pytest.raises(PccsUnavailable, match="unreachable"):
        c.fetch_ocsp_chain(list(gpus[0].device_certificates()), now=int(time.time()))
    with pytest.raises(PccsUnavailable, match="unreachable"):
        c.fetch_rim(DRIVER_ID, trust_anchors=[gpus[0].root_der()], now=int(time.time()))
    c.close()


def test_cli_collateral_fetch(
    server: tuple[NvidiaServices, str], gpus: tuple[SimulatedGpu, SimulatedGpu], tmp_path: Path
) -> None:
    services, url = server
    services.mode = "good"
    gpu = gpus[0]
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in gpu.device_certificates()))
    root = tmp_path / "root.der"
    root.write_bytes(gpu.root_der())
    cache = tmp_path / "cache"
    base = [
        sys.executable,
        "-c",
        "from teecloud.cli import main; main()",
        "ai",
        "collateral",
        "fetch",
        "--dir",
        str(cache),
    ]
    urls = ["--ocsp-url", f"{url}/ocsp", "--rim-url", f"{url}/v1/rim"]
    r = subprocess.run(
        [*base, *urls, "--chain", str(chain), "--rim", DRIVER_ID, "--trust-root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "ocsp good" in r.stdout and f"rim {DRIVER_ID}: version 550.90.07" in r.stdout
    now = int(time.time())
    assert len(NvidiaCollateralCache(cache).ocsp_responses(now=now)) == 1
    before = snapshot(cache)
    services.mode = "bad-sha"
    r = subprocess.run(
        [*base, *urls, "--rim", DRIVER_ID, "--trust-root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "sha256" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(cache) == before
    for args, words in [
        ([], "nothing to fetch"),
        (["--rim", DRIVER_ID], "trusted RIM signing root"),
        (["--rim", "../x", "--trust-root", str(root)], "RIM id"),
        (["--chain", str(root)], "not a PEM"),
        (["--chain", str(chain), "--timeout", "0"], "--timeout"),
    ]:
        r = subprocess.run([*base, *urls, *args], capture_output=True, text=True, timeout=60)
        said = " ".join(r.stderr.split())  # the CLI wraps at the console width, a long path anywhere in it
        assert r.returncode in (1, 2) and words in said and "Traceback" not in said, (args, r.stderr)
    services.mode = "good"


def test_client_uses_its_timeout(server: tuple[NvidiaServices, str], tmp_path: Path) -> None:
    _, url = server
    c = NvidiaCollateralClient(NvidiaCollateralCache(tmp_path), rim_url=f"{url}/v1/rim", timeout_s=0.25)
    assert isinstance(c.client, httpx.Client) and c.client.timeout.read == 0.25
    c.close()


def test_the_cache_never_serves_an_answer_the_verifier_cannot_read(
    gpus: tuple[SimulatedGpu, SimulatedGpu], tmp_path: Path
) -> None:
    """One-byte mutations of a good OCSP answer written straight into the cache's directory (as damage or a
    hand-placed file would be): each is either not served, or served and judged by the verifier with a
    verification error or as before -- never an exception of the parsing library (an unknown signature
    algorithm is read lazily by cryptography)."""
    gpu = gpus[0]
    good = gpu.ocsp_response()
    now = int(time.time())
    cache = NvidiaCollateralCache(tmp_path)
    entry = cache.add_ocsp(good, now=now)
    [path] = (tmp_path / "ocsp").glob("*.der")
    rng = random.Random(1)
    for _ in range(300):
        data = bytearray(good)
        i = rng.randrange(len(data))
        data[i] = (data[i] + rng.randrange(1, 256)) % 256
        path.write_bytes(bytes(data))
        try:
            verify_with(gpu, cache, now)
        except VerificationError:
            continue
    path.write_bytes(good)
    assert cache.ocsp_responses(now=now) == (good,) and entry.status == "good"
