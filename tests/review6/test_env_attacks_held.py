"""Attacks on the threshold env-secret path that HELD (each test asserts the refusal, so it fails if the
defence regresses): a compromised guest steering the partial with its own genuine boot certificate, the
boot certificate replayed, the env DKG from a non-member / an unlisted build, replayed and stale DKG
messages and generated mutations of them, a coordinator redirecting a member's sub-share fetch, a member
restarting between finish and commit, a coordinator naming the key to sign, and t−1 nodes serving another
app's genuinely signed key to the deployer."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.appcompose import compose_hash
from teecloud.keys import threshold_ecdh as tx
from teecloud.keys.envcrypt import encrypt_env
from teecloud.kms import api
from teecloud.kms.client import KmsClient
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.threshold import local_joint_feldman
from teecloud.kms.threshold_client import fetch_env_public_key
from teecloud.tee.simulated import SimulatedTdx
from tests.kms._threshold_env_world import T, boot_with_env, env_files, kms_clients, provider_for, pubkey
from tests.kms.conftest import World, post_with_cert
from tests.kms.test_threshold_net_peering import Member, client, start_member
from tests.kms.test_threshold_nodes import HELLO, boot_hello

pytestmark = pytest.mark.slow

Captured = tuple[ec.EllipticCurvePrivateKey, bytes, dict[str, Any]]


def _capture(clients: dict[int, KmsClient], path: str) -> dict[int, Captured]:
    """Record, per node, the RA-TLS client key + certificate and body the CVM sent on `path` (what a guest
    compromised after boot would hold if it could read its agent's boot-time key)."""
    got: dict[int, Captured] = {}
    for i, c in clients.items():
        real = c._boot_call  # a boot's calls go over its kept connection with the boot's credential

        def spy(
            session: Any, p: str, model: Any, body: Any, deadline: float, *, i: int = i, real: Any = real
        ) -> Any:
            answer = real(session, p, model, body, deadline)
            cc = session.client_cert
            if p == path and cc is not None:
                key = serialization.load_pem_private_key(cc[0].encode(), password=None)
                assert isinstance(key, ec.EllipticCurvePrivateKey)
                der = x509.load_pem_x509_certificate(cc[1].encode()).public_bytes(serialization.Encoding.DER)
                got[i] = (key, der, dict(body or {}))
            return answer

        c._boot_call = spy  # type: ignore[method-assign]
    return got


def test_a_guest_with_its_own_boot_certificate_cannot_steer_the_partial(
    teecloud_home: Path, world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    """The app A CVM's genuine boot-time certificate, replayed with edited bodies: nothing in the body
    chooses the app (extra fields are refused, the epoch must be one A's measured compose names, another
    app's compose does not hash to A's measurement); a different point is answered under A's share only;
    and the certificate's uses are bounded by the node's boot challenge (8)."""
    nodes, signing_key = members
    app_a = world.register(compose_hash(HELLO))
    compose_b = dict(HELLO, name="steer-b")
    app_b = world.register(compose_hash(compose_b))
    pub_a = bytes.fromhex(pubkey(nodes[1], app_a).public_key)
    pub_b = bytes.fromhex(pubkey(nodes[1], app_b).public_key)
    blob_a, blob_b = encrypt_env(pub_a, {"A": "a"}), encrypt_env(pub_b, {"B": "b"})
    provider = provider_for(nodes, signing_key, SimulatedTdx(teecloud_home))
    got = _capture(provider._clients, api.PATH_THRESHOLD_ENV_PARTIAL)
    provider.bind_encrypted_env(blob_a)
    boot_hello(teecloud_home, world, provider, app_id=app_a)
    assert len(got) >= T

    for i, (key, der, body) in sorted(got.items()):
        url = nodes[i].server.url
        path = api.PATH_THRESHOLD_ENV_PARTIAL
        # extra fields naming another app / instance / share: 400 before anything (extra="forbid")
        for extra in (
            {"app_id": app_b.hex()},
            {"instance_id": "00" * 20},
            {"index": 2},
            {"point": "00" * 32},
        ):
            status, ans = post_with_cert(url, path, key, der, {**body, **extra})
            assert status == 400 and "element" not in ans, (i, extra, ans)
        # an epoch A's measured compose does not name
        status, ans = post_with_cert(url, path, key, der, {**body, "epoch": 2})
        assert status == 403 and ans["step"] == "epoch", (i, ans)
        # app B's compose with A's evidence: the compose must hash to the measured compose-hash
        status, ans = post_with_cert(url, path, key, der, {**body, "app_compose": json.dumps(compose_b)})
        assert status == 403 and ans["step"] == "app_compose" and "element" not in ans, (i, ans)
        # B's env point with A's certificate: answered, but for app A, with A's share (x_A,i·P_B)
        status, ans = post_with_cert(url, path, key, der, {**body, "ephemeral_key": blob_b[:32].hex()})
        assert status == 200, (i, ans)
        share_a = nodes[i].service.env_keys.store.get(1, app_a)  # type: ignore[union-attr]
        assert share_a is not None
        assert ans["app_id"] == app_a.hex()
        assert ans["element"] == tx._mul(share_a.share, tx.ephemeral_point(blob_b)).hex()
        # replayed again and again: the node's boot challenge runs out (at most 8 uses in its window)
        statuses = [post_with_cert(url, path, key, der, body) for _ in range(9)]
        assert statuses[-1][0] == 403 and statuses[-1][1]["step"] == "boot_nonce", (i, statuses[-1])
        assert sum(s == 200 for s, _ in statuses) <= 8


def test_the_env_dkg_refuses_a_non_member_and_an_unlisted_build(
    teecloud_home: Path, world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    nodes, _ = members
    app_id = world.register(compose_hash(dict(HELLO, name="dkg-outsider")))
    body = {"session": "ab" * 16, "epoch": 1, "app_id": app_id.hex()}
    # a booted, allowed KMS build holding a share of ANOTHER committee (same t, n, epoch, index)
    stranger = start_member(teecloud_home, world.chain, local_joint_feldman(T, 5, epoch=1)[3], name="r6s")
    # a build KmsAuth does not list, holding a GENUINE share of this committee
    genuine = nodes[4].service.threshold._share  # type: ignore[union-attr]
    rogue = start_member(teecloud_home, world.chain, genuine, build="r6-rogue-build", name="r6r")
    try:
        for who, step in ((stranger, "membership"), (rogue, "chain")):
            c = client(who, nodes[1])
            for path, model, b in (
                (api.PATH_PEER_ENV_DKG, api.PeerEnvDkgResponse, {**body, "stage": "deal"}),
                (
                    api.PATH_PEER_ENV_SHARE,
                    api.PeerEnvShareResponse,
                    {"session": "ab" * 16, "view_hash": "0" * 64},
                ),
                (
                    api.PATH_PEER_ENV_SIGN,
                    api.PeerEnvSignResponse,
                    {"epoch": 1, "app_id": app_id.hex(), "timestamp": 0, "sessions": []},
                ),
            ):
                with pytest.raises((KmsDenied, KmsClientError)) as err:
                    c.peer_call(path, model, b)
                assert step in str(err.value) or getattr(err.value, "step", "") == step, (path, err.value)
        assert all(f == [] for f in env_files(nodes).values())  # no dealing was sealed, none is open
        assert all(not m.service.env_keys._open for m in nodes.values())  # type: ignore[union-attr]
    finally:
        stranger.server.stop()
        rogue.server.stop()


def test_replayed_and_stale_dkg_messages_change_nothing(
    world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    """Every stage message and sub-share request of a finished ceremony, replayed by a genuine member: no
    new dealing, no sub-share, no sealing replaced, the same key served."""
    nodes, _ = members
    app_id = world.register(compose_hash(dict(HELLO, name="dkg-replay")))
    seen: list[api.PeerEnvDkgRequest] = []
    shares_asked: list[tuple[int, api.PeerEnvShareRequest]] = []
    env2 = nodes[2].service.env_keys
    assert env2 is not None
    real_stage, real_share = env2.stage, env2.serve_share

    def rec_stage(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        seen.append(req)
        return real_stage(req)

    def rec_share(node: Any, req: api.PeerEnvShareRequest) -> tuple[int, bytes]:
        shares_asked.append((node.index, req))
        return real_share(node, req)

    env2.stage, env2.serve_share = rec_stage, rec_share  # type: ignore[method-assign]
    first = pubkey(nodes[1], app_id).public_key
    env2.stage, env2.serve_share = real_stage, real_share  # type: ignore[method-assign]
    # the ceremony's stages on member 2 (R7-1's two-phase commit adds `confirm`; the other members' polls
    # while they settle are `held`)
    assert [r.stage for r in seen if r.stage != "held"] == ["deal", "view", "finish", "commit", "confirm"]
    sealed = {
        i: (m.service.env_keys.store.dir / f"1-{app_id.hex()}.sealed").read_bytes() for i, m in nodes.items()
    }  # type: ignore[union-attr]
    coordinator = client(nodes[1], nodes[2])
    for req in seen:
        b = req.model_dump(exclude={"member"})
        if req.stage in ("deal", "held", "confirm"):
            ans = coordinator.peer_call(api.PATH_PEER_ENV_DKG, api.PeerEnvDkgResponse, b)
            assert ans.held and not ans.tentative  # no new dealing: it answers its sealed commitments
        else:
            with pytest.raises(KmsClientError, match="no open env-key ceremony"):
                coordinator.peer_call(api.PATH_PEER_ENV_DKG, api.PeerEnvDkgResponse, b)
    assert {i for i, _ in shares_asked} == {1, 3, 4, 5}
    for i, req in shares_asked:
        with pytest.raises((KmsDenied, KmsClientError), match="no open env-key ceremony"):
            client(nodes[i], nodes[2]).peer_call(
                api.PATH_PEER_ENV_SHARE, api.PeerEnvShareResponse, req.model_dump(exclude={"member"})
            )
    # a made-up (stale) session: every stage after deal finds no ceremony
    for stage in ("view", "finish", "commit"):
        with pytest.raises(KmsClientError, match="no open env-key ceremony"):
            coordinator.peer_call(
                api.PATH_PEER_ENV_DKG,
                api.PeerEnvDkgResponse,
                {"stage": stage, "session": "cd" * 16, "epoch": 1, "app_id": app_id.hex()},
            )
    after = {
        i: (m.service.env_keys.store.dir / f"1-{app_id.hex()}.sealed").read_bytes() for i, m in nodes.items()
    }  # type: ignore[union-attr]
    assert after == sealed
    assert {pubkey(m, app_id).public_key for m in nodes.values()} == {first}


def test_a_member_restarting_between_finish_and_commit_never_yields_a_second_key(
    teecloud_home: Path, world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    """Member 5 loses its pending share (a restart) just before commit: the others seal, member 5's commit
    fails and the coordinator repairs it at once by share recovery (issue 19: never a second ceremony); every
    node serves ONE key, member 5's recovered share is of the same sharing, and a boot decrypts."""
    nodes, signing_key = members
    app_id = world.register(compose_hash(HELLO))  # a fresh app; its CVM boots HELLO
    env5 = nodes[5].service.env_keys
    assert env5 is not None
    real = env5.stage

    def restart_before_commit(req: api.PeerEnvDkgRequest) -> api.PeerEnvDkgResponse:
        if req.stage == "commit":
            env5._open.clear()  # the process restarted: its in-memory dealing and pending share are gone
        return real(req)

    env5.stage = restart_before_commit  # type: ignore[method-assign]
    first = pubkey(nodes[1], app_id).public_key
    env5.stage = real  # type: ignore[method-assign]
    files = env_files(nodes)
    assert all(len(files[i]) == 1 for i in (1, 2, 3, 4, 5))
    held = [m.service.env_keys.store.get(1, app_id) for m in nodes.values()]  # type: ignore[union-attr]
    assert len({h.commitments for h in held if h is not None}) == 1 and all(h is not None for h in held)
    served = {pubkey(m, app_id).public_key for m in nodes.values()}
    assert served == {first}
    pub = bytes.fromhex(served.pop())
    blob = encrypt_env(pub, {"K": "restart"})
    provider = boot_with_env(
        teecloud_home, world, nodes, signing_key, SimulatedTdx(teecloud_home), blob, app_id=app_id
    )
    from teecloud.keys.envcrypt import decrypt_env_with_shared_secret

    assert decrypt_env_with_shared_secret(provider.env_shared_secret or b"", blob) == {"K": "restart"}


def test_the_key_to_sign_is_never_named_by_the_coordinator_and_t_minus_1_liars_lose(
    teecloud_home: Path, world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    nodes, signing_key = members
    app_a = world.register(compose_hash(dict(HELLO, name="sig-a")))
    app_b = world.register(compose_hash(dict(HELLO, name="sig-b")))
    pub_a = bytes.fromhex(pubkey(nodes[1], app_a).public_key)
    answer_b = pubkey(nodes[1], app_b)
    # a coordinator (a genuine member) naming the key, digest or message to sign: refused (strict model)
    c = client(nodes[1], nodes[2])
    base = {"epoch": 1, "app_id": app_a.hex(), "timestamp": int(time.time()), "sessions": []}
    for extra in ({"public_key": answer_b.public_key}, {"digest": "00" * 32}, {"message": "x"}):
        with pytest.raises((KmsDenied, KmsClientError), match="Extra inputs are not permitted"):
            c.peer_call(api.PATH_PEER_ENV_SIGN, api.PeerEnvSignResponse, {**base, **extra})
    # the probe answers the member's OWN key for the app it names
    probe = c.peer_call(api.PATH_PEER_ENV_SIGN, api.PeerEnvSignResponse, base)
    assert probe.public_key == pub_a.hex() and probe.shares == []
    # t−1 nodes (the lowest, asked first, among them) serve app B's genuinely signed answer for app A
    for i in (1, 2):
        env = nodes[i].service.env_keys
        assert env is not None
        env.public_key = lambda epoch, app: answer_b  # type: ignore[method-assign,assignment,misc]
    dev = SimulatedTdx(teecloud_home)
    clients = kms_clients(nodes, dev)
    got, faults = fetch_env_public_key(clients, app_a, t=T, signing_key=signing_key)
    assert got == pub_a and set(faults) == {1, 2}
    assert all("does not recover to the group" in faults[i] for i in (1, 2))


def test_generated_dkg_messages_from_a_member_never_seal_nor_500(
    world: World, members: tuple[dict[int, Member], bytes]
) -> None:
    """Generated mutations of the peer messages a genuine member can send (stages out of order, altered
    views, non-point commitments, unknown app / epoch, bad sessions): each is a clear refusal (never an
    HTTP 500), nothing is sealed, and the app's key is then made once by an honest ceremony."""
    import random

    nodes, _ = members
    app_id = world.register(compose_hash(dict(HELLO, name="dkg-mutations")))
    stranger_app = bytes.fromhex("66" * 20)  # not registered
    c = client(nodes[1], nodes[3])
    rng = random.Random(66)
    not_point = "ff" * 31 + "7f"  # y = p + ... (non-canonical): not a valid point encoding
    session = "5e" * 16
    good_deal = {"stage": "deal", "session": session, "epoch": 1, "app_id": app_id.hex()}
    deal = c.peer_call(api.PATH_PEER_ENV_DKG, api.PeerEnvDkgResponse, good_deal)  # opens member 3's dealing
    mine = deal.commitments
    view_ok = {
        str(i): [tx._mul_base(rng.randrange(1, tx.ORDER)).hex() for _ in range(T)] for i in range(1, 6)
    }
    view_ok["3"] = mine
    bodies: list[dict[str, Any]] = [
        {**good_deal, "app_id": stranger_app.hex(), "session": "01" * 16},
        {**good_deal, "epoch": 2, "session": "02" * 16},
        {**good_deal, "stage": "finish"},  # finish before view
        {**good_deal, "stage": "commit", "commitments": mine},  # commit before finish
        {**good_deal, "stage": "view", "view": {**view_ok, "3": view_ok["2"]}},  # its own altered
    ]
    for b in bodies:
        with pytest.raises((KmsDenied, KmsClientError)) as err:
            c.peer_call(api.PATH_PEER_ENV_DKG, api.PeerEnvDkgResponse, b)
        assert "500" not in str(err.value) and "nternal" not in str(err.value), (b, err.value)
    # generated: a fresh dealing at member 3 each time, then a view with a non-point commitment or fewer
    # dealers than the quorum (ceremony_quorum: 4 of 5); the view is refused or hashed, and finish is refused
    # (no sub-share, not a point): never sealed
    for k in range(8):
        sess = rng.randbytes(16).hex()
        opened = c.peer_call(api.PATH_PEER_ENV_DKG, api.PeerEnvDkgResponse, {**good_deal, "session": sess})
        v = {i: list(cs) for i, cs in view_ok.items()}
        v["3"] = opened.commitments
        other = str(rng.choice([1, 2, 4, 5]))
        if k % 2:
            for gone in rng.sample(["1", "2", "4", "5"], 2):
                v.pop(gone)
        else:
            v[other][rng.randrange(T)] = not_point
        for stage, extra in (("view", {"view": v}), ("finish", {})):
            try:
                answer = c.peer_call(
                    api.PATH_PEER_ENV_DKG,
                    api.PeerEnvDkgResponse,
                    {**good_deal, "session": sess, "stage": stage, **extra},
                )
                assert k % 2 == 0, (k, stage)  # only a full view is hashed
                if stage == "finish":  # no sub-share from a dealer: named in `accused` (R8-1), no result
                    assert answer.accused in (1, 2, 4, 5) and not answer.commitments, (k, answer)
            except (KmsDenied, KmsClientError) as exc:
                assert "500" not in str(exc) and "nternal" not in str(exc), (k, stage, exc)
        c.peer_call(
            api.PATH_PEER_ENV_DKG, api.PeerEnvDkgResponse, {**good_deal, "session": sess, "stage": "abort"}
        )
    # member 3 dropped the dealing whose view altered its own: the honest ceremony now runs
    assert all(f == [] for f in env_files(nodes).values())
    first = pubkey(nodes[2], app_id).public_key
    assert {pubkey(m, app_id).public_key for m in nodes.values()} == {first}
    assert all(len(f) == 1 for f in env_files(nodes).values())


def test_a_coordinator_pointing_a_member_at_another_node_for_a_sub_share_gets_nothing_sealed(
    world: World, members: tuple[dict[int, Member], bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """`finish` carries the coordinator's map of member URLs (it overrides the member's own). A coordinator
    (here member 1, driving the stages by hand) tells member 3 that member 2 lives at member 4's URL: the
    member's peer client expects index 2 there, so the fetch fails, the ceremony fails (member 3 names
    dealer 2 in its answer's `accused` field, review 8 R8-1, and logs why), nothing is sealed."""
    nodes, _ = members
    app_id = world.register(compose_hash(dict(HELLO, name="redirect")))
    base = {"session": "7a" * 16, "epoch": 1, "app_id": app_id.hex()}
    env1 = nodes[1].service.env_keys
    assert env1 is not None

    def on(i: int, body: dict[str, Any]) -> api.PeerEnvDkgResponse:
        if i == 1:
            return env1.stage(api.PeerEnvDkgRequest.model_validate(body))
        return client(nodes[1], nodes[i]).peer_call(api.PATH_PEER_ENV_DKG, api.PeerEnvDkgResponse, body)

    deals = {i: on(i, {**base, "stage": "deal"}) for i in nodes}
    view = {str(i): a.commitments for i, a in deals.items()}
    hashes = {on(i, {**base, "stage": "view", "view": view}).view_hash for i in nodes}
    assert len(hashes) == 1
    urls = {str(i): m.server.url for i, m in nodes.items()}
    with caplog.at_level(logging.WARNING, logger="teecloud.kms.threshold_env"):
        answer = on(3, {**base, "stage": "finish", "peers": {**urls, "2": nodes[4].server.url}})
    assert answer.accused == 2 and not answer.commitments
    assert "proved membership as share 4, not 2" in caplog.text
    with pytest.raises((KmsDenied, KmsClientError)):  # member 3 dropped the ceremony
        on(3, {**base, "stage": "commit", "commitments": deals[3].commitments})
    for i in nodes:
        on(i, {**base, "stage": "abort"})
    assert all(f == [] for f in env_files(nodes).values())
