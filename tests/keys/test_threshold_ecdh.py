"""teecloud.keys.threshold_ecdh: dstack-format encrypted envs (made by dstack-sdk's own encrypt_env_vars)
decrypt from any t nodes' proved partials; one node, t-1 nodes or another app's nodes decrypt nothing; a
wrong partial is named; hostile ephemeral keys are refused."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from dstack_sdk.encrypt_env_vars import EnvVar, encrypt_env_vars_sync

from teecloud.keys import threshold_ecdh as td
from teecloud.keys.envcrypt import decrypt_env_with_shared_secret, encrypt_env
from teecloud.keys.errors import EnvDecryptionFailed

APP = bytes.fromhex("ab" * 20)
ENV = {"DB_PASSWORD": "hunter2", "API_KEY": "k-123"}


@pytest.fixture(scope="module")
def shares() -> list[td.EnvKeyShare]:
    return td.dkg_local(3, 5)


@pytest.fixture(scope="module")
def blob(shares) -> bytes:
    pub = td.x25519_public_key(shares[0].commitments)
    X25519PublicKey.from_public_bytes(pub)  # an ordinary X25519 key to any library
    return bytes.fromhex(encrypt_env_vars_sync([EnvVar(key=k, value=v) for k, v in ENV.items()], pub.hex()))


def _decrypt(shares: list[td.EnvKeyShare], blob: bytes, who: tuple[int, ...]) -> dict[str, str]:
    point = td.ephemeral_point(blob)
    parts = [td.partial_decrypt(shares[i - 1], APP, point) for i in who]
    return decrypt_env_with_shared_secret(td.combine(shares[0].commitments, APP, point, parts), blob)


def test_any_t_nodes_decrypt_a_dstack_sdk_env(shares, blob) -> None:
    for who in itertools.combinations(range(1, 6), 3):
        assert _decrypt(shares, blob, who) == ENV


def test_teecloud_deploy_format_decrypts_too(shares) -> None:
    b = encrypt_env(td.x25519_public_key(shares[0].commitments), {"X": "1"})
    assert _decrypt(shares, b, (2, 4, 5)) == {"X": "1"}


def test_t_minus_1_or_one_node_decrypts_nothing(shares, blob) -> None:
    point = td.ephemeral_point(blob)
    parts = [td.partial_decrypt(shares[i - 1], APP, point) for i in (1, 2)]
    with pytest.raises(td.ThresholdEcdhError, match="2 valid ECDH partials, 3 needed"):
        td.combine(shares[0].commitments, APP, point, parts)
    # a single node's partial, or t-1 interpolated as if they were enough, is not the AES key
    for guess in [
        td._to_u(parts[0].element),
        td._to_u(
            td._sum(
                [
                    td._mul(c, p.element)
                    for c, p in zip(td.lagrange_at_zero([1, 2]).values(), parts, strict=True)
                ]
            )
        ),
    ]:
        with pytest.raises(EnvDecryptionFailed):
            decrypt_env_with_shared_secret(guess, blob)


def test_another_apps_nodes_decrypt_nothing(shares, blob) -> None:
    other = td.dkg_local(3, 5)
    point = td.ephemeral_point(blob)
    parts = [td.partial_decrypt(s, APP, point) for s in other[:3]]
    with pytest.raises(EnvDecryptionFailed):
        decrypt_env_with_shared_secret(td.combine(other[0].commitments, APP, point, parts), blob)


def test_a_wrong_partial_is_named(shares, blob) -> None:
    rng = random.Random(5)
    point = td.ephemeral_point(blob)
    for liar in range(1, 6):
        honest = [td.partial_decrypt(s, APP, point) for s in shares if s.index != liar]
        real = td.partial_decrypt(shares[liar - 1], APP, point)
        lies = [
            dataclasses.replace(real, element=td._mul(rng.randrange(2, td.ORDER), point)),  # wrong value
            dataclasses.replace(real, proof=real.proof[:32] + bytes(32)),  # broken proof
            dataclasses.replace(real, proof=bytes(rng.randrange(256) for _ in range(64))),
            td.partial_decrypt(dataclasses.replace(shares[liar - 1]), b"another app", point),  # other label
            dataclasses.replace(real, element=bytes(32)),  # not a point of the subgroup
        ]
        for lie in lies:
            with pytest.raises(td.ThresholdEcdhError) as err:
                td.combine(shares[0].commitments, APP, point, [honest[0], lie, honest[1]])
            assert err.value.party == liar
        secret = td.combine(shares[0].commitments, APP, point, honest[:3])
        assert decrypt_env_with_shared_secret(secret, blob) == ENV


@pytest.mark.parametrize(
    "u",
    [
        bytes(32),  # u = 0: small order
        (1).to_bytes(32, "little"),  # u = 1: identity on Edwards
        (2).to_bytes(32, "little"),  # a point of the twist (2 is not a valid u on the curve's subgroup)
        ((2**255 - 19) - 1).to_bytes(32, "little"),  # u = -1
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order-8 point
    ],
)
def test_hostile_ephemeral_keys_are_refused(u: bytes) -> None:
    with pytest.raises(td.ThresholdEcdhError):
        td.ephemeral_point(u + bytes(44))


def test_share_that_does_not_match_commitments_is_refused(shares) -> None:
    s = shares[2]
    with pytest.raises(td.ThresholdEcdhError, match="node 3"):
        td.EnvKeyShare(s.index, s.t, (s.share + 1) % td.ORDER, s.commitments)
