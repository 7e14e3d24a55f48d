"""Offline NVIDIA collateral: OCSP responses (generated with cryptography's OCSP builder) and RIMs (a signed
SWID tag in NVIDIA's format, made by the simulated GPU's development root) cached on disk, served only within
validity, and used by attestation/nvidia.py: measurements checked against the RIMs, a revoked device
certificate refused."""

from __future__ import annotations

import datetime as dt
import random
import time
from pathlib import Path
from typing import Any

import pytest

from teecloud.attestation._revocation import Revocation
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    Expired,
    MalformedEvidence,
    PolicyViolation,
    SignatureInvalid,
    UntrustedRoot,
    VerificationError,
)
from teecloud.attestation.nvidia import verify_nvidia_evidence, verify_rim
from teecloud.collateral.errors import InvalidCollateral
from teecloud.collateral.nvidia import NvidiaCollateralCache
from teecloud.tee.gpu import SimulatedGpu

NONCE = bytes(range(32))


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> SimulatedGpu:
    return SimulatedGpu(tmp_path_factory.mktemp("gpu-home"))


@pytest.fixture(scope="module")
def rims(gpu: SimulatedGpu) -> tuple[bytes, bytes]:
    return gpu.rim("driver"), gpu.rim("vbios")


def verify(gpu: SimulatedGpu, *, now: int | None = None, **kw: Any) -> Any:
    [item] = gpu.collect(NONCE)
    return verify_nvidia_evidence(
        item["evidence"].encode(),
        cert_chain_pem=item["certificate_chain"].encode(),
        trust_anchors=[gpu.root_der()],
        now=now or int(time.time()),
        expected_nonce=NONCE,
        **kw,
    )


def test_measurements_match_the_rims(gpu: SimulatedGpu, rims: tuple[bytes, bytes]) -> None:
    v = verify(gpu, rims=list(rims))
    assert "rim_measurements" in [s.name for s in v.steps]
    assert [r["compared"] for r in v.fields["rims"]] == [2, 2]
    assert {r["version"] for r in v.fields["rims"]} == {gpu.driver_version, "96.9f.00.01.01"}
    rim = verify_rim(rims[0], trust_anchors=[gpu.root_der()], now=int(time.time()))
    assert "SIMULATED" in rim.tag_id and "SIMULATED" in rim.name  # labelled
    assert verify(gpu).fields["rims"] == []  # without RIMs nothing is judged, and it says so


def test_a_measurement_other_than_the_reference_is_refused(gpu: SimulatedGpu) -> None:
    other = gpu.rim("driver", golden={2: b"\x42" * 48})
    with pytest.raises(PolicyViolation) as err:
        verify(gpu, rims=[other])
    assert err.value.step == "measurements" and "measurement 2" in str(err.value)


def test_a_rim_of_another_version_root_or_tampered_is_refused(
    gpu: SimulatedGpu, rims: tuple[bytes, bytes], tmp_path: Path
) -> None:
    with pytest.raises(PolicyViolation, match="is for version"):
        verify(gpu, rims=[SimulatedGpu(gpu.dir.parent, driver_version="470.1").rim("driver")])  # same GPU
    foreign = SimulatedGpu(tmp_path / "foreign").rim("driver")
    with pytest.raises(UntrustedRoot):
        verify(gpu, rims=[foreign])
    good = SimulatedGpu.measurement(1).hex().encode()
    with pytest.raises(SignatureInvalid):
        verify(gpu, rims=[rims[0].replace(good, b"00" * 48)])
    dtd = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]>' + rims[0].split(b"?>", 1)[1]
    with pytest.raises(MalformedEvidence, match="DTD"):
        verify(gpu, rims=[dtd])
    with pytest.raises(MalformedEvidence):
        verify(gpu, rims=[b"not xml"])


