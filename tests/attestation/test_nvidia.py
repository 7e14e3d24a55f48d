"""NVIDIA H100 SPDM evidence: the nvtrust vector verifies; nonce, signature, chain and structure rules each
have a negative test; re-signed exchanges under a test PKI cover untrusted roots and the FWID binding."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teecloud.attestation import nvidia
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    Expired,
    MalformedEvidence,
    PolicyViolation,
    SignatureInvalid,
    UntrustedRoot,
    VerificationError,
)
from teecloud.attestation.models import VerifiedEvidence
from tests.attestation.test_x509 import TestPki, der, make_cert, pem

NOW = int(dt.datetime(2026, 7, 1, tzinfo=dt.UTC).timestamp())
NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")


@pytest.fixture(scope="module")
def text(vectors: Path) -> bytes:
    return (vectors / "nvidia" / "nvtrust_lgv_hopperAttestationReport.txt").read_bytes()


@pytest.fixture(scope="module")
def raw(text: bytes) -> bytes:
    return bytes.fromhex(text.decode())


@pytest.fixture(scope="module")
def chain(vectors: Path) -> bytes:
    return (vectors / "nvidia" / "nvtrust_lgv_hopperCertChain.txt").read_bytes()


@pytest.fixture(scope="module")
def root(vectors: Path) -> bytes:
    return (vectors / "nvidia" / "nvtrust_lgv_verifier_device_root.pem").read_bytes()


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki.create("GPU Test")


def resign(evidence: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    body = evidence[: -nvidia.SIGNATURE_SIZE]
    r, s = decode_dss_signature(key.sign(body, ec.ECDSA(hashes.SHA384())))
    return body + r.to_bytes(48, "big") + s.to_bytes(48, "big")


def flip(data: bytes, i: int, mask: int = 0x01) -> bytes:
    return data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :]


def verify(evidence: bytes, chain: bytes, root: bytes, **kw: object) -> VerifiedEvidence:
    args: dict[str, object] = {"cert_chain_pem": chain, "trust_anchors": [root], "now": NOW}
    args.update(kw)
    return nvidia.verify_nvidia_evidence(evidence, **args)


# --- the real vector ---


def test_vector_verifies_with_expected_values(text: bytes, chain: bytes, root: bytes) -> None:
    ev = verify(text, chain, root)
    assert ev.tee == "nvidia"
    assert ev.fields["nonce"] == NONCE.hex() and ev.report_data == NONCE
    assert ev.fields["driver_version"] == "550.90.07"
    assert ev.fields["vbios_version"] == "96.00.9F.00.01"
    assert ev.fields["spdm_version"] == "1.1"
    assert len(ev.measurements) == 64 and "measurement_1" in ev.measurements
    assert all(len(v) == 48 for v in ev.measurements.values())
    assert ev.fields["fwid_matched_certificate"] is True
    assert ev.device_id.hex() == "53c22ba15e5d68088282da074ed9fb37aa585771"
    assert ev.debug is False and ev.tcb_status == nvidia.TCB_STATUS
    assert "NVIDIA Device Identity CA" in ev.steps[1].reason
    assert [s.name for s in ev.steps] == [
        "parsed",
        "cert_chain_verified",
        "revocation",
        "quote_verified",
        "fwid_matched",
    ]
    assert ev.steps[2].reason.startswith("revocation not checked")


def test_raw_bytes_and_reflowed_hex_are_accepted(raw: bytes, text: bytes, chain: bytes, root: bytes) -> None:
    assert verify(raw, chain, root).fields["nonce"] == NONCE.hex()
    wrapped = b"\n".join(text.strip()[i : i + 64] for i in range(0, len(text.strip()), 64)) + b"\n"
    assert verify(wrapped.upper(), chain, root).fields["driver_version"] == "550.90.07"


def test_chain_in_any_order(raw: bytes, chain: bytes, root: bytes) -> None:
    certs = x509.load_pem_x509_certificates(chain)
    assert verify(raw, pem(*reversed(certs)), root).fields["driver_version"] == "550.90.07"


def test_parse_blocks(raw: bytes) -> None:
    m = nvidia.parse_nvidia_evidence(raw)
    assert [b.index for b in m.blocks] == list(range(1, 65))
    assert all(b.spec == 1 and b.value_type is not None for b in m.blocks)
    assert m.requester_nonce == NONCE and m.request_param2 == 0xFF
    assert m.signed_bytes == raw[:-96]


def test_looks_like(text: bytes, raw: bytes) -> None:
    assert nvidia.looks_like(text) and nvidia.looks_like(raw)
    assert not nvidia.looks_like(b"\x02\x00\x00\x00")
    assert not nvidia.looks_like(b"")


def test_expected_nonce(text: bytes, chain: bytes, root: bytes) -> None:
    ev = verify(text, chain, root, expected_nonce=NONCE)
    assert ev.steps[-1].name == "nonce" and ev.steps[-1].ok
    with pytest.raises(PolicyViolation, match="nonce mismatch") as exc:
        verify(text, chain, root, expected_nonce=bytes(32))
    assert exc.value.step == "nonce"


def test_before_chain_validity_is_named(text: bytes, chain: bytes, root: bytes) -> None:
    early = int(dt.datetime(2021, 6, 1, tzinfo=dt.UTC).timestamp())
    with pytest.raises(Expired, match=r"NVIDIA GH100 Provisioner ICA 1.*not valid before 2022-03-01"):
        verify(text, chain, root, now=early)


def test_signature_bit_flip_is_rejected(raw: bytes, chain: bytes, root: bytes) -> None:
    for i in (len(raw) - 96, len(raw) - 1):
        with pytest.raises(SignatureInvalid, match="does not verify"):
            verify(flip(raw, i), chain, root)


@pytest.mark.parametrize("where", ["request nonce", "measurement", "responder nonce", "opaque"])
def test_body_bit_flip_is_rejected(raw: bytes, chain: bytes, root: bytes, where: str) -> None:
    offsets = {
        "request nonce": 10,
        "measurement": 37 + 8 + 4 + 3 + 5,
        "responder nonce": None,
        "opaque": None,
    }
    i = offsets[where]
    if i is None:
        m = nvidia.parse_nvidia_evidence(raw)
        needle = m.responder_nonce if where == "responder nonce" else b"550.90.07"
        i = raw.index(needle) + 2
    with pytest.raises(SignatureInvalid):
        verify(flip(raw, i), chain, root)


def test_certificate_bit_flip_is_rejected(raw: bytes, chain: bytes, root: bytes) -> None:
    certs = x509.load_pem_x509_certificates(chain)
    leaf = bytearray(der(certs[0]))
    leaf[-5] ^= 0x01  # inside the BROM's signature over the leaf
    bad = pem(x509.load_der_x509_certificate(bytes(leaf)), *certs[1:])
    with pytest.raises(CertificateChainInvalid, match=r"GH100 A01 GSP FMC LF.*does not verify"):
        verify(raw, bad, root)


def test_chain_to_another_root_is_untrusted_and_named(raw: bytes, chain: bytes, pki: TestPki) -> None:
    with pytest.raises(UntrustedRoot, match="NVIDIA Device Identity CA"):
        verify(raw, chain, pem(pki.root))


def test_resigned_evidence_under_test_root(raw: bytes, root: bytes, pki: TestPki) -> None:
    forged = resign(raw, pki.leaf_key)
    test_chain = pem(pki.leaf, pki.inter, pki.root)
    ev = verify(forged, test_chain, der(pki.root))
    assert ev.fields["fwid_matched_certificate"] is False  # the test leaf has no DICE TcbInfo
    with pytest.raises(UntrustedRoot, match="GPU Test Root"):
        verify(forged, test_chain, root)


def test_fwid_mismatch_with_certificate_is_rejected(raw: bytes, pki: TestPki) -> None:
    other_fwid = bytes.fromhex("0609608648016503040202") + b"\x04\x30" + b"\x11" * 48
    dice = x509.UnrecognizedExtension(
        x509.ObjectIdentifier("2.23.133.5.4.1"), b"\x30\x3f\x30\x3d" + other_fwid
    )
    leaf = make_cert(
        "GPU Test Leaf",
        pki.leaf_key,
        issuer_cn="GPU Test Intermediate",
        issuer_key=pki.inter_key,
        extensions=[dice],
    )
    with pytest.raises(CertificateChainInvalid, match="FWID"):
        verify(resign(raw, pki.leaf_key), pem(leaf, pki.inter), der(pki.root))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r[:-1], "truncated"),
        (lambda r: r + b"\x00", "after the signature"),
        (lambda r: r[:30], "truncated"),
        (lambda r: b"", "neither hex"),
        (lambda r: r * 20, "limit"),
        (lambda r: b"\x10" + r[1:], "neither hex"),
        (lambda r: r[:1] + b"\xe1" + r[2:], "neither hex"),
        (lambda r: r[:2] + b"\x00" + r[3:], "did not ask for a signature"),
        (lambda r: r[:38] + b"\x61" + r[39:], "MEASUREMENTS response"),
        (lambda r: r[:41] + b"\x41" + r[42:], "truncated|trailing|beyond"),
    ],
)
def test_malformed_exchanges(raw: bytes, chain: bytes, root: bytes, mutate: object, needle: str) -> None:
    with pytest.raises(MalformedEvidence, match=needle):
        verify(mutate(raw), chain, root)  # type: ignore[operator]


def test_bad_hex_is_malformed(text: bytes, chain: bytes, root: bytes) -> None:
    with pytest.raises(MalformedEvidence, match="hex"):
        verify(text.strip()[:-1], chain, root)


def test_duplicate_block_index_is_malformed(raw: bytes, chain: bytes, root: bytes) -> None:
    second = 37 + 8 + 4 + 51  # the second block's index byte
    with pytest.raises(MalformedEvidence, match="appears twice"):
        verify(raw[:second] + b"\x01" + raw[second + 1 :], chain, root)


# --- mutation properties ---

_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(data=st.data())
def test_mutated_evidence_never_raises_anything_else(
    raw: bytes, chain: bytes, root: bytes, data: st.DataObject
) -> None:
    blob = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(blob))))
    mutated = bytes(blob if cut is None else blob[:cut])
    try:
        nvidia.parse_nvidia_evidence(mutated)
    except VerificationError:
        pass
    try:
        verify(mutated, chain, root)
    except VerificationError:
        return
    assert mutated == raw


@_SETTINGS
@given(blob=st.binary(max_size=600) | st.text(alphabet="0123456789abcdef \n", max_size=600).map(str.encode))
def test_random_input_never_raises_anything_else(chain: bytes, root: bytes, blob: bytes) -> None:
    with pytest.raises(VerificationError):
        verify(b"\x11\xe0" + blob if len(blob) % 2 else blob, chain, root)
