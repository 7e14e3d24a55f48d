"""The KMS signature chain over the gateway's certificate keys (teecloud.gateway.certkeys, "Signature chain"):
a valid chain verifies under the KMS root; a substituted key, another app's chain, another KMS, a tampered
signature, another certificate of the same key and another domain are refused with the step that failed.
The signatures are also checked with `cryptography` (an independent ECDSA implementation) and the statement
recomputed here from its definition."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from eth_utils.crypto import keccak

from teecloud.gateway.certkeys import (
    CertKeyPublisher,
    CertKeyRefused,
    check_cert_key_signature,
    parse_document,
)
from teecloud.gateway.devca import DevCa
from teecloud.gateway.errors import GatewayUsageError
from teecloud.gateway.kmskeys import CertKeySigner, GatewayKeys
from teecloud.keys.appkeys import AppKeys, RootKeys, derive_app_keys
from teecloud.tee.simulated import SimulatedTdx

BASE = "teecloud.localhost"
GATEWAY_APP = bytes.fromhex("9a" * 20)
OTHER_APP = bytes.fromhex("5b" * 20)


def _root(seed: int) -> RootKeys:
    return RootKeys(ec.derive_private_key(seed, ec.SECP256R1()), hashlib.sha256(str(seed).encode()).digest())


ROOT = _root(0xC0FFEE)
OTHER_ROOT = _root(0xBADC0DE)


def _app_keys(root: RootKeys, app_id: bytes) -> AppKeys:
    return derive_app_keys(root, app_id, b"\x01" * 20, now=int(time.time()))


@pytest.fixture
def tee(teecloud_home: Path) -> SimulatedTdx:
    return SimulatedTdx(teecloud_home)


def _cert(key: ec.EllipticCurvePrivateKey | None = None, *, now: int | None = None) -> tuple[str, bytes]:
    ca = DevCa(now=int(time.time()))
    issued = ca.issue_wildcard(BASE, now=now or int(time.time()), key=key)
    der = x509.load_pem_x509_certificate(issued.cert_pem.encode()).public_bytes(serialization.Encoding.DER)
    return issued.cert_pem, der


def _published(tee: SimulatedTdx, signer: CertKeySigner, pem: str, domain: str = BASE) -> bytes:
    pub = CertKeyPublisher(tee, signer=signer, domain=domain)
    pub.publish("public", pem, (f"*.{BASE}", BASE))
    return pub.document()


def _check(der: bytes, doc: bytes, **kw: object) -> object:
    args: dict[str, object] = {"kms_root_public_key": ROOT.k256_public_key, "expected_app_id": GATEWAY_APP}
    return check_cert_key_signature(der, doc, **(args | kw))  # type: ignore[arg-type]


def _refused(der: bytes, doc: bytes, **kw: object) -> CertKeyRefused:
    with pytest.raises(CertKeyRefused) as err:
        _check(der, doc, **kw)
    return err.value


def _k256_verify(public_key: bytes, digest: bytes, signature: bytes) -> None:
    """Independent check: `cryptography`'s ECDSA over secp256k1 (r, s of the recoverable signature)."""
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), public_key)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"))
    key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_a_valid_chain_verifies_and_an_independent_verifier_agrees(tee: SimulatedTdx) -> None:
    keys = _app_keys(ROOT, GATEWAY_APP)
    signer = CertKeySigner.from_app_keys(keys, GATEWAY_APP)
    pem, der = _cert()
    doc = _published(tee, signer, pem)
    verdict = _check(der, doc, expected_domain=BASE)
    assert verdict.app_id == GATEWAY_APP.hex()  # type: ignore[attr-defined]
    assert verdict.app_public_key == keys.k256_public_key.hex()  # type: ignore[attr-defined]
    # every signature, recomputed from the definitions and checked by `cryptography`
    sig = json.loads(doc)["keys"][0]["kms_signature"]
    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    statement = {
        "domain": BASE,
        "not_after": int(cert.not_valid_after_utc.timestamp()),
        "purpose": "teecloud:gateway-cert-key-signature",
        "spki_sha256": hashlib.sha256(spki).hexdigest(),
    }  # JCS of this object: sorted keys, no spaces (all ASCII, one integer)
    digest = hashlib.sha256(json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()).digest()
    signing_key = bytes.fromhex(sig["signing_key"])
    _k256_verify(signing_key, digest, bytes.fromhex(sig["signature"]))
    chain = [bytes.fromhex(s) for s in sig["signature_chain"]]
    _k256_verify(
        keys.k256_public_key,
        keccak(f"teecloud:gateway-cert-key-signing:{signing_key.hex()}".encode()),
        chain[0],
    )
    _k256_verify(
        ROOT.k256_public_key, keccak(b"dstack-kms-issued:" + GATEWAY_APP + keys.k256_public_key), chain[1]
    )
    # the signer is the gateway keys' (GatewayKeys.from_app_keys with the app id), and never pickled
    gk = GatewayKeys.from_app_keys(keys, app_id=GATEWAY_APP)
    assert gk.signer is not None and gk.signer.public_key == signing_key
    assert GatewayKeys.from_app_keys(keys).signer is None
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(signer)


