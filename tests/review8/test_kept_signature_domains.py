"""Review 8, kept signatures (branch t19-cache): a node keeps and serves, and the CVM accepts, a kept
app-key signature only when it is the group's signature over keccak256("dstack-kms-issued:" ‖ app_id ‖ key)
(`app_key_signature_problem`, used by both). The group's key signs other messages too, and some of them
anyone can obtain: GetAppEnvEncryptPubKey answers carry the group's signatures over
keccak256("dstack-env-encrypt-pubkey:" ‖ app_id ‖ pk) and the same with a timestamp, unauthenticated.
Attack: hand such a signature to ThresholdKeepSignatures (or serve it as kept) as the app-key signature of
a key the attacker chooses around that pk (02‖pk, 03‖pk, the digest's own bytes), for this app and for
another; generated: random apps, timestamps and keys. Held: every one refused; the genuine one passes."""

from __future__ import annotations

import random

import coincurve

from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.appkeys import env_encrypt_pubkey_digest
from teecloud.keys.sigchain import k256_public_key, kms_issued_digest
from teecloud.kms.threshold_env import legacy_digest
from teecloud.kms.threshold_sign import app_key_signature_problem

T, N = 3, 5


def _group_sign(keys: list[te.KeyShare], digest: bytes) -> bytes:
    return te.sign_local(te.presign_local(keys, list(range(1, N + 1))), [1, 2, 3], digest)


def _candidates(pk: bytes, digest: bytes, rng: random.Random) -> list[bytes]:
    """33-byte keys an attacker would pair with a signature it holds: the env pk with either prefix (when
    that is a point), the digest itself, and random points."""
    out = []
    for raw in (b"\x02" + pk, b"\x03" + pk, b"\x02" + digest, b"\x03" + digest):
        try:
            out.append(coincurve.PublicKey(raw).format(compressed=True))
        except ValueError:
            continue
    out += [k256_public_key(rng.randbytes(32)) for _ in range(2)]
    return out


def test_env_key_signatures_anyone_can_obtain_are_never_taken_as_an_app_key_signature() -> None:
    rng = random.Random(8)
    keys = te.dkg_local(T, N)
    gpk = keys[0].group_public_key
    tried = 0
    for _ in range(6):
        app, other_app = rng.randbytes(20), rng.randbytes(20)
        pk = rng.randbytes(32)  # an X25519 env public key
        ts = rng.randint(1, 2**40)
        for digest in (legacy_digest(app, pk), env_encrypt_pubkey_digest(app, pk, ts)):
            sig = _group_sign(keys, digest)
            for key in _candidates(pk, digest, rng):
                for target in (app, other_app):
                    tried += 1
                    assert app_key_signature_problem(target, key, sig, gpk) != "", (target, key)
        # the control: the genuine app-key signature of a key for this app passes, and only for this app
        key = k256_public_key(rng.randbytes(32))
        genuine = _group_sign(keys, kms_issued_digest(app, key))
        assert app_key_signature_problem(app, key, genuine, gpk) == ""
        assert app_key_signature_problem(other_app, key, genuine, gpk) != ""
    assert tried >= 6 * 2 * 2 * 2
