"""AWS Nitro: the dstack vector verifies at its own timestamp; synthetic documents under a test root cover
debug enclaves, forged signatures and untrusted roots."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teecloud.attestation import nitro
from teecloud.attestation.errors import (
    CertificateChainInvalid,
    Expired,
    MalformedEvidence,
    PolicyViolation,
    SignatureInvalid,
    UntrustedRoot,
    UsageError,
    VerificationError,
)
from tests.attestation.test_x509 import TestPki, der, pem

DOC_TS_MS = 1766668537578
PIN = DOC_TS_MS // 1000
MODULE_ID = "i-0827e799ec9232d44-enc019b55a68bd2ed4b"


@pytest.fixture(scope="module")
def doc(vectors: Path) -> bytes:
    return (vectors / "nitro" / "dstack_nsm-qvl_nitro_attestation.cose_sign1.cbor").read_bytes()


@pytest.fixture(scope="module")
def aws_root(vectors: Path) -> bytes:
    return (vectors / "nitro" / "AWS_NitroEnclaves_Root-G1.pem").read_bytes()


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki.create("Nitro Test")


def cose_parts(data: bytes) -> list[Any]:
    parts = cbor2.loads(data)
    assert isinstance(parts, list)
    return parts


def sign_document(pki: TestPki, payload: dict[str, Any], *, tagged: bool = False) -> bytes:
    """A COSE_Sign1 (RFC 9052) ES384 document signed by the test PKI's leaf."""
    protected = cbor2.dumps({1: -35})
    body = cbor2.dumps(payload)
    to_sign = cbor2.dumps(["Signature1", protected, b"", body])
    r, s = decode_dss_signature(pki.leaf_key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    msg = [protected, {}, body, r.to_bytes(48, "big") + s.to_bytes(48, "big")]
    return cbor2.dumps(cbor2.CBORTag(18, msg) if tagged else msg)


def payload(pki: TestPki, pcrs: dict[int, bytes] | None = None, **over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "module_id": "i-test-enc0001",
        "digest": "SHA384",
        "timestamp": DOC_TS_MS,
        "pcrs": pcrs if pcrs is not None else {i: bytes([i + 1]) * 48 for i in range(16)},
        "certificate": der(pki.leaf),
        "cabundle": [der(pki.root), der(pki.inter)],
        "public_key": b"\x04" + b"k" * 64,
        "user_data": b"hello",
        "nonce": b"n" * 32,
    }
    p.update(over)
    return p


SYN_NOW = int(dt.datetime(2026, 7, 1, tzinfo=dt.UTC).timestamp())


# --- the real vector ---


def test_vector_verifies_with_expected_values(doc: bytes, aws_root: bytes) -> None:
    ev = nitro.verify_nitro_document(doc, trust_anchors=[aws_root], now=PIN)
    assert ev.tee == "nitro"
    assert ev.fields["module_id"] == MODULE_ID
    assert ev.fields["timestamp"] == DOC_TS_MS
    assert ev.measurements["pcr0"].hex().startswith("5cb70295")
    assert ev.measurements["pcr1"].hex().startswith("0343b056")
    assert ev.measurements["pcr2"].hex().startswith("743ea12d")
    assert [f"pcr{i}" for i in range(16)] == list(ev.measurements)
    assert ev.report_data == bytes(64) and ev.fields["user_data"] == "00" * 64
    assert ev.fields["nonce"] is None and ev.fields["public_key"] is None
    assert ev.debug is False
    assert ev.tcb_status == nitro.TCB_STATUS
    assert [s.name for s in ev.steps] == ["parsed", "cert_chain_verified", "revocation", "quote_verified"]
    assert ev.steps[2].reason.startswith("revocation not checked")
    assert "aws.nitro-enclaves" in ev.steps[1].reason


def test_der_root_is_accepted(doc: bytes, aws_root: bytes) -> None:
    from cryptography import x509

    root_der = der(x509.load_pem_x509_certificate(aws_root))
    assert (
        nitro.verify_nitro_document(doc, trust_anchors=[root_der], now=PIN).fields["module_id"] == MODULE_ID
    )


def test_looks_like(doc: bytes) -> None:
    assert nitro.looks_like(doc)
    assert nitro.looks_like(b"\xd2" + doc)
    assert not nitro.looks_like(b"\x02\x00\x00\x00" + bytes(100))
    assert not nitro.looks_like(b"")


@pytest.mark.parametrize("hours", [4, 40 * 24])
def test_expired_leaf_is_named(doc: bytes, aws_root: bytes, hours: int) -> None:
    with pytest.raises(Expired, match=rf"{MODULE_ID}.*expired at 2025-12-25"):
        nitro.verify_nitro_document(doc, trust_anchors=[aws_root], now=PIN + hours * 3600)


def test_before_validity_is_rejected(doc: bytes, aws_root: bytes) -> None:
    with pytest.raises(Expired, match="not valid before"):
        nitro.verify_nitro_document(doc, trust_anchors=[aws_root], now=PIN - 86400)


def test_signature_bit_flip_is_rejected(doc: bytes, aws_root: bytes) -> None:
    prot, unprot, body, sig = cose_parts(doc)
    bad = cbor2.dumps([prot, unprot, body, sig[:10] + bytes([sig[10] ^ 1]) + sig[11:]])
    with pytest.raises(SignatureInvalid, match="ES384 signature does not verify"):
        nitro.verify_nitro_document(bad, trust_anchors=[aws_root], now=PIN)


@pytest.mark.parametrize("field", ["module_id", "pcrs", "user_data", "timestamp"])
def test_payload_change_is_rejected(doc: bytes, aws_root: bytes, field: str) -> None:
    prot, unprot, body, sig = cose_parts(doc)
    p = cbor2.loads(body)
    if field == "pcrs":
        p["pcrs"][0] = bytes(48)
    elif field == "timestamp":
        p["timestamp"] += 1
    elif field == "user_data":
        p["user_data"] = b"\x01" * 64
    else:
        p["module_id"] = "i-0000000000000000-enc0000000000000000"
    bad = cbor2.dumps([prot, unprot, cbor2.dumps(p), sig])
    with pytest.raises(SignatureInvalid):
        nitro.verify_nitro_document(bad, trust_anchors=[aws_root], now=PIN)


def test_body_bit_flip_is_rejected(doc: bytes, aws_root: bytes) -> None:
    i = doc.index(bytes.fromhex("5cb70295"))  # inside PCR0
    bad = doc[:i] + bytes([doc[i] ^ 0x01]) + doc[i + 1 :]
    with pytest.raises(SignatureInvalid):
        nitro.verify_nitro_document(bad, trust_anchors=[aws_root], now=PIN)


def test_certificate_bit_flip_is_rejected(doc: bytes, aws_root: bytes) -> None:
    prot, unprot, body, sig = cose_parts(doc)
    p = cbor2.loads(body)
    cert = bytearray(p["certificate"])
    cert[-10] ^= 0x01  # inside the intermediate's signature over the leaf
    p["certificate"] = bytes(cert)
    bad = cbor2.dumps([prot, unprot, cbor2.dumps(p), sig])
    with pytest.raises(CertificateChainInvalid, match=rf"{MODULE_ID}.*does not verify"):
        nitro.verify_nitro_document(bad, trust_anchors=[aws_root], now=PIN)


def test_cabundle_missing_intermediate_is_rejected(doc: bytes, aws_root: bytes) -> None:
    prot, unprot, body, sig = cose_parts(doc)
    p = cbor2.loads(body)
    p["cabundle"] = p["cabundle"][:2]
    bad = cbor2.dumps([prot, unprot, cbor2.dumps(p), sig])
    with pytest.raises(VerificationError):
        nitro.verify_nitro_document(bad, trust_anchors=[aws_root], now=PIN)


def test_chain_to_another_root_is_untrusted_and_named(doc: bytes, pki: TestPki) -> None:
    with pytest.raises(UntrustedRoot, match=r"aws\.nitro-enclaves"):
        nitro.verify_nitro_document(doc, trust_anchors=[pem(pki.root)], now=PIN)


def test_synthetic_document_under_own_root_is_untrusted_for_aws_root(pki: TestPki, aws_root: bytes) -> None:
    d = sign_document(pki, payload(pki))
    with pytest.raises(UntrustedRoot, match="Nitro Test Root"):
        nitro.verify_nitro_document(d, trust_anchors=[aws_root], now=SYN_NOW)


@pytest.mark.parametrize("tagged", [False, True])
def test_synthetic_document_verifies_under_its_root(pki: TestPki, tagged: bool) -> None:
    d = sign_document(pki, payload(pki), tagged=tagged)
    ev = nitro.verify_nitro_document(d, trust_anchors=[der(pki.root)], now=SYN_NOW)
    assert ev.debug is False
    assert ev.report_data == b"hello"
    assert ev.fields["nonce"] == (b"n" * 32).hex()
    assert ev.fields["public_key"] == (b"\x04" + b"k" * 64).hex()


def test_expected_nonce(pki: TestPki, doc: bytes, aws_root: bytes) -> None:
    d = sign_document(pki, payload(pki))
    ev = nitro.verify_nitro_document(d, trust_anchors=[der(pki.root)], now=SYN_NOW, expected_nonce=b"n" * 32)
    assert ev.steps[-1].name == "nonce" and ev.steps[-1].ok
    with pytest.raises(PolicyViolation, match="nonce mismatch") as exc:
        nitro.verify_nitro_document(d, trust_anchors=[der(pki.root)], now=SYN_NOW, expected_nonce=b"m" * 32)
    assert exc.value.step == "nonce"
    # the real document carries no nonce at all: any expected nonce fails
    with pytest.raises(PolicyViolation, match="carries nonce none"):
        nitro.verify_nitro_document(doc, trust_anchors=[aws_root], now=PIN, expected_nonce=b"n" * 32)


def test_all_zero_pcrs_are_a_debug_enclave(pki: TestPki) -> None:
    pcrs = {i: bytes(48) for i in range(16)}
    ev = nitro.verify_nitro_document(
        sign_document(pki, payload(pki, pcrs)), trust_anchors=[der(pki.root)], now=SYN_NOW
    )
    assert ev.debug is True
    # only PCR0..2 decide: a zero PCR0 alone is not debug
    pcrs = {i: (bytes(48) if i == 0 else b"\x01" * 48) for i in range(16)}
    ev = nitro.verify_nitro_document(
        sign_document(pki, payload(pki, pcrs)), trust_anchors=[der(pki.root)], now=SYN_NOW
    )
    assert ev.debug is False


def test_wrong_algorithm_is_rejected(pki: TestPki) -> None:
    _prot, unprot, body, sig = cose_parts(sign_document(pki, payload(pki)))
    bad = cbor2.dumps([cbor2.dumps({1: -7}), unprot, body, sig])  # ES256
    with pytest.raises(MalformedEvidence, match="ES384"):
        nitro.verify_nitro_document(bad, trust_anchors=[der(pki.root)], now=SYN_NOW)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"digest": "SHA256"}, "digest"),
        ({"module_id": ""}, "module_id"),
        ({"timestamp": -1}, "timestamp"),
        ({"pcrs": {0: b"\x00" * 32}}, "PCR0"),
        ({"pcrs": {}}, "pcrs"),
        ({"pcrs": {99: b"\x00" * 48}}, "PCR index"),
        ({"cabundle": []}, "cabundle"),
        ({"certificate": "text"}, "certificate"),
        ({"user_data": b"u" * 2000}, "user_data"),
        ({"nonce": 5}, "nonce"),
    ],
)
def test_malformed_payload_fields(pki: TestPki, override: dict[str, Any], needle: str) -> None:
    d = sign_document(pki, payload(pki, **override))
    with pytest.raises(MalformedEvidence, match=needle):
        nitro.verify_nitro_document(d, trust_anchors=[der(pki.root)], now=SYN_NOW)


