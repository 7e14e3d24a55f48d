"""The threshold env-key gate (docs/kms.md, "Which apps get a threshold env key"; review 6, R6-2) and the
sealed env answer.

Gate: a member runs an env-key ceremony, and signs an env public key, only for an app KmsAuth deployed itself
from its app blueprint (`KmsAuth.deployed_apps`), read through its chain gate at its finality depth. The
attacker's exact steps: register a contract that is no such app with `register_app` (anyone may), then one
unauthenticated GetAppEnvEncryptPubKey per node, or, as a member, drive a ceremony stage or a signature.
Generated mutations: bare registered contracts of several kinds, an app another KmsAuth deployed (same
blueprint, same code), an app deployed too recently for the finality depth.

Answer: the group-signed answer is sealed beside the app's share, so a restarted node serves it without new
signatures (a host that restarts a node spends no presignature); a swapped or damaged answer is not served.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import httpx
import pytest

from teecloud.appcompose import compose_hash
from teecloud.chain.kmsauth import KmsAuth
from teecloud.kms import api
from teecloud.kms.errors import AccessDenied
from teecloud.kms.threshold_env import SIGNATURE_REFRESH_S
from tests.kms.conftest import World
from tests.kms.test_threshold_env import members, pubkey  # noqa: F401  (pytest fixture)
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_nodes import HELLO

pytestmark = pytest.mark.slow

Nodes = dict[int, Member]


def _unused(m: Member) -> int:
    signer = m.service.threshold.signer  # type: ignore[union-attr]
    assert signer is not None
    return len(signer.pool.unused())


def _env_dir_files(nodes: Nodes) -> dict[int, list[str]]:
    """Every file in each member's env directory (shares AND answers)."""
    out = {}
    for i, m in nodes.items():
        d = m.service.env_keys.store.dir  # type: ignore[union-attr]
        out[i] = sorted(p.name for p in d.iterdir()) if d.exists() else []
    return out


def _snapshot(nodes: Nodes) -> tuple[dict[int, int], dict[int, list[str]]]:
    return {i: _unused(m) for i, m in nodes.items()}, _env_dir_files(nodes)


def _assert_refused_everywhere(
    nodes: Nodes, app: bytes, reason: str = "did not deploy this contract from its app blueprint"
) -> None:
    """Refused with the gate's named reason on every node: the public endpoint (HTTP 403), a member driven to
    deal by another member, a member asked to sign; nothing opened, spent or sealed anywhere."""
    before = _snapshot(nodes)
    for m in nodes.values():
        r = httpx.post(
            m.server.url + api.PATH_GET_APP_ENV_ENCRYPT_PUBKEY,
            json={"app_id": app.hex()},
            verify=False,
            timeout=30,
        )
        assert r.status_code == 403, r.text
        assert reason in r.text, r.text
        env = m.service.env_keys
        assert env is not None
        with pytest.raises(AccessDenied, match=reason) as exc:
            env.stage(
                api.PeerEnvDkgRequest(session=secrets.token_hex(16), epoch=1, app_id=app.hex(), stage="deal")
            )
        assert exc.value.step == "chain"
        with pytest.raises(AccessDenied, match=reason):
            env.sign_shares(1, app, int(time.time()), [])
        assert env._open == {} and len(env._opened) == 0  # no ceremony opened, no budget taken
    assert _snapshot(nodes) == before


def _deploy_other_kms_app(world: World) -> bytes:
    """An app deployed by ANOTHER KmsAuth (the same blueprint, the same compose hash a real app runs)."""
    chain, kms = world.chain, world.chain.kms
    owner = chain.require_signer().address
    other = KmsAuth(kms.conn, chain.deploy_contract("KmsAuth", owner, str(kms._call("app_blueprint"))))
    return bytes.fromhex(other.register_app(owner, compose_hash(HELLO))[2:])


def test_registered_contracts_that_kms_auth_did_not_deploy_get_no_env_key(
    world: World,
    members: tuple[Nodes, bytes],  # noqa: F811  (the fixture imported above)
) -> None:
    nodes, _ = members
    chain, kms = world.chain, world.chain.kms
    owner = chain.require_signer().address
    kinds: dict[str, Callable[[], bytes]] = {
        # a real AppAuth allowing a compose hash a real app runs, deployed by hand (not by KmsAuth)
        "hand-deployed AppAuth": lambda: bytes.fromhex(
            chain.deploy_contract("AppAuth", owner, False, False, True, b"\0" * 32, compose_hash(HELLO))[2:]
        ),
        "another KmsAuth's app": lambda: _deploy_other_kms_app(world),
        "another KmsAuth itself": lambda: bytes.fromhex(
            chain.deploy_contract("KmsAuth", owner, str(kms._call("app_blueprint")))[2:]
        ),
        "a Multisig": lambda: bytes.fromhex(chain.deploy_contract("Multisig", [owner], 1)[2:]),
        "a fresh AppAuth blueprint": lambda: bytes.fromhex(chain.deploy_blueprint("AppAuth")[2:]),
    }
    for kind, make in kinds.items():
        bare = make()
        kms.register_existing_app(bare)
        assert world.chain.is_registered(bare), kind
        assert chain.is_app_deployed(bare)[0] is False, kind
        _assert_refused_everywhere(nodes, bare)
    # the same request for an app KmsAuth deployed: one ceremony, answered (the gate is not a blanket no)
    app = world.register(compose_hash(dict(HELLO, name="gate-control")))
    assert chain.is_app_deployed(app)[0] is True
    assert len({pubkey(m, app).public_key for m in nodes.values()}) == 1