def test_a_substituted_key_is_refused(tee: SimulatedTdx) -> None:
    signer = CertKeySigner.from_app_keys(_app_keys(ROOT, GATEWAY_APP), GATEWAY_APP)
    pem, der = _cert()
    doc = _published(tee, signer, pem)
    _check(der, doc)  # the gateway's own key verifies
    # the attacker presents its own certificate: no entry
    _own_pem, own_der = _cert()
    assert _refused(own_der, doc).step == "published"
    # ... and relabels the gateway's entry with its own key's hash: the signature no longer covers it
    own_spki = parse_document(_published(tee, signer, _own_pem))[0].spki_sha256.hex()
    relabelled = json.loads(doc)
    relabelled["keys"][0]["spki_sha256"] = own_spki
    assert _refused(own_der, json.dumps(relabelled).encode()).step == "signature"
    # the same key in another certificate (another not_after) is not what was signed
    key = ec.generate_private_key(ec.SECP256R1())
    first_pem, _ = _cert(key)
    _, later_der = _cert(key, now=int(time.time()) + 86400)
    assert _refused(later_der, _published(tee, signer, first_pem)).step == "signature"


def test_another_apps_chain_is_refused(tee: SimulatedTdx) -> None:
    pem, der = _cert()
    # app B (same KMS) vouches for the key: a valid chain, but B's
    other = CertKeySigner.from_app_keys(_app_keys(ROOT, OTHER_APP), OTHER_APP)
    doc = _published(tee, other, pem)
    err = _refused(der, doc)
    assert err.step == "app" and OTHER_APP.hex() in err.reason
    assert _check(der, doc, expected_app_id=None).app_id == OTHER_APP.hex()  # type: ignore[attr-defined]
    # ... and claims to be the gateway app: the KMS signed B's app key for B, not for the gateway app
    claimed = json.loads(doc)
    claimed["keys"][0]["kms_signature"]["app_id"] = GATEWAY_APP.hex()
    assert _refused(der, json.dumps(claimed).encode()).step == "chain"
    # a chain under another KMS (its own root) for the gateway's app id
    foreign = CertKeySigner.from_app_keys(_app_keys(OTHER_ROOT, GATEWAY_APP), GATEWAY_APP)
    err = _refused(der, _published(tee, foreign, pem))
    assert err.step == "chain" and "expected KMS root" in err.reason
    # the KMS signature of another app grafted onto the gateway app's key
    mine = _app_keys(ROOT, GATEWAY_APP)
    grafted = AppKeys(**(mine.__dict__ | {"k256_signature": _app_keys(ROOT, OTHER_APP).k256_signature}))
    assert (
        _refused(der, _published(tee, CertKeySigner.from_app_keys(grafted, GATEWAY_APP), pem)).step == "chain"
    )


def test_tampered_signatures_and_domain_are_refused(tee: SimulatedTdx) -> None:
    signer = CertKeySigner.from_app_keys(_app_keys(ROOT, GATEWAY_APP), GATEWAY_APP)
    pem, der = _cert()
    doc = json.loads(_published(tee, signer, pem))
    assert _refused(der, json.dumps(doc).encode(), expected_domain="evil.example").step == "domain"

    def mutated(field: str, index: int | None = None, *, at: int = 0) -> bytes:
        d = json.loads(json.dumps(doc))
        sig = d["keys"][0]["kms_signature"]
        raw = bytearray.fromhex(sig[field] if index is None else sig[field][index])
        raw[at] ^= 0x01
        if index is None:
            sig[field] = raw.hex()
        else:
            sig[field][index] = raw.hex()
        return json.dumps(d).encode()

    assert _refused(der, mutated("signature")).step == "signature"
    assert _refused(der, mutated("signing_key", at=5)).step == "signature"
    assert _refused(der, mutated("signature_chain", 0)).step == "chain"
    assert _refused(der, mutated("signature_chain", 1)).step == "chain"
    # generated mutations: every byte position of every signed value, a bit flipped, never verifies
    rng = random.Random(18)
    for field, index, size in [
        ("signature", None, 65),
        ("signing_key", None, 33),
        ("app_id", None, 20),
        ("signature_chain", 0, 65),
        ("signature_chain", 1, 65),
    ]:
        for at in rng.sample(range(size), 12):
            err = _refused(der, mutated(field, index, at=at), expected_app_id=None)
            assert err.step in ("signature", "chain", "published"), (field, at, err)
    # the domain itself is signed: renaming it fails the signature
    renamed = json.loads(json.dumps(doc))
    renamed["keys"][0]["kms_signature"]["domain"] = "evil.example"
    assert _refused(der, json.dumps(renamed).encode()).step == "signature"


@pytest.mark.parametrize(
    "change",
    [
        {"extra": 1},
        {"signature_chain": ["00" * 65]},
        {"signature_chain": "00"},
        {"signature": "zz"},
        {"app_id": "00" * 21},
        {"domain": ""},
        {"domain": 5},
    ],
)
def test_malformed_signature_fields_are_refused(tee: SimulatedTdx, change: dict[str, object]) -> None:
    signer = CertKeySigner.from_app_keys(_app_keys(ROOT, GATEWAY_APP), GATEWAY_APP)
    pem, der = _cert()
    doc = json.loads(_published(tee, signer, pem))
    doc["keys"][0]["kms_signature"].update(change)
    assert _refused(der, json.dumps(doc).encode()).step == "published"


def test_an_entry_without_a_chain_is_refused_and_the_publisher_needs_a_domain(tee: SimulatedTdx) -> None:
    pem, der = _cert()
    plain = CertKeyPublisher(tee)
    plain.publish("public", pem)
    err = _refused(der, plain.document())
    assert err.step == "published" and "no KMS signature chain" in err.reason
    signer = CertKeySigner.from_app_keys(_app_keys(ROOT, GATEWAY_APP), GATEWAY_APP)
    with pytest.raises(GatewayUsageError):
        CertKeyPublisher(tee, signer=signer)