def test_cose_shape_errors(doc: bytes, aws_root: bytes) -> None:
    for bad, needle in [
        (cbor2.dumps([1, 2, 3]), "4 items"),
        (cbor2.dumps(cbor2.CBORTag(98, cose_parts(doc))), "tag 98"),
        (cbor2.dumps({"a": 1}), "4 items"),
        (doc[:100], "not valid CBOR"),
        (doc + b"\x00" * (nitro.MAX_DOCUMENT_SIZE), "limit"),
        (b"", "not valid CBOR"),
    ]:
        with pytest.raises(MalformedEvidence, match=needle):
            nitro.verify_nitro_document(bad, trust_anchors=[aws_root], now=PIN)


def test_no_anchor_is_a_usage_error(doc: bytes) -> None:
    with pytest.raises(UsageError):
        nitro.verify_nitro_document(doc, trust_anchors=[], now=PIN)


# --- mutation properties ------------------------------------------------------------------------------------

_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(data=st.data())
def test_mutated_documents_never_raise_anything_else(
    doc: bytes, aws_root: bytes, data: st.DataObject
) -> None:
    blob = bytearray(doc)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(blob))))
    mutated = bytes(blob if cut is None else blob[:cut])
    try:
        nitro.parse_nitro_document(mutated)
    except VerificationError:
        pass
    try:
        nitro.verify_nitro_document(mutated, trust_anchors=[aws_root], now=PIN)
    except VerificationError:
        return
    assert mutated == doc


@_SETTINGS
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.binary(max_size=64) | st.text(max_size=16),
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.dictionaries(st.integers() | st.text(max_size=8), inner, max_size=5)
        ),
        max_leaves=20,
    )
)
def test_arbitrary_cbor_never_raises_anything_else(aws_root: bytes, value: Any) -> None:
    with pytest.raises(VerificationError):
        nitro.verify_nitro_document(cbor2.dumps(value), trust_anchors=[aws_root], now=PIN)
