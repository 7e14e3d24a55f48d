"""Review 7: the env-key gate (KmsAuth deployed the app itself, at the finality depth) on the NEW paths of
this round — share recovery (PeerEnvRecover split) and the `held` / `recover` stages of PeerEnvDkg. The
attacker's exact steps: shares of a contract KmsAuth did not deploy (sealed before the gate existed: the
documented leftover), or of an app deployed fewer than `depth` blocks ago (a fork could undo it), sit on
four members; the fifth, a genuine member lacking its share, asks for "its own" share. HELD: every helper
refuses at the gate (step chain), nothing is split; once the deployment is final the same request works
(the gate is not a blanket no)."""

from __future__ import annotations

from pathlib import Path

import pytest

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.kms import api
from teecloud.kms.errors import KmsClientError, KmsDenied, KmsUsageError
from teecloud.kms.threshold_env import EnvKeys
from tests.kms.conftest import World
from tests.kms.test_threshold_net_peering import Member, client
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow

Nodes = dict[int, Member]


def _env(m: Member) -> EnvKeys:
    assert m.service.env_keys is not None
    return m.service.env_keys


def _seed(nodes: Nodes, app: bytes, holders: list[int]) -> list[tx.EnvKeyShare]:
    """A sharing of `app` sealed on `holders` (as a ceremony before the gate, or before a fork, left it)."""
    shares = tx.dkg_local(3, 5)
    for i in holders:
        _env(nodes[i]).store.put(1, app, shares[i - 1])
    return shares


def _split(
    src: Member, dst: Member, app: bytes, helpers: list[int], session: str
) -> api.PeerEnvRecoverResponse:
    return client(src, dst).peer_call(
        api.PATH_PEER_ENV_RECOVER,
        api.PeerEnvRecoverResponse,
        {"stage": "split", "session": session, "epoch": 1, "app_id": app.hex(), "helpers": helpers},
    )


def _dkg(src: Member, dst: Member, app: bytes, stage: str, session: str) -> api.PeerEnvDkgResponse:
    return client(src, dst).peer_call(
        api.PATH_PEER_ENV_DKG,
        api.PeerEnvDkgResponse,
        {"stage": stage, "session": session, "epoch": 1, "app_id": app.hex()},
    )


def _refused_at_the_gate(nodes: Nodes, app: bytes, match: str) -> None:
    n = 0
    for helper in (1, 2, 3, 4):
        helpers = sorted({helper, *[h for h in (1, 2, 3, 4) if h != helper][:2]})
        for stage in ("split", "held", "recover"):
            n += 1
            session = f"{n:02x}" * 16
            with pytest.raises((KmsDenied, KmsClientError)) as err:
                if stage == "split":
                    _split(nodes[5], nodes[helper], app, helpers, session)
                else:
                    _dkg(nodes[5], nodes[helper], app, stage, session)
            assert match in str(err.value), (helper, stage, err.value)
        assert not _env(nodes[helper])._recoveries
    with pytest.raises((KmsUsageError, KmsDenied, KmsClientError)):  # the lacking member's own recovery
        with _env(nodes[5])._app_lock(1, app):
            _env(nodes[5]).recover(1, app)
    assert _env(nodes[5]).store.get(1, app) is None


def test_recovery_of_a_contract_kms_auth_did_not_deploy_is_refused_by_every_helper(
    world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, _ = members
    chain = world.chain
    owner = chain.require_signer().address
    bare = bytes.fromhex(
        chain.deploy_contract("AppAuth", owner, False, False, True, b"\0" * 32, compose_hash(HELLO))[2:]
    )
    chain.kms.register_existing_app(bare)
    assert chain.is_registered(bare) and chain.is_app_deployed(bare)[0] is False
    _seed(nodes, bare, [1, 2, 3, 4])
    _refused_at_the_gate(nodes, bare, "KmsAuth did not deploy this contract")


def test_recovery_of_an_app_deployed_below_the_finality_depth_waits_for_depth(
    teecloud_home: Path, world: World, members: tuple[Nodes, bytes]
) -> None:
    nodes, _ = members
    depth = 3
    for m in nodes.values():
        m.service.authorizer.finality_depth = depth
    app = world.register(compose_hash(dict(HELLO, name="review7-recovery-depth")))
    shares = _seed(nodes, app, [1, 2, 3, 4])
    _refused_at_the_gate(nodes, app, f"counts once it is {depth} blocks deep")
    for _ in range(depth):
        world.chain.rpc_call("evm_mine")
    with _env(nodes[5])._app_lock(1, app):
        got = _env(nodes[5]).recover(1, app)
    assert got == shares[4]
