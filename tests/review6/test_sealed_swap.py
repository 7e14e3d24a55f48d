"""R6-1 (FINDING): a node's sealed env share does not name its app or epoch. The sealed plaintext is
{index, t, share, commitments} and the AES-GCM associated data is the format and the node's measurement
only; the app and epoch are in the FILE NAME (`threshold-env/<epoch>-<app_id>.sealed`), which the host
controls. A host that copies app B's sealed share over app A's file makes the node answer app A's attested
boot with x_B,i·P (labelled app A). With t such hosts (the very collusion the sealing is meant to make
harmless: hosts never see a share), app A's boot, handed B's env blob, decrypts B's secrets — the agent puts
them into app A's environment. The CVM cannot tell: the partial carries B's commitments consistently.

Minimal fix: bind (epoch, app_id) to the sealing (e.g. in the associated data, or in the sealed document
checked on unseal) so a relabelled file does not open (EnvKeyStore.get -> SealingError)."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys.envcrypt import EnvDecryptionFailed, decrypt_env_with_shared_secret, encrypt_env
from teecloud.kms import api
from teecloud.kms.errors import SealingError
from teecloud.tee.simulated import SimulatedTdx
from tests.kms._threshold_env_world import provider_for, pubkey
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO, boot_hello

pytestmark = pytest.mark.slow


def _relabel(m: Member, epoch: int, src_app: bytes, dst_app: bytes) -> None:
    """The host's exact step: copy one sealed file over another, then restart the node (cache gone)."""
    env = m.service.env_keys
    assert env is not None
    d = env.store.dir
    shutil.copyfile(d / f"{epoch}-{src_app.hex()}.sealed", d / f"{epoch}-{dst_app.hex()}.sealed")
    env.store._cache.clear()  # a restarted node re-reads its sealed files


def _apps(world: World, nodes: dict[int, Member], tag: str) -> tuple[bytes, bytes, bytes]:
    app_a = world.register(compose_hash(HELLO))
    app_b = world.register(compose_hash(dict(HELLO, name=f"victim-{tag}")))
    pubkey(nodes[1], app_a)
    pub_b = bytes.fromhex(pubkey(nodes[2], app_b).public_key)
    return app_a, app_b, pub_b


# R6-1 (high), fixed in 55c41db: the seal binds (epoch, app_id)
def test_a_relabelled_sealed_share_does_not_open_as_another_apps(
    world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    nodes, _ = members
    app_a, app_b, _ = _apps(world, nodes, "store")
    _relabel(nodes[3], 1, app_b, app_a)
    env3 = nodes[3].service.env_keys
    assert env3 is not None
    with pytest.raises(SealingError):
        env3.store.get(1, app_a)


# R6-1 (high), fixed in 55c41db
def test_hosts_relabelling_sealed_shares_do_not_give_app_a_app_bs_env(
    teecloud_home: Path, world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    nodes, signing_key = members
    app_a, app_b, pub_b = _apps(world, nodes, "boot")
    blob_b = encrypt_env(pub_b, {"B_SECRET": "for b only"})
    for m in nodes.values():
        _relabel(m, 1, app_b, app_a)
    provider = provider_for(nodes, signing_key, SimulatedTdx(teecloud_home))
    provider.bind_encrypted_env(blob_b)  # the host hands app A's CVM app B's env blob
    try:
        boot_hello(teecloud_home, world, provider, app_id=app_a)
    except Exception:
        return
    secret = provider.env_shared_secret
    if secret is None:
        return
    with pytest.raises(EnvDecryptionFailed):
        decrypt_env_with_shared_secret(secret, blob_b)


# R6-3 (low), fixed in 55c41db: 503, step sealing
def test_a_corrupted_sealed_share_is_a_clear_refusal_not_a_bare_500(
    world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    """R6-3 (Low): the host overwrites a node's sealed env share; the node's answer to
    GetAppEnvEncryptPubKey is `500 Internal Server Error` with no reason (SealingError is not mapped).
    Safe: a clear refusal (e.g. 503, step `sealing`) naming the sealed file that does not open.
    Minimal fix: an exception handler for SealingError in kms.http (and audit it on the attested paths)."""
    nodes, _ = members
    app = world.register(compose_hash(dict(HELLO, name="corrupt")))
    pubkey(nodes[1], app)
    env2 = nodes[2].service.env_keys
    assert env2 is not None
    (env2.store.dir / f"1-{app.hex()}.sealed").write_bytes(b"garbage")
    env2.store._cache.clear()
    env2._answers.clear()
    r = httpx.post(
        nodes[2].server.url + api.PATH_GET_APP_ENV_ENCRYPT_PUBKEY,
        json={"app_id": app.hex()},
        verify=False,
        timeout=30,
    )
    assert r.status_code != 500 and "does not open" in r.text, (r.status_code, r.text)
