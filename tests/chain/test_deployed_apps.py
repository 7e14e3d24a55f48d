"""KmsAuth.deployed_apps: true only for an app KmsAuth created itself from its blueprint (the threshold
env-key gate, docs/kms.md; review 6, R6-2), read through the chain gate at a finality depth (both EVMs)."""

from __future__ import annotations

import pytest

from teecloud.chain import ChainClient
from teecloud.chain.kmsauth import KmsAuth
from teecloud.peer import ChainGate, PeerRejected

from .helpers import rand32

DEPTH = 3


def _mine(chain: ChainClient, n: int) -> None:
    for _ in range(n):
        chain.rpc_call("evm_mine")


def test_only_apps_kms_auth_deployed_itself_are_deployed_apps(chain: ChainClient) -> None:
    app_id = chain.register_app(None, rand32())
    assert chain.is_app_deployed(app_id) == (True, "deployed by KmsAuth from its app blueprint")
    owner = chain.address
    blueprint = chain.deployment["AppAuthBlueprint"]
    other_kms = chain.deploy_contract("KmsAuth", owner, blueprint)
    bare = {
        "hand-deployed AppAuth": chain.deploy_contract(
            "AppAuth", owner, False, False, True, b"\0" * 32, rand32()
        ),
        "KmsAuth itself": chain.kms_auth,
        "the blueprint": blueprint,
        "another KmsAuth": other_kms,
        "another KmsAuth's app": KmsAuth(chain.kms.conn, other_kms).register_app(owner or "", rand32()),
    }
    for kind, address in bare.items():
        assert chain.is_app_deployed(address) == (False, "the app is not registered in KmsAuth"), kind
        chain.with_signer(chain.keys[3]).register_existing_app(address)  # type: ignore[attr-defined]
        assert chain.is_registered(address), kind
        ok, reason = chain.is_app_deployed(address)
        assert not ok and "did not deploy this contract from its app blueprint" in reason, kind
    assert chain.is_app_deployed("0x" + "33" * 20)[0] is False  # no contract at all


def test_the_gate_counts_a_deployment_once_it_is_final(chain: ChainClient) -> None:
    gate = ChainGate(chain, block_number=chain.checked_head, finality_depth=DEPTH)
    app_id = bytes.fromhex(chain.register_app(None, rand32())[2:])
    for _ in range(DEPTH):  # the head, then 1 .. DEPTH-1 blocks on top: a reorg could still undo it
        with pytest.raises(PeerRejected, match=f"counts once it is {DEPTH} blocks deep") as exc:
            gate.app_deployed(app_id)
        assert exc.value.step == "chain"
        _mine(chain, 1)
    assert gate.app_deployed(app_id) == "deployed by KmsAuth from its app blueprint"
    # an app registered by hand stays refused however deep; an id that is not 20 bytes is refused as such
    own = chain.deploy_contract("AppAuth", chain.address, False, False, True, b"\0" * 32, rand32())
    chain.register_existing_app(own)
    _mine(chain, DEPTH)
    with pytest.raises(PeerRejected, match="did not deploy this contract"):
        gate.app_deployed(bytes.fromhex(own[2:]))
    with pytest.raises(PeerRejected, match="20 bytes"):
        gate.app_deployed(app_id + b"\0")


def test_an_old_kms_auth_without_the_record_fails_closed() -> None:
    """A chain client that cannot answer (here: no such function) is a refusal, never a yes."""

    class NoRecord:
        def is_app_deployed(self, app_id: bytes, **_: object) -> tuple[bool, str]:
            raise RuntimeError("execution reverted")

    with pytest.raises(PeerRejected, match="failing closed"):
        ChainGate(NoRecord()).app_deployed(b"\1" * 20)  # type: ignore[arg-type]
