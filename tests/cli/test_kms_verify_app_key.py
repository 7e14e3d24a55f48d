"""`teecloud kms verify-app-key` through the Typer app (issue 19): an app's GetKey signature chain and its
app CA (an RA-TLS chain: leaf, app CA) checked under the threshold group that KmsGroup records on a real
embedded chain. The material is made by the group's real threshold signatures (keys.threshold_ecdsa,
2-of-3 over secp256k1 and P-256; each combined signature checked by libsecp256k1 / OpenSSL as it is made).
Exit codes as `teecloud verify`: 0 valid, 1 rejected, 2 usage error or unreadable input or chain."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from teecloud.chain import ChainClient
from teecloud.chain.kmsgroup import CommitteeMember
from teecloud.cli import app
from teecloud.keys import threshold_certs as tc
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys._groups import P256
from teecloud.keys.certs import cert_to_pem
from teecloud.keys.sigchain import (
    build_key_signature_chain,
    derive_get_key,
    k256_public_key,
    kms_issued_digest,
)
from teecloud.kms.threshold_client import group_ca_record

pytestmark = pytest.mark.slow  # threshold P-256 presignatures and an embedded chain opened per command

runner = CliRunner()
APP_ID = bytes.fromhex("7a1f00c0ffee00000000000000000000000000aa")
PURPOSE = "signing"


def _sign(keys: list[te.KeyShare], digest: bytes) -> bytes:
    """The group's signature over `digest` by signers 1 and 2 (one fresh presignature)."""
    presigs = te.presign_local(keys, [k.index for k in keys])
    return te.sign_local(presigs, [1, 2], digest)


@dataclass
class Material:
    signing: list[te.KeyShare]
    ca: list[te.KeyShare]
    root: x509.Certificate
    get_key: dict[str, object]
    app_ca: x509.Certificate
    leaf: x509.Certificate
    app_ca_key: ec.EllipticCurvePrivateKey


def _leaf(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, days: int = 30) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    own = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hello.app")]))
        .issuer_name(issuer.subject)
        .public_key(own.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5) + min(dt.timedelta(days=days - 1), dt.timedelta()))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )


def _material(signing: list[te.KeyShare], ca: list[te.KeyShare], *, app_id: bytes = APP_ID) -> Material:
    # the GetKey chain: the app's k256 key signed by the group (the KMS signature), a derived key under it
    app_secret = os.urandom(32)
    kms_sig = _sign(signing, kms_issued_digest(app_id, k256_public_key(app_secret)))
    derived = derive_get_key(app_secret, "wallet/0")
    sigs = build_key_signature_chain(app_secret, kms_sig, PURPOSE, derived.public_key)
    get_key = {"key": derived.secret.hex(), "signature_chain": [s.hex() for s in sigs]}
    # the group's root CA and the app's CA under it, each signed by the group's P-256 key
    root_tbs = tc.root_ca_to_sign(ca[0].group_public_key, not_before=int(time.time()) - 300)
    root = tc.assemble_certificate(
        root_tbs, _sign(ca, root_tbs.digest), tc.group_ca_public_key(ca[0].group_public_key)
    )
    app_ca_key = ec.generate_private_key(ec.SECP256R1())
    app_tbs = tc.app_ca_to_sign(root, app_id, app_ca_key.public_key())
    app_ca = tc.assemble_certificate(app_tbs, _sign(ca, app_tbs.digest), root.public_key())  # type: ignore[arg-type]
    return Material(signing, ca, root, get_key, app_ca, _leaf(app_ca, app_ca_key), app_ca_key)


@pytest.fixture(scope="module")
def material() -> Material:
    return _material(te.dkg_local(2, 3), te.dkg_local(2, 3, group=P256))


@pytest.fixture
def recorded(teecloud_home: Path, material: Material) -> Iterator[Path]:
    """The embedded chain of this home (what the CLI opens by default) with epoch 1's committee, signing
    key and group CA recorded in KmsGroup."""
    members = [
        CommitteeMember(i, bytes([i]) * 32, bytes(32), f"https://127.0.0.1:{9000 + i}") for i in (1, 2)
    ]
    with ChainClient.embedded(teecloud_home) as c:  # one process holds the embedded chain at a time
        c.deploy()
        g = c.kms_group
        g.activate(g.record_committee(1, 2, [bytes([7]) * 32, bytes([8]) * 32], members))
        g.record_signing_key(1, material.signing[0].group_public_key)
        g.record_ca(1, *group_ca_record(cert_to_pem(material.root)))
    yield teecloud_home