def test_unregistered_and_malformed_app_ids_are_refused_before_anything(
    world: World,
    members: tuple[Nodes, bytes],  # noqa: F811  (the fixture imported above)
) -> None:
    nodes, _ = members
    for app in (secrets.token_bytes(20), b"\0" * 20):  # no contract there at all
        _assert_refused_everywhere(nodes, app, "the app is not registered in KmsAuth")
    before = _snapshot(nodes)
    for bad in ("zz", "00" * 19, "00" * 21):  # a client's mistake: 400, and nothing happens
        r = httpx.post(
            nodes[1].server.url + api.PATH_GET_APP_ENV_ENCRYPT_PUBKEY, json={"app_id": bad}, verify=False
        )
        assert r.status_code == 400, r.text
    assert _snapshot(nodes) == before


def test_a_deployment_counts_only_once_it_is_final(
    world: World,
    members: tuple[Nodes, bytes],  # noqa: F811  (the fixture imported above)
) -> None:
    """The gate reads KmsAuth at the node's finality depth: an app deployed fewer than `depth` blocks ago (a
    reorg could still undo it) gets nothing; once deep enough, the ceremony runs."""
    nodes, _ = members
    depth = 3
    for m in nodes.values():
        m.service.authorizer.finality_depth = depth
    app = world.register(compose_hash(dict(HELLO, name="gate-finality")))
    before = _snapshot(nodes)
    for mined in (0, 1, 2):  # the deployment's block is the head, then 1 and 2 blocks below it
        for m in nodes.values():
            with pytest.raises(AccessDenied, match=f"counts once it is {depth} blocks deep"):
                pubkey(m, app)
        assert _snapshot(nodes) == before, mined
        world.chain.rpc_call("evm_mine")
    # now `depth` blocks sit on the deployment's block
    assert len({pubkey(m, app).public_key for m in nodes.values()}) == 1


def _restart_env(nodes: Nodes, clock: Callable[[], float] = time.time) -> None:
    """What a restarted node builds: a fresh EnvKeys over the same sealed directory (nothing in memory)."""
    urls = {i: m.server.url for i, m in nodes.items()}
    for m in nodes.values():
        assert m.service.threshold is not None
        m.service.env_keys = m.service._make_env_keys(m.service.threshold, clock)
        m.service.env_keys.set_peers(urls)


def test_a_restarted_node_serves_its_sealed_answer_and_spends_no_presignature(
    world: World,
    members: tuple[Nodes, bytes],  # noqa: F811  (the fixture imported above)
) -> None:
    nodes, _ = members
    app = world.register(compose_hash(dict(HELLO, name="restart-answer")))
    first = {i: pubkey(m, app) for i, m in nodes.items()}  # each node signs its own answer once
    spent = {i: _unused(m) for i, m in nodes.items()}
    _restart_env(nodes)
    for _round in range(3):  # a host restarting its nodes over and over
        again = {i: pubkey(m, app) for i, m in nodes.items()}
        assert again == first  # the same signed answer, timestamp and all
        assert {i: _unused(m) for i, m in nodes.items()} == spent
        _restart_env(nodes)
    # the answer ages as before: once SIGNATURE_REFRESH_S old, a restarted node signs anew (2 presignatures)
    _restart_env(nodes, clock=lambda: time.time() + SIGNATURE_REFRESH_S + 1)
    fresh = pubkey(nodes[1], app)
    assert fresh.public_key == first[1].public_key and fresh.timestamp > first[1].timestamp
    assert _unused(nodes[1]) == spent[1] - 2


def test_a_swapped_or_damaged_sealed_answer_is_not_served(
    world: World,
    members: tuple[Nodes, bytes],  # noqa: F811  (the fixture imported above)
) -> None:
    """The host's steps: copy app A's sealed answer over app B's, or damage B's, then restart the node.
    The answer is bound to its (epoch, app) and checked against the share and the group key: B is signed
    anew (its own key), never answered with A's."""
    nodes, _ = members
    a = world.register(compose_hash(dict(HELLO, name="answer-a")))
    b = world.register(compose_hash(dict(HELLO, name="answer-b")))
    m = nodes[2]
    ans_a, ans_b = pubkey(m, a), pubkey(m, b)
    d = m.service.env_keys.store.dir  # type: ignore[union-attr]
    path_a, path_b = d / f"1-{a.hex()}.answer", d / f"1-{b.hex()}.answer"
    for damage in (lambda: path_b.write_bytes(path_a.read_bytes()), lambda: path_b.write_bytes(b"{}")):
        damage()
        _restart_env(nodes)
        before = _unused(m)
        got = pubkey(m, b)
        assert got.public_key == ans_b.public_key and got.public_key != ans_a.public_key
        assert _unused(m) == before - 2  # signed anew, not served from the swapped or damaged file
        assert pubkey(m, a) == ans_a  # A's own sealed answer still serves A, for free
        assert _unused(m) == before - 2
        reopened = m.service.env_keys.store.answer(1, b)  # type: ignore[union-attr]
        assert reopened == got  # replaced by the new signed answer


def test_an_answer_that_cannot_be_sealed_is_still_served_once_signed(
    world: World,
    members: tuple[Nodes, bytes],  # noqa: F811  (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full disk after the signature: the client gets its answer (no 500), and the node keeps it in memory
    (the next request spends nothing)."""
    nodes, _ = members
    app = world.register(compose_hash(dict(HELLO, name="answer-disk-full")))
    m = nodes[3]
    store = m.service.env_keys.store  # type: ignore[union-attr]

    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "put_answer", disk_full)
    before = _unused(m)
    r = httpx.post(
        m.server.url + api.PATH_GET_APP_ENV_ENCRYPT_PUBKEY,
        json={"app_id": app.hex()},
        verify=False,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert pubkey(m, app).model_dump() == r.json()
    assert _unused(m) == before - 2
    assert store.answer(1, app) is None
