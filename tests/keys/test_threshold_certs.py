"""teecloud.keys.threshold_certs: a root CA self-signed by t of n holders of a P-256 group key and an app
CA signed under it; [leaf, app CA, root CA] verifies with `cryptography` (verify_directly_issued_by, the
project's verify_cert_chain, and cryptography's RFC 5280 path builder) and with `openssl verify`."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from teecloud.keys import threshold_certs as tc
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.certs import cert_to_pem, issue_cert, verify_cert_chain
from teecloud.keys.errors import CertChainInvalid

APP_ID = bytes.fromhex("ab" * 20)
NOW = int(time.time())


@pytest.fixture(scope="module")
def group() -> list[te.KeyShare]:
    return te.dkg_local(3, 5, group=te.P256)


def _group_sign(keys: list[te.KeyShare], digest: bytes, signers: list[int]) -> bytes:
    return te.sign_local(te.presign_local(keys, [1, 2, 3, 4, 5]), signers, digest)


@pytest.fixture(scope="module")
def chain(group: list[te.KeyShare]) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    gpk = group[0].group_public_key
    root_tbs = tc.root_ca_to_sign(gpk, not_before=NOW - 60)
    root = tc.assemble_certificate(
        root_tbs, _group_sign(group, root_tbs.digest, [1, 2, 4]), tc.group_ca_public_key(gpk)
    )
    app_ca_key = ec.generate_private_key(ec.SECP256R1())  # derived in the CVM in the real flow
    app_tbs = tc.app_ca_to_sign(root, APP_ID, app_ca_key.public_key())
    app_ca = tc.assemble_certificate(
        app_tbs, _group_sign(group, app_tbs.digest, [3, 4, 5]), root.public_key()
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = issue_cert(
        leaf_key.public_key(),
        issuer_key=app_ca_key,
        issuer_name=app_ca.subject,
        subject_cn=APP_ID.hex(),
        not_before=NOW - 60,
        not_after=NOW + 3600,
        alt_names=[f"{APP_ID.hex()}.app.example"],
        server_auth=True,
        client_auth=True,
    )
    return leaf, app_ca, root


def test_any_t_nodes_sign_one_tbs_built_independently(group) -> None:
    gpk = group[0].group_public_key
    a, b = tc.root_ca_to_sign(gpk, not_before=NOW), tc.root_ca_to_sign(gpk, not_before=NOW)
    assert a.tbs == b.tbs  # every node builds the same bytes from the same facts
    assert tc.root_ca_to_sign(gpk, not_before=NOW + 1).digest != a.digest


def test_chain_verifies_with_cryptography(chain, group) -> None:
    leaf, app_ca, root = chain
    root.verify_directly_issued_by(root)
    app_ca.verify_directly_issued_by(root)
    leaf.verify_directly_issued_by(app_ca)
    assert root.public_key() == tc.group_ca_public_key(group[0].group_public_key)
    verify_cert_chain(
        [leaf, app_ca, root], trusted_public_key=tc.group_ca_public_key(group[0].group_public_key), now=NOW
    )
    # cryptography's RFC 5280 path validation (extensions, key usage, names) with the group root as anchor
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(dt.datetime.fromtimestamp(NOW, tz=dt.UTC))
        .build_server_verifier(x509.DNSName(f"{APP_ID.hex()}.app.example"))
    )
    built = verifier.verify(leaf, [app_ca])
    assert [c.subject for c in built] == [leaf.subject, app_ca.subject, root.subject]


def test_chain_verifies_with_openssl(chain, tmp_path: Path) -> None:
    leaf, app_ca, root = chain
    for name, cert in (("leaf", leaf), ("app-ca", app_ca), ("root", root)):
        (tmp_path / f"{name}.pem").write_text(cert_to_pem(cert))
    cmd = ["openssl", "verify", "-x509_strict", "-CAfile", "root.pem", "-untrusted", "app-ca.pem", "leaf.pem"]
    ok = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "leaf.pem: OK" in ok.stdout, ok.stderr
    # another root (an ordinary self-signed key) is not the anchor of this chain
    other = ec.generate_private_key(ec.SECP256R1())
    fake = issue_cert(
        other.public_key(),
        issuer_key=other,
        issuer_name=None,
        subject_cn=tc.GROUP_ROOT_CA_CN,
        not_before=NOW - 60,
        not_after=NOW + 3600,
        ca=True,
    )
    (tmp_path / "fake.pem").write_text(cert_to_pem(fake))
    bad = subprocess.run(
        [*cmd[:3], "fake.pem", *cmd[4:]], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0


def test_t_minus_1_signers_cannot_make_a_certificate(group) -> None:
    gpk = group[0].group_public_key
    tbs = tc.root_ca_to_sign(gpk, not_before=NOW)
    ps = te.presign_local(group, [1, 2, 3, 4, 5])
    shares = [te.sign_share(ps[i], tbs.digest) for i in (1, 2)]
    with pytest.raises(te.ThresholdSignatureError, match="2 valid signature shares, 3 needed"):
        te.combine_signature(ps[1], tbs.digest, shares)
    # an r‖s that is not the group's: the assembled certificate is refused, not returned
    with pytest.raises(CertChainInvalid, match="does not verify"):
        tc.assemble_certificate(tbs, bytes(31) + b"\x01" + bytes(31) + b"\x01", tc.group_ca_public_key(gpk))


def test_an_app_ca_for_another_key_or_app_has_another_digest(chain) -> None:
    _, _, root = chain
    k1, k2 = (ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(2))
    d = tc.app_ca_to_sign(root, APP_ID, k1)
    assert d.tbs == tc.app_ca_to_sign(root, APP_ID, k1).tbs
    assert d.digest != tc.app_ca_to_sign(root, APP_ID, k2).digest
    assert d.digest != tc.app_ca_to_sign(root, bytes(20), k1).digest
    with pytest.raises(Exception, match="P-256"):
        tc.app_ca_to_sign(root, APP_ID, ec.generate_private_key(ec.SECP384R1()).public_key())