def test_generated_mutations_of_a_rim_never_change_what_it_says(
    gpu: SimulatedGpu, rims: tuple[bytes, bytes]
) -> None:
    """Byte mutations anywhere in a signed RIM: refused with a verification error (never another exception),
    or, where canonicalization erases the change (whitespace between attributes), read exactly as before."""
    rng = random.Random(21)
    raw, now, anchors = rims[0], int(time.time()), [gpu.root_der()]
    original = verify_rim(raw, trust_anchors=anchors, now=now)
    refused = 0
    for _ in range(200):
        data = bytearray(raw)
        i = rng.randrange(len(data))
        data[i] = (data[i] + rng.randrange(1, 256)) % 256
        try:
            rim = verify_rim(bytes(data), trust_anchors=anchors, now=now)
        except VerificationError:
            refused += 1
            continue
        assert rim == original, f"mutation at {i} changed a verified RIM"
    assert refused > 150


def test_ocsp_good_revoked_and_stale(gpu: SimulatedGpu) -> None:
    good = verify(gpu, revocation=Revocation(ocsp_responses=(gpu.ocsp_response(),)))
    assert good.fields["revocation"]["checked"], good.fields["revocation"]
    with pytest.raises(CertificateChainInvalid, match="revoked"):
        verify(gpu, revocation=Revocation(ocsp_responses=(gpu.ocsp_response(revoked=True),)))
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    with pytest.raises(Expired):
        verify(gpu, revocation=Revocation(ocsp_responses=(gpu.ocsp_response(this_update=old),)))


def test_the_cache_serves_ocsp_only_within_validity(gpu: SimulatedGpu, tmp_path: Path) -> None:
    cache = NvidiaCollateralCache(tmp_path / "nvidia")
    now = int(time.time())
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    with pytest.raises(InvalidCollateral, match="stale"):
        cache.add_ocsp(gpu.ocsp_response(this_update=old), now=now)
    with pytest.raises(InvalidCollateral):
        cache.add_ocsp(b"\x30\x03\x0a\x01\x00", now=now)  # malformed
    entry = cache.add_ocsp(gpu.ocsp_response(valid_for=dt.timedelta(hours=1)), now=now)
    assert entry.status == "good"
    assert len(cache.ocsp_responses(now=now)) == 1
    v = verify(gpu, revocation=cache.revocation(now=now))
    assert v.fields["revocation"]["checked"]
    later = now + 2 * 3600  # past its nextUpdate: no longer served, so revocation is "not checked"
    assert cache.ocsp_responses(now=later) == ()
    assert not verify(gpu, now=later, revocation=cache.revocation(now=later)).fields["revocation"]["checked"]
    # a revoked answer replaces the good one (newer thisUpdate), and the boot evidence is refused
    time.sleep(1.1)
    cache.add_ocsp(gpu.ocsp_response(revoked=True), now=int(time.time()))
    with pytest.raises(CertificateChainInvalid, match="revoked"):
        verify(gpu, revocation=cache.revocation(now=int(time.time())))


def test_the_cache_serves_rims_only_while_they_verify(
    gpu: SimulatedGpu, rims: tuple[bytes, bytes], tmp_path: Path
) -> None:
    cache = NvidiaCollateralCache(tmp_path / "nvidia")
    now = int(time.time())
    anchors = [gpu.root_der()]
    for rim in rims:
        cache.add_rim(rim, trust_anchors=anchors, now=now)
    with pytest.raises(InvalidCollateral, match="RIM refused"):
        cache.add_rim(
            rims[0].replace(b"SIMULATED_MEASUREMENT_1", b"SIMULATED_MEASUREMENT_9"),
            trust_anchors=anchors,
            now=now,
        )
    with pytest.raises(InvalidCollateral, match="RIM refused"):
        cache.add_rim(rims[0], trust_anchors=[SimulatedGpu(tmp_path / "x").root_der()], now=now)
    served = cache.rims([gpu.driver_version, "96.9F.00.01.01"], trust_anchors=anchors, now=now)
    assert sorted(served) == sorted(rims)
    assert cache.rims(["1.0"], trust_anchors=anchors, now=now) == ()
    assert verify(gpu, rims=list(served)).fields["rims"]
    # past the signing certificate's validity the RIMs are not served
    assert cache.rims([gpu.driver_version], trust_anchors=anchors, now=now + 20 * 365 * 86400) == ()
