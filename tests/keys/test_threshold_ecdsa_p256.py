"""teecloud.keys.threshold_ecdsa over NIST P-256 (teecloud.keys._groups.P256, python-ecdsa arithmetic):
the same GJKR presign/sign rounds as secp256k1, refereed by OpenSSL (`cryptography`, and the `openssl` CLI)
as ordinary ECDSA-SHA256; any t sign, exactly 2t-1 participants (R5-1). That t-1 cannot sign, that a liar
is named in every round and that a one-member group is ordinary ECDSA is tested on both curves in one place,
tests/keys/test_threshold_ecdsa.py."""

from __future__ import annotations

import hashlib
import itertools
import random
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.errors import KeyUsageError

MESSAGE = b"teecloud threshold ecdsa over P-256"
DIGEST = hashlib.sha256(MESSAGE).digest()
N = te.P256.order


@pytest.fixture(scope="module")
def keys_3_of_5() -> list[te.KeyShare]:
    return te.dkg_local(3, 5, group=te.P256)


@pytest.fixture(scope="module")
def presigs(keys_3_of_5: list[te.KeyShare]) -> dict[int, te.Presignature]:
    return te.presign_local(keys_3_of_5, [1, 2, 3, 4, 5])


def _der(sig: bytes) -> bytes:
    assert len(sig) == 64
    return encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))


def _cryptography_verifies(group_pk: bytes, digest: bytes, sig: bytes) -> bool:
    pk = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), group_pk)
    try:
        pk.verify(_der(sig), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


def test_group_constants_are_p256() -> None:
    # FIPS 186-4 D.1.2.3: the order n and the generator's x coordinate
    assert N == 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    assert te.P256.generator[1:].hex() == "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    assert te.P256.generator == te.P256.base_mul(N + 1)


def test_every_t_subset_signs_and_openssl_accepts(keys_3_of_5, presigs) -> None:
    group_pk = keys_3_of_5[0].group_public_key
    assert keys_3_of_5[0].curve == "p256" and len(group_pk) == 33
    for signers in itertools.combinations(range(1, 6), 3):
        sig = te.sign_local(presigs, list(signers), DIGEST)
        assert _cryptography_verifies(group_pk, DIGEST, sig)
        assert not _cryptography_verifies(group_pk, hashlib.sha256(b"other").digest(), sig)
    # the same presignature gives the same (r, s) whichever t sign: s is a function of k, x and e
    assert len({te.sign_local(presigs, list(s), DIGEST) for s in itertools.combinations(range(1, 6), 3)}) == 1


def test_openssl_cli_verifies_a_group_signature(keys_3_of_5, tmp_path: Path) -> None:
    """The `openssl` command line as a second referee: dgst -sha256 -verify over the message itself."""
    ps = te.presign_local(keys_3_of_5, [1, 2, 3, 4, 5])
    sig = te.sign_local(ps, [2, 3, 5], DIGEST)
    pk = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), keys_3_of_5[0].group_public_key)
    (tmp_path / "pub.pem").write_bytes(
        pk.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "msg").write_bytes(MESSAGE)
    (tmp_path / "sig").write_bytes(_der(sig))
    (tmp_path / "other").write_bytes(MESSAGE + b"!")

    def verify(msg: str) -> subprocess.CompletedProcess[str]:
        cmd = ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig", msg]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=30)

    ok = verify("msg")
    assert ok.returncode == 0 and "Verified OK" in ok.stdout
    assert verify("other").returncode != 0


def test_exactly_2t_minus_1_participants_and_only_they_hold_it() -> None:
    """R5-1 on P-256: with more than 2t-1 participants two disjoint sets of t could sign two digests with
    one k; the rounds refuse any other size, and a holder outside the participants gets no presignature."""
    keys = te.dkg_local(3, 7, group=te.P256)
    ps = te.presign_local(keys, [1, 2, 3, 4, 5])
    assert sorted(ps) == [1, 2, 3, 4, 5]
    for wrong in ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4], list(range(1, 8))):
        with pytest.raises(KeyUsageError, match="exactly 2t-1 = 5"):
            te.presign_local(keys, wrong)
    assert _cryptography_verifies(keys[0].group_public_key, DIGEST, te.sign_local(ps, [3, 4, 5], DIGEST))


def test_one_k_for_two_digests_reveals_the_key(keys_3_of_5) -> None:
    """Why a presignature signs one digest (the pool's rule, tests/kms/test_threshold_sign_p256.py): two
    signatures under one R give x to anyone holding both."""
    ps = te.presign_local(keys_3_of_5, [1, 2, 3, 4, 5])
    d2 = hashlib.sha256(b"second").digest()
    s1 = int.from_bytes(te.sign_local(ps, [1, 2, 3], DIGEST)[32:], "big")
    s2 = int.from_bytes(te.sign_local(ps, [3, 4, 5], d2)[32:], "big")
    e1, e2 = int.from_bytes(DIGEST, "big") % N, int.from_bytes(d2, "big") % N
    r = int.from_bytes(ps[1].big_r[1:], "big") % N
    kinv = (s1 - s2) * pow(e1 - e2, -1, N) % N
    x = (s1 * pow(kinv, -1, N) - e1) * pow(r, -1, N) % N
    assert te.P256.base_mul(x) == keys_3_of_5[0].group_public_key


def test_points_are_validated_and_curves_do_not_mix(keys_3_of_5) -> None:
    g = te.P256
    rng = random.Random(3)
    for _ in range(20):  # generated encodings: most x have no point; every failure is the typed error
        junk = bytes([rng.choice([2, 3, 4, 0])]) + rng.randbytes(rng.choice([32, 31, 64]))
        try:
            assert g.check(junk) == junk and len(junk) == 33
        except te.ThresholdSignatureError:
            pass
    with pytest.raises(te.ThresholdSignatureError, match="33 bytes SEC1 compressed"):
        g.check(b"\x04" + bytes(64))
    with pytest.raises(te.ThresholdSignatureError, match="not a P-256 point"):
        g.check(b"\x02" + b"\xff" * 32)  # x >= p
    with pytest.raises(te.ThresholdSignatureError, match="infinity"):
        g.sum([g.generator, g.neg(g.generator)])
    k256 = te.dkg_local(3, 5)
    k = keys_3_of_5[0]
    with pytest.raises(te.ThresholdSignatureError, match="does not match"):
        te.KeyShare(k.index, k.t, k.n, k.share, k256[0].commitments, "p256")  # a secp256k1 key's commitments
    with pytest.raises(KeyUsageError, match="no threshold ECDSA group"):
        te.KeyShare(k.index, k.t, k.n, k.share, k.commitments, "ed25519")
    sess = bytes(16)
    state, _ = te.presign_multiply(
        sess,
        k256[0],
        [1, 2, 3, 4, 5],
        [te.presign_round1(sess, k256[i - 1], [1, 2, 3, 4, 5]) for i in range(1, 6)],
    )
    with pytest.raises(KeyUsageError, match="a p256 key share with a secp256k1"):
        te.presign_reduce(k, state, [])
