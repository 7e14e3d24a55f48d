"""Root rotation (issue 19): a second root epoch from a fresh DKG beside the first, sealed beside it in each
node's directory; an app's keys move only when its measured app-compose opts in (`kms_key_epoch`), a
migrating app also gets its previous epoch's keys (for the volume's re-wrap), and a node refuses an epoch it
holds no share of, or one the app's compose does not name."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from teecloud.agent.boot import AgentState, boot
from teecloud.appcompose import AppComposeError, compose_hash
from teecloud.kms.bootstrap import KMS_APP_ID, boot_kms_tee
from teecloud.kms.client import connect_kms
from teecloud.kms.errors import AccessDenied, KmsClientError, SealingError
from teecloud.kms.launcher import KmsLaunch, launch_kms
from teecloud.kms.rotation import KeyEpochs, evaluation_epoch, key_epochs
from teecloud.kms.service import StaticCollateral
from teecloud.kms.threshold import (
    SHARE_FILE,
    DkgPlan,
    ReshareDealer,
    ResharePlan,
    ThresholdEvaluator,
    ThresholdShare,
    erase_share,
    load_shares,
    local_joint_feldman,
    save_share,
)
from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider, join_dkg
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import World, stop_servers
from tests.kms.test_quote_oracle import HELLO
from tests.kms.test_threshold_nodes import N, Node, T, start_node
from tests.kms.test_threshold_reshare import _allow_kms_build

pytestmark = pytest.mark.slow

OPTED_IN = {**HELLO, "kms_key_epoch": 2}
MIGRATING = {**HELLO, "kms_key_epoch": 2, "kms_key_epoch_previous": 1}


class Rotated:
    def __init__(
        self, home: Path, nodes: dict[int, Node], e1: list[ThresholdShare], e2: list[ThresholdShare]
    ):
        self.home, self.nodes, self.e1, self.e2 = home, nodes, e1, e2
        self.dev_tee = SimulatedTdx(home)

    def group(self, shares: list[ThresholdShare]) -> ThresholdGroup:
        return ThresholdGroup(
            epoch=shares[0].epoch,
            t=T,
            commitments=shares[0].commitments,
            nodes={i: n.server.url for i, n in self.nodes.items()},
        )

    def provider(self, *, rotated: bool = True) -> ThresholdKeyProvider:
        clients = {
            i: connect_kms(
                n.server.url,
                collateral_for=lambda _q, _now: self.dev_tee.collateral(),
                dev_root_der=self.dev_tee.dev_root_der(),
                expected_ca_pubkey_der=n.root_ca_spki,
            )
            for i, n in self.nodes.items()
        }
        epochs = {2: self.group(self.e2)} if rotated else {}
        return ThresholdKeyProvider(self.group(self.e1), clients, hedge_s=60.0, epochs=epochs)

    def rotate(self, indices: list[int]) -> None:
        """Seal epoch 2's share beside epoch 1's in nodes `indices`, and serve what the node unseals."""
        tee = SimulatedTdx(self.home)
        identity = boot_kms_tee(tee)
        for i in indices:
            node_home = self.home / f"kms-node-{i}"
            save_share(self.e2[i - 1], tee, identity, node_home)
            shares = load_shares(tee, identity, node_home)
            assert sorted(shares) == [1, 2]
            self.nodes[i].kms.service.threshold = ThresholdEvaluator(shares[2], older=[shares[1]])


@pytest.fixture
def rotated(teecloud_home: Path, world: World) -> Iterator[Rotated]:
    e1 = local_joint_feldman(T, N, epoch=1)
    e2 = local_joint_feldman(T, N, epoch=2)  # a fresh DKG: another group key, not a reshare
    assert e1[0].group_public_key != e2[0].group_public_key
    nodes: dict[int, Node] = {}
    try:
        for s in e1:
            nodes[s.index] = start_node(teecloud_home, world.chain, s)
        yield Rotated(teecloud_home, nodes, e1, e2)
    finally:
        stop_servers(n.server for n in nodes.values())


def _boot(home: Path, provider: Any, compose: dict[str, Any], app_id: bytes) -> AgentState:
    tee = SimulatedTdx(home)
    return boot(
        tee, json.dumps(compose), app_id, None, provider, extra_events=[("os-image-hash", tee.os_image_hash)]
    )


def _app(world: World) -> bytes:
    app_id = world.register(compose_hash(HELLO))
    for c in (OPTED_IN, MIGRATING):  # the owner allows the opting-in composes: an on-chain app upgrade
        world.chain.add_compose_hash(app_id, compose_hash(c))
    return app_id


def _secrets(state: AgentState) -> tuple[bytes, bytes, bytes]:
    k = state.keys
    return k.disk_crypt_key, k.env_crypt_key, k.k256_key


def test_only_an_app_that_opts_in_changes_keys(teecloud_home: Path, world: World, rotated: Rotated) -> None:
    app_id = _app(world)
    before = _boot(teecloud_home, rotated.provider(rotated=False), HELLO, app_id)
    rotated.rotate(list(range(1, N + 1)))
    provider = rotated.provider()
    # not opted in: every key identical after the rotation
    after = _boot(teecloud_home, provider, HELLO, app_id)
    assert _secrets(after) == _secrets(before)
    assert provider.faults == {}
    # opted in: every key differs (the epoch is an input of every derivation)
    opted = _boot(teecloud_home, provider, OPTED_IN, app_id)
    assert all(a != b for a, b in zip(_secrets(opted), _secrets(before), strict=True))
    assert opted.previous_keys is None
    assert opted.keys.key_provider_info["epoch"] == 2
    assert opted.keys.key_provider_info["id"] == rotated.e2[0].group_public_key.hex()
    # the measured key-provider event states the group the keys came from, as the Info route does
    (measured,) = [e.event_payload for e in opted.tee.event_log() if e.event == "key-provider"]
    assert json.loads(measured) == opted.keys.key_provider_info
    (measured,) = [e.event_payload for e in after.tee.event_log() if e.event == "key-provider"]
    assert json.loads(measured)["epoch"] == 1
    # the same epoch-2 keys on every boot, from any 3 nodes
    again = _boot(teecloud_home, rotated.provider(), OPTED_IN, app_id)
    assert _secrets(again) == _secrets(opted)
    # migrating: the new keys, and the old epoch's too (to re-wrap the volume)
    migrating = _boot(teecloud_home, provider, MIGRATING, app_id)
    assert _secrets(migrating) == _secrets(opted)
    assert migrating.previous_keys is not None
    assert migrating.previous_keys.disk_crypt_key == before.keys.disk_crypt_key
    assert migrating.previous_keys.env_crypt_key == before.keys.env_crypt_key


def test_a_node_without_the_epoch_2_share_refuses_it_and_epoch_1_still_serves(
    teecloud_home: Path, world: World, rotated: Rotated
) -> None:
    app_id = _app(world)
    rotated.rotate([1, 2, 3, 4])  # node 5 missed the round
    for i in (1, 2):
        rotated.nodes[i].server.stop()
    provider = rotated.provider()
    with pytest.raises(KmsClientError, match="only 2 valid partial evaluations") as exc:
        _boot(teecloud_home, provider, OPTED_IN, app_id)
    assert "node 5: " in str(exc.value) and "holds no share of root epoch 2" in str(exc.value)
    denied = [r for r in rotated.nodes[5].kms.audit.read() if r.decision == "denied"]
    assert denied and denied[-1].step == "epoch"
    # epoch 1 still serves from nodes 3, 4, 5 (and node 5 answered it as before)
    state = _boot(teecloud_home, rotated.provider(), HELLO, app_id)
    assert state.keys.key_provider_info["epoch"] == 1


class _Forcing:
    """A key provider that asks for another epoch than the measured compose names (what a tampered agent
    or a replayed request would do): the nodes refuse it."""

    name = "forcing"

    def __init__(self, inner: ThresholdKeyProvider, group: ThresholdGroup) -> None:
        self.inner, self.group = inner, group

    def boot_nonce(self) -> bytes:
        return self.inner.boot_nonce()

    def bind_app_compose(self, text: str) -> None:
        self.inner.bind_app_compose(text)

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def get_app_keys(self, tee: Any, app_id: bytes, instance_id: bytes) -> Any:
        return self.inner._app_keys(tee, app_id, instance_id, self.group)


def test_a_request_for_an_epoch_the_compose_does_not_name_is_refused(
    teecloud_home: Path, world: World, rotated: Rotated
) -> None:
    app_id = _app(world)
    rotated.rotate(list(range(1, N + 1)))
    provider = rotated.provider()
    with pytest.raises(KmsClientError, match="names root epochs \\[1\\], not 2"):
        _boot(teecloud_home, _Forcing(provider, rotated.group(rotated.e2)), HELLO, app_id)
    # and an opted-in app cannot go back to epoch 1 unless it migrates from it
    with pytest.raises(KmsClientError, match="names root epochs \\[2\\], not 1"):
        _boot(teecloud_home, _Forcing(rotated.provider(), rotated.group(rotated.e1)), OPTED_IN, app_id)
    for n in rotated.nodes.values():
        assert all(r.step == "epoch" for r in n.kms.audit.read() if r.decision == "denied")


def test_a_client_without_the_epochs_group_fails_clearly(
    teecloud_home: Path, world: World, rotated: Rotated
) -> None:
    app_id = _app(world)
    rotated.rotate(list(range(1, N + 1)))
    with pytest.raises(KmsClientError, match="trusts no group for it"):
        _boot(teecloud_home, rotated.provider(rotated=False), OPTED_IN, app_id)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, KeyEpochs(1)),
        ({"kms_key_epoch": 3}, KeyEpochs(3)),
        ({"kms_key_epoch": 3, "kms_key_epoch_previous": 2}, KeyEpochs(3, 2)),
        ({"kms_key_epoch": True}, "integer"),
        ({"kms_key_epoch": 0}, "integer"),
        ({"kms_key_epoch": -1}, "integer"),
        ({"kms_key_epoch": 1 << 32}, "integer"),
        ({"kms_key_epoch": "2"}, "integer"),
        ({"kms_key_epoch": 2.0}, "integer"),
        ({"kms_key_epoch": 2, "kms_key_epoch_previous": 2}, "older"),
        ({"kms_key_epoch": 2, "kms_key_epoch_previous": 3}, "older"),
        ({"kms_key_epoch_previous": 1}, "needs"),
    ],
)
def test_key_epochs_are_parsed_strictly(fields: dict[str, Any], expected: KeyEpochs | str) -> None:
    if isinstance(expected, KeyEpochs):
        assert key_epochs({**HELLO, **fields}) == expected
        return
    with pytest.raises(AppComposeError, match=expected):
        key_epochs({**HELLO, **fields})
    with pytest.raises(AccessDenied) as exc:
        evaluation_epoch(json.dumps({**HELLO, **fields}), None)
    assert exc.value.step == "epoch"


def test_evaluation_epoch_rule() -> None:
    assert evaluation_epoch("", None) == 1
    assert evaluation_epoch(json.dumps(MIGRATING), None) == 2
    assert evaluation_epoch(json.dumps(MIGRATING), 1) == 1
    for compose, epoch in (("", 2), (json.dumps(OPTED_IN), 1), (json.dumps(MIGRATING), 3)):
        with pytest.raises(AccessDenied):
            evaluation_epoch(compose, epoch)


def test_sealed_epochs_side_by_side(teecloud_home: Path) -> None:
    tee = SimulatedTdx(teecloud_home)
    identity = boot_kms_tee(tee)
    home = teecloud_home / "n"
    e1 = local_joint_feldman(2, 3, epoch=1)
    e2 = local_joint_feldman(2, 3, epoch=2)
    first = save_share(e1[0], tee, identity, home)
    assert first.name == SHARE_FILE
    second = save_share(e2[0], tee, identity, home)
    assert second != first
    assert load_shares(tee, identity, home) == {1: e1[0], 2: e2[0]}
    # a failed (never recorded) round's share of epoch 2 is replaced in place by the re-run's
    e2b = local_joint_feldman(2, 3, epoch=2)
    assert save_share(e2b[0], tee, identity, home) == second
    assert load_shares(tee, identity, home) == {1: e1[0], 2: e2b[0]}
    # a corrupted epoch file stops the node (never served, never silently dropped)
    blob = bytearray(second.read_bytes())
    blob[-5] ^= 1
    second.write_bytes(bytes(blob))
    with pytest.raises(SealingError):
        load_shares(tee, identity, home)
    # retiring erases every epoch
    assert erase_share(home)
    assert load_shares(tee, identity, home) == {}
    with pytest.raises(SealingError, match="one share per root epoch"):
        ThresholdEvaluator(e1[0], older=[e1[1]])
    with pytest.raises(SealingError, match="newest"):
        ThresholdEvaluator(e1[0], older=[e2[0]])


def test_a_failed_join_keeps_the_node_serving_its_epochs(teecloud_home: Path, world: World) -> None:
    """A rotation round a node cannot complete (a dealer killed mid-round): nothing new is sealed and the
    node starts serving the epochs it holds; a node with no share at all still fails its start."""
    tee = SimulatedTdx(teecloud_home)
    identity = boot_kms_tee(tee)
    home = teecloud_home / "joiner"
    e1 = local_joint_feldman(2, 3, epoch=1)
    save_share(e1[0], tee, identity, home)

    def failing_join(_tee: Any, _identity: Any) -> ThresholdShare:
        raise KmsClientError("the round failed; no share was made; failed nodes: node 2: connection refused")

    def launch(node_home: Path) -> Any:
        return launch_kms(
            KmsLaunch(
                tee=SimulatedTdx(teecloud_home),
                chain=world.chain,
                collateral=StaticCollateral(tee.collateral),
                dev=True,
                home=node_home,
                threshold=True,
                join=failing_join,
            )
        )

    running = launch(home)
    try:
        assert "node 2: connection refused" in running.join_error
        assert running.service.threshold is not None
        assert running.service.threshold.epochs == (1,)
    finally:
        running.stop()
    assert sorted(load_shares(tee, identity, home)) == [1]
    with pytest.raises(KmsClientError):
        launch(teecloud_home / "empty")


def test_a_rotation_round_hands_share_j_only_to_member_j(
    teecloud_home: Path, world: World, rotated: Rotated
) -> None:
    """The attacker's steps: an allowed KMS build booted by someone else asks the dealers of an open rotation
    round for a member's sub-share, with no token or another member's; each dealer refuses (step reshare),
    the member with its token gets its share, and no share is handed out twice."""
    _allow_kms_build(world, teecloud_home)
    dealers = (1, 2, 3)
    for i in dealers:  # share-less dealers (`kms up --dealer`), here three of the fixture's listeners
        rotated.nodes[i].kms.service.reshare = ReshareDealer(None)
    tokens = {j: os.urandom(32) for j in (1, 2, 3)}
    plan = DkgPlan(os.urandom(16), 2, dealers, 2, 3)
    for i in dealers:
        server = rotated.nodes[i].server
        r = httpx.post(
            server.admin_url + "/dkg/open",
            headers={"authorization": f"Bearer {server.admin_token}"},
            json={
                "session": plan.session.hex(),
                "epoch": 2,
                "dealer": i,
                "dealers": list(dealers),
                "t": 2,
                "n": 3,
                "member_token_hashes": {str(j): hashlib.sha256(t).hexdigest() for j, t in tokens.items()},
            },
        )
        assert r.status_code == 200, r.text

    def join(index: int, token: bytes | None) -> ThresholdShare:
        tee = SimulatedTdx(teecloud_home)
        boot_kms_tee(tee, finish=False)
        clients = {
            i: connect_kms(
                rotated.nodes[i].server.url,
                collateral_for=lambda _q, _n: tee.collateral(),
                dev_root_der=tee.dev_root_der(),
                expected_ca_pubkey_der=rotated.nodes[i].root_ca_spki,
            )
            for i in dealers
        }
        return join_dkg(plan, index, tee, clients, app_id=KMS_APP_ID, member_token=token)

    with pytest.raises(KmsClientError, match="member token"):
        join(1, None)
    with pytest.raises(KmsClientError, match="member token"):
        join(1, tokens[2])
    shares = {j: join(j, tokens[j]) for j in (1, 2, 3)}
    assert len({s.commitments for s in shares.values()}) == 1
    assert shares[1].epoch == 2 and shares[1].group_public_key != rotated.e1[0].group_public_key
    with pytest.raises(KmsClientError, match="already handed out"):
        join(2, tokens[2])
    for i in dealers:
        denied = [r for r in rotated.nodes[i].kms.audit.read() if r.decision == "denied"]
        assert [r.step for r in denied] == ["reshare"] * 3


def test_a_rotated_node_reshares_the_epoch_a_plan_names() -> None:
    e1 = local_joint_feldman(2, 3, epoch=1)
    e2 = local_joint_feldman(2, 3, epoch=2)
    dealer = ReshareDealer(e2[0], older=[e1[0]])
    hashes = {j: os.urandom(32) for j in (1, 2, 3)}
    for shares in (e1, e2):
        plan = ResharePlan(os.urandom(16), shares[0].epoch, shares[0].commitments, (1, 2), 2, 3)
        commitments = dealer.open(plan, hashes)
        # the dealing re-shares this epoch's share: its C_0 is node 1's public share of that epoch
        assert commitments[0] == shares[0].public_share
    with pytest.raises(SealingError, match="not this node's group"):
        dealer.open(ResharePlan(os.urandom(16), 3, e2[0].commitments, (1, 2), 2, 3), hashes)
    with pytest.raises(SealingError, match="not this node's group"):  # epoch 1's number, epoch 2's key
        dealer.open(ResharePlan(os.urandom(16), 1, e2[0].commitments, (1, 2), 2, 3), hashes)


@pytest.mark.parametrize(
    "plan",
    [
        "not json",
        "[]",
        '{"kind": "reshare"}',
        '{"kind": "rotate", "session": "zz"}',
        '{"kind": "rotate", "session": "00", "epoch": 2, "t": 1, "n": 1, "dealers": {}, "commitments": [],'
        ' "member_tokens": {}}',
    ],
)
def test_rotate_finish_refuses_a_bad_plan_cleanly(tmp_path: Path, plan: str) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app as cli

    f = tmp_path / "plan.json"
    f.write_text(plan)
    r = CliRunner().invoke(cli, ["kms", "rotate-finish", "--plan", str(f), "--nodes-dir", str(tmp_path)])
    assert r.exit_code == 1, r.output
    assert "rotation plan" in r.output and "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_rotate_finish_refuses_while_a_node_does_not_serve_the_epoch(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app as cli

    e2 = local_joint_feldman(1, 2, epoch=2)
    f = tmp_path / "plan.json"
    f.write_text(
        json.dumps(
            {
                "kind": "rotate",
                "session": "00" * 16,
                "epoch": 2,
                "t": 1,
                "n": 2,
                "dealers": {"1": {"url": "https://127.0.0.1:1", "server_ca_pubkey": "00"}},
                "commitments": [c.hex() for c in e2[0].commitments],
                "member_tokens": {"1": "11" * 32, "2": "22" * 32},
            }
        )
    )
    (tmp_path / "1" / "kms").mkdir(parents=True)
    (tmp_path / "1" / "kms" / "endpoint.json").write_text(
        json.dumps({"url": "https://127.0.0.1:2", "epochs": {"1": "ab" * 32}, "join_error": "dealer 2: gone"})
    )
    r = CliRunner().invoke(cli, ["kms", "rotate-finish", "--plan", str(f), "--nodes-dir", str(tmp_path)])
    assert r.exit_code == 1, r.output
    assert "not complete" in r.output and "node 1: does not serve epoch 2 (dealer 2: gone)" in r.output
    assert "node 2: not serving" in r.output


def test_a_reshare_join_into_a_home_with_the_epochs_env_shares_saves_nothing(
    teecloud_home: Path, world: World
) -> None:
    """R7-2 (review 7): a reshare's new member joining into a home that already holds env shares of the
    round's epoch is refused before the round's root share is saved: the start fails with a clear error,
    the home keeps exactly what it held."""
    from teecloud.keys import threshold_ecdh as tx
    from teecloud.kms import launcher
    from teecloud.kms.errors import BootstrapError
    from teecloud.kms.threshold_carry import CarriedShares

    tee = SimulatedTdx(teecloud_home)
    identity = boot_kms_tee(tee)
    home = teecloud_home / "old-home"
    joined = local_joint_feldman(2, 3, epoch=1)[0]
    spec = KmsLaunch(
        tee=SimulatedTdx(teecloud_home),
        chain=world.chain,
        collateral=StaticCollateral(tee.collateral),
        dev=True,
        home=home,
        threshold=True,
        join=lambda _tee, _identity: joined,
        join_carried=CarriedShares(),
    )
    launcher._env_store(spec, identity, joined).put(1, bytes(20), tx.dkg_local(2, 3)[0])
    before = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    with pytest.raises(BootstrapError, match="already holds 1 env share"):
        launch_kms(spec)
    assert load_shares(tee, identity, home) == {}
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == before
