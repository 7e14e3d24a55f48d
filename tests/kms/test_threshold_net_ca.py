"""The group's P-256 CA key between running nodes (kms.threshold_net "ca-" rounds, kms.threshold_sign):
five running members make the key and presignatures over kms.peering's channel, t of them self-sign the
group root CA (each building the TBS itself), every member keeps only that exact root, and an app CA
certificate signed by t members verifies under it (cryptography and openssl). The R5-1 rule (exactly 2t-1
participants) and one digest per presignature hold on this curve too."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from teecloud.keys import threshold_certs as tc
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.certs import cert_to_pem, issue_cert, verify_cert_chain
from teecloud.kms.errors import AccessDenied
from teecloud.kms.threshold import local_joint_feldman
from teecloud.kms.threshold_net import AdminEndpoint, RoundFailed, run_presign_round, run_signing_key_dkg
from teecloud.kms.threshold_sign import (
    ThresholdSigner,
    open_ca_signer,
)
from tests.kms.conftest import World, stop_servers
from tests.kms.test_threshold_net_peering import Member, allow_build, start_member

T, N = 3, 5
APP_ID = bytes.fromhex("c0" * 20)


@pytest.fixture
def members(teecloud_home: Path, world: World) -> Iterator[dict[int, Member]]:
    allow_build(world.chain, teecloud_home)
    out: dict[int, Member] = {}
    try:
        for s in local_joint_feldman(T, N, epoch=1):
            out[s.index] = start_member(teecloud_home, world.chain, s, name="ca", app_ca=True)
        yield out
    finally:
        stop_servers(m.server for m in out.values())


def _admin(m: Member, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(
        m.server.admin_url + path,
        json=body,
        headers={"authorization": f"Bearer {m.server.admin_token}"},
        timeout=60,
    )


def _ca(m: Member) -> ThresholdSigner:
    signer = m.service.ca_signer
    assert signer is not None
    return signer


def _combine(answers: list[dict[str, object]], group_key: bytes, digest: bytes) -> bytes:
    first = answers[0]
    presig = te.Presignature(
        index=int(first["index"]),  # type: ignore[call-overload]
        t=T,
        session=bytes.fromhex(str(first["session"])),
        big_r=bytes.fromhex(str(first["big_r"])),
        group_public_key=group_key,
        kinv_share=None,
        sigma_share=0,
        kinv_commitments=tuple(bytes.fromhex(c) for c in first["kinv_commitments"]),  # type: ignore[attr-defined]
        sigma_commitments=tuple(bytes.fromhex(c) for c in first["sigma_commitments"]),  # type: ignore[attr-defined]
        curve="p256",
    )
    shares = [te.SignatureShare(int(a["index"]), int(str(a["s"]), 16)) for a in answers]  # type: ignore[call-overload]
    return te.combine_signature(presig, digest, shares)


@pytest.mark.slow
def test_group_root_ca_and_an_app_ca_between_running_nodes(
    members: dict[int, Member], tmp_path: Path
) -> None:
    eps = {
        i: AdminEndpoint(m.server.admin_url, m.server.admin_token, m.server.url) for i, m in members.items()
    }
    ca_key = run_signing_key_dkg(eps, kind="ca-sigkey")
    assert all(_ca(m).key.curve == "p256" and _ca(m).group_public_key == ca_key for m in members.values())
    assert all(m.service.threshold.signer is None for m in members.values())  # type: ignore[union-attr]
    with pytest.raises(RoundFailed, match="already holds a signing share"):
        run_signing_key_dkg(eps, kind="ca-sigkey")
    rs = run_presign_round(eps, 4, T, kind="ca-presign")
    assert len(set(rs)) == 4
    pool = sorted(_ca(members[1]).pool.unused())
    assert all(sorted(_ca(m).pool.unused()) == pool for m in members.values())

    # the root: t members' shares over the TBS each builds itself, combined by the operator
    not_before = int(time.time()) - 60
    answers = []
    for i in (1, 3, 4):
        r = _admin(members[i], "/tround/ca-root-share", {"session": pool[0].hex(), "not_before": not_before})
        assert r.status_code == 200, r.text
        answers.append(r.json())
    to_sign = tc.root_ca_to_sign(ca_key, not_before=not_before)
    root = tc.assemble_certificate(
        to_sign, _combine(answers, ca_key, to_sign.digest), tc.group_ca_public_key(ca_key)
    )
    # a presignature that signed the root signs nothing else (R4-4's rule on P-256)
    r = _admin(members[1], "/tround/ca-root-share", {"session": pool[0].hex(), "not_before": not_before + 1})
    assert r.status_code == 400 and "already signed another message" in r.text
    # every member keeps this root only: another key's root is refused
    stranger = ec.generate_private_key(ec.SECP256R1())
    fake_root = issue_cert(
        stranger.public_key(),
        issuer_key=stranger,
        issuer_name=None,
        subject_cn=tc.GROUP_ROOT_CA_CN,
        not_before=not_before,
        not_after=not_before + 3600,
        ca=True,
    )
    r = _admin(members[2], "/tround/ca-root", {"certificate": cert_to_pem(fake_root)})
    assert r.status_code == 400 and "refused" in r.text
    for m in members.values():
        r = _admin(m, "/tround/ca-root", {"certificate": cert_to_pem(root)})
        assert r.status_code == 200 and r.json()["ca_root"] is True, r.text
    # a second root (another validity, genuinely signed by three members) does not replace the first
    answers2 = [
        _admin(
            members[i], "/tround/ca-root-share", {"session": pool[3].hex(), "not_before": not_before + 1}
        ).json()
        for i in (2, 3, 5)
    ]
    second_tbs = tc.root_ca_to_sign(ca_key, not_before=not_before + 1)
    second = tc.assemble_certificate(
        second_tbs, _combine(answers2, ca_key, second_tbs.digest), tc.group_ca_public_key(ca_key)
    )
    r = _admin(members[1], "/tround/ca-root", {"certificate": cert_to_pem(second)})
    assert r.status_code == 400 and "already keeps another" in r.text
    r = _admin(members[1], "/tround/ca-root", {"certificate": cert_to_pem(root)})  # the same again: fine
    assert r.status_code == 200
    # the root is kept across a restart (re-checked against the sealed CA share when opened)
    m2 = members[2]
    reopened = open_ca_signer(m2.tee, m2.service.identity, m2.service.audit.path.parent.parent)
    assert reopened is not None and reopened.ca_root == root and reopened.pool.unused() == []

    # an app CA: every signer builds the same TBS from (root, app_id, key); three sign, under the root
    app_ca_key = ec.generate_private_key(ec.SECP256R1())
    pub33 = app_ca_key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    tbs = {i: _ca(members[i]).app_ca_to_sign(APP_ID, pub33) for i in (2, 4, 5)}
    assert len({t.tbs for t in tbs.values()}) == 1
    digest = tbs[2].digest
    shares = [_ca(members[i]).pool.sign(pool[1], digest) for i in (2, 4, 5)]
    sig = te.combine_signature(_ca(members[2]).pool.public(pool[1]), digest, shares)
    app_ca = tc.assemble_certificate(tbs[2], sig, root.public_key())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    leaf = issue_cert(
        leaf_key.public_key(),
        issuer_key=app_ca_key,
        issuer_name=app_ca.subject,
        subject_cn=APP_ID.hex(),
        not_before=now - 60,
        not_after=now + 3600,
        server_auth=True,
        client_auth=True,
    )
    verify_cert_chain([leaf, app_ca, root], trusted_public_key=tc.group_ca_public_key(ca_key), now=now)
    for name, cert in (("leaf", leaf), ("app-ca", app_ca), ("root", root)):
        (tmp_path / f"{name}.pem").write_text(cert_to_pem(cert))
    ok = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", "root.pem", "-untrusted", "app-ca.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    # presignature reuse across two digests is refused (another app's CA with the same presignature)
    other_tbs = _ca(members[2]).app_ca_to_sign(bytes(20), pub33)
    with pytest.raises(AccessDenied, match="already signed another message"):
        _ca(members[2]).pool.sign(pool[1], other_tbs.digest)
    # two members alone cannot make the certificate
    with pytest.raises(te.ThresholdSignatureError, match="2 valid signature shares, 3 needed"):
        te.combine_signature(
            _ca(members[1]).pool.public(pool[2]),
            digest,
            [_ca(members[i]).pool.sign(pool[2], digest) for i in (1, 3)],
        )


def test_ca_rounds_need_exactly_2t_minus_1_and_their_own_key(members: dict[int, Member]) -> None:
    peers = {str(i): members[i].server.url for i in members}
    body = {
        "session": secrets.token_hex(16),
        "kind": "ca-presign",
        "participants": [1, 2, 3, 4, 5],
        "peers": peers,
    }
    r = _admin(members[1], "/tround/open", body)
    assert r.status_code == 400 and "no P-256 CA key share" in r.json()["reason"]
    three = {k: v for k, v in peers.items() if k in "123"}
    r = _admin(
        members[1], "/tround/open", {**body, "kind": "ca-sigkey", "participants": [1, 2, 3], "peers": three}
    )
    assert r.status_code == 400 and "all n members" in r.json()["reason"]
    eps = {
        i: AdminEndpoint(m.server.admin_url, m.server.admin_token, m.server.url) for i, m in members.items()
    }
    run_signing_key_dkg(eps, kind="ca-sigkey")
    for wrong in ([1, 2, 3, 4], [1, 2, 3]):
        r = _admin(
            members[1],
            "/tround/open",
            {
                **body,
                "session": secrets.token_hex(16),
                "participants": wrong,
                "peers": {str(i): peers[str(i)] for i in wrong},
            },
        )
        assert r.status_code == 400 and "exactly 2t-1 = 5" in r.json()["reason"], r.text
    # the secp256k1 signing key is untouched by the CA key's rounds
    r = _admin(members[1], "/tround/open", {**body, "kind": "presign"})
    assert r.status_code == 400 and "no signing share" in r.json()["reason"]
    # no root yet: a node answers no app CA share
    with pytest.raises(AccessDenied, match="no group root CA"):
        _ca(members[1]).app_ca_to_sign(APP_ID, te.P256.generator)