def _files(tmp: Path, m: Material, **changes: object) -> dict[str, Path]:
    get_key = dict(m.get_key, **changes)
    (tmp / "getkey.json").write_text(json.dumps(get_key))
    (tmp / "chain.pem").write_text(cert_to_pem(m.leaf) + cert_to_pem(m.app_ca))
    (tmp / "root.pem").write_text(cert_to_pem(m.root))
    return {"get_key": tmp / "getkey.json", "chain": tmp / "chain.pem", "root": tmp / "root.pem"}


def run(*args: object) -> tuple[int, str]:
    r = runner.invoke(app, ["kms", "verify-app-key", *(str(a) for a in args)])
    assert "Traceback" not in r.output, r.output
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def _all(f: dict[str, Path], app_id: bytes = APP_ID) -> list[object]:
    return [
        "--app-id",
        app_id.hex(),
        "--get-key",
        f["get_key"],
        "--purpose",
        PURPOSE,
        "--app-ca",
        f["chain"],
        "--root-cert",
        f["root"],
    ]


def test_the_apps_key_material_verifies_under_the_recorded_group(
    recorded: Path, material: Material, tmp_path: Path
) -> None:
    f = _files(tmp_path, material)
    code, out = run(*_all(f))
    assert code == 0, out
    assert "VALID" in out and "get_key_signature_chain" in out and "app_ca" in out
    code, out = run(*_all(f), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["is_valid"] is True, out
    assert doc["signing_key"] == material.signing[0].group_public_key.hex()
    assert [c["name"] for c in doc["checks"]] == ["get_key_signature_chain", "app_ca"]
    # OpenSSL as referee: the same leaf and app CA chain to the same root
    (tmp_path / "leaf.pem").write_text(cert_to_pem(material.leaf))
    (tmp_path / "app-ca.pem").write_text(cert_to_pem(material.app_ca))
    referee = subprocess.run(
        ["openssl", "verify", "-CAfile", f["root"], "-untrusted", "app-ca.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert referee.returncode == 0, referee.stdout + referee.stderr
    # each alone; the public key instead of the private one
    pub = k256_public_key(bytes.fromhex(str(material.get_key["key"])))
    (tmp_path / "pub.json").write_text(
        json.dumps({"public_key": pub.hex(), "signature_chain": material.get_key["signature_chain"]})
    )
    assert run("--app-id", APP_ID.hex(), "--get-key", tmp_path / "pub.json", "--purpose", PURPOSE)[0] == 0
    assert run("--app-id", APP_ID.hex(), "--app-ca", f["chain"], "--root-cert", f["root"])[0] == 0
    # an ed25519 GetKey key under the same app key (dstack's second algorithm)
    app_secret = os.urandom(32)
    kms_sig = _sign(material.signing, kms_issued_digest(APP_ID, k256_public_key(app_secret)))
    ed = derive_get_key(app_secret, "ssh/host", "ed25519")
    ed_chain = build_key_signature_chain(app_secret, kms_sig, PURPOSE, ed.public_key)
    (tmp_path / "ed.json").write_text(
        json.dumps({"key": ed.secret.hex(), "signature_chain": [c.hex() for c in ed_chain]})
    )
    ed_args = ["--app-id", APP_ID.hex(), "--get-key", tmp_path / "ed.json", "--purpose", PURPOSE]
    assert run(*ed_args, "--algorithm", "ed25519")[0] == 0
    assert run(*ed_args)[0] == 1  # read as a secp256k1 key it is another public key: rejected
    # the app CA alone (no leaf) is a chain too
    (tmp_path / "ca-only.pem").write_text(cert_to_pem(material.app_ca))
    assert (
        run("--app-id", APP_ID.hex(), "--app-ca", tmp_path / "ca-only.pem", "--root-cert", f["root"])[0] == 0
    )
    # read at a finality depth: one block below the head the CA record is not there yet
    code, out = run(*_all(f), "--finality-depth", "1", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ca_key"] is None, out
    assert "KmsGroup records no group CA for epoch 1" in doc["checks"][1]["reason"]


def test_key_material_of_another_group_or_app_is_rejected(
    recorded: Path, material: Material, tmp_path: Path
) -> None:
    """The attacker's material: a whole other group (its own signing key, CA key and root, all valid in
    themselves), another app's, a chain bent in each place. Exit 1 with the failing step named."""
    other = _material(te.dkg_local(2, 3), te.dkg_local(2, 3, group=P256))
    f = _files(tmp_path, other)
    code, out = run(*_all(f), "--json")
    doc = json.loads(out)
    assert code == 1 and doc["is_valid"] is False
    reasons = {c["name"]: c["reason"] for c in doc["checks"]}
    assert "not issued by the expected KMS root" in reasons["get_key_signature_chain"]
    assert "is not the recorded one" in reasons["app_ca"]
    # the other group's leaf and app CA under the recorded root: the app CA is not signed by the group
    (tmp_path / "root-good.pem").write_text(cert_to_pem(material.root))
    code, out = run(
        "--app-id", APP_ID.hex(), "--app-ca", f["chain"], "--root-cert", tmp_path / "root-good.pem"
    )
    assert code == 1 and "the app CA is not the group's" in out, out
    # the right group, another app id: both checks fail
    good = _files(tmp_path, material)
    code, out = run(*_all(good, app_id=bytes(20)), "--json")
    doc = json.loads(out)
    assert code == 1 and all(not c["ok"] for c in doc["checks"]), out
    # another purpose than the one signed
    code, out = run("--app-id", APP_ID.hex(), "--get-key", good["get_key"], "--purpose", "other")
    assert code == 1 and "REJECTED" in out
    # generated: every signature of the chain with one byte flipped (each position of each signature)
    sigs = [bytes.fromhex(str(s)) for s in material.get_key["signature_chain"]]  # type: ignore[attr-defined]
    for n in range(2):
        for pos in range(0, 65, 8):
            bent = list(sigs)
            bent[n] = bent[n][:pos] + bytes([bent[n][pos] ^ 0x01]) + bent[n][pos + 1 :]
            (tmp_path / "bent.json").write_text(
                json.dumps({"key": material.get_key["key"], "signature_chain": [s.hex() for s in bent]})
            )
            code, out = run(
                "--app-id", APP_ID.hex(), "--get-key", tmp_path / "bent.json", "--purpose", PURPOSE
            )
            assert code == 1 and "REJECTED" in out, (n, pos, out)
    # a self-signed app CA (what a group without a CA hands out) and a leaf under another key
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _leaf(material.app_ca, rogue_key)  # claims the app CA as issuer, signed by another key
    (tmp_path / "rogue.pem").write_text(cert_to_pem(rogue) + cert_to_pem(material.app_ca))
    code, out = run("--app-id", APP_ID.hex(), "--app-ca", tmp_path / "rogue.pem", "--root-cert", good["root"])
    assert code == 1 and "certificate 0's signature does not verify under the next one" in out, out
    # an expired leaf
    expired = _leaf(material.app_ca, material.app_ca_key, days=-1)
    (tmp_path / "old.pem").write_text(cert_to_pem(expired) + cert_to_pem(material.app_ca))
    code, out = run("--app-id", APP_ID.hex(), "--app-ca", tmp_path / "old.pem", "--root-cert", good["root"])
    assert code == 1 and "certificate 0 is not valid at" in out, out
    # an epoch the chain names no committee for
    code, out = run(*_all(good), "--epoch", "2")
    assert code == 1 and "no committee serving epoch 2" in out, out


def test_no_signing_key_recorded_is_a_rejection(
    teecloud_home: Path, material: Material, tmp_path: Path
) -> None:
    with ChainClient.embedded(teecloud_home) as c:
        c.deploy()
        g = c.kms_group
        one = [CommitteeMember(1, bytes([1]) * 32, bytes(32), "https://127.0.0.1:9001")]
        g.activate(g.record_committee(1, 1, [bytes([7]) * 32], one))
    f = _files(tmp_path, material)
    code, out = run("--app-id", APP_ID.hex(), "--get-key", f["get_key"], "--purpose", PURPOSE)
    assert code == 1 and "KmsGroup records no signing key for epoch 1" in out, out


def test_bad_input_is_a_usage_error_without_a_traceback(
    recorded: Path, material: Material, tmp_path: Path
) -> None:
    f = _files(tmp_path, material)
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "extra.json").write_text(json.dumps(dict(material.get_key, admin=True)))
    (tmp_path / "short.json").write_text(json.dumps({"key": "00" * 32, "signature_chain": ["00" * 65]}))
    (tmp_path / "nohex.json").write_text(json.dumps({"key": "zz", "signature_chain": ["00" * 65] * 2}))
    (tmp_path / "nokey.json").write_text(json.dumps({"signature_chain": material.get_key["signature_chain"]}))
    (tmp_path / "zero.json").write_text(json.dumps(dict(material.get_key, key="00" * 32)))
    pub = k256_public_key(os.urandom(32)).hex()
    (tmp_path / "both.json").write_text(json.dumps(dict(material.get_key, public_key=pub)))
    (tmp_path / "big.json").write_text(" " * (64 * 1024 + 1))
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    (tmp_path / "two-roots.pem").write_text(cert_to_pem(material.root) * 2)
    app_id = APP_ID.hex()
    cases: list[tuple[list[object], str]] = [
        (["--app-id", app_id], "give --get-key FILE and/or --app-ca FILE"),
        (["--app-id", "xyz", "--get-key", f["get_key"]], "--app-id is not hex"),
        (["--app-id", "", "--get-key", f["get_key"]], "--app-id is 0 bytes, not 1..64"),
        (["--app-id", app_id, "--get-key", tmp_path / "missing.json"], "cannot read --get-key"),
        (["--app-id", app_id, "--get-key", tmp_path / "junk.json"], "not JSON"),
        (["--app-id", app_id, "--get-key", tmp_path / "list.json"], "not a JSON object"),
        (["--app-id", app_id, "--get-key", tmp_path / "extra.json"], "unknown fields ['admin']"),
        (["--app-id", app_id, "--get-key", tmp_path / "short.json"], "a list of 2 hex signatures"),
        (["--app-id", app_id, "--get-key", tmp_path / "nohex.json"], "key is not hex"),
        (["--app-id", app_id, "--get-key", tmp_path / "nokey.json"], "needs key or public_key"),
        (["--app-id", app_id, "--get-key", tmp_path / "zero.json"], "key is not a secp256k1 private key"),
        (
            ["--app-id", app_id, "--get-key", tmp_path / "both.json"],
            "public_key is not the public key of key",
        ),
        (["--app-id", app_id, "--get-key", tmp_path / "big.json"], "larger than 65536 bytes"),
        (["--app-id", app_id, "--get-key", f["get_key"], "--algorithm", "rsa"], "secp256k1 or ed25519"),
        (["--app-id", app_id, "--app-ca", f["chain"]], "--app-ca and --root-cert go together"),
        (["--app-id", app_id, "--app-ca", tmp_path / "junk.pem", "--root-cert", f["root"]], "not PEM"),
        (["--app-id", app_id, "--app-ca", f["chain"], "--root-cert", tmp_path / "two-roots.pem"], "one cert"),
        (["--app-id", app_id, "--get-key", f["get_key"], "--rpc-url", "http://127.0.0.1:9"], "chain: "),
        (["--app-id", app_id, "--get-key", f["get_key"], "--rpc-url", "not a url"], "chain: "),
        (
            ["--app-id", app_id, "--get-key", f["get_key"], "--finality-depth", "1000"],
            "fewer than the finality",
        ),
    ]
    for args, why in cases:
        code, out = run(*args)
        assert code == 2 and why in out, (args, out)
        code, out = run(*args, "--json")
        assert code == 2 and json.loads(out.splitlines()[0])["is_valid"] is False, (args, out)
