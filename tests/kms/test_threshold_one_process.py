"""One live process per share index (review 4, R4-4's second half): the operator records each member's
current boot-time peer key on KmsGroup, and members admit member i under that key only — a second process
of share i (a copy of node i's disk: same share, another boot-time key) is refused in both directions and in
a round, with the reason; recording the copy's key instead (a replaced process) moves admission to it."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from teecloud.chain import ContractReverted
from teecloud.chain.embedded import DEV_KEYS
from teecloud.chain.kmsgroup import CommitteeMember
from teecloud.keys.certs import spki_der
from teecloud.kms.errors import KmsClientError, KmsDenied
from teecloud.kms.peering import served_key_id
from teecloud.kms.threshold import ThresholdShare, local_joint_feldman
from tests.kms.conftest import World, stop_servers
from tests.kms.test_threshold_net_peering import Member, allow_build, hello, start_member
from tests.kms.test_threshold_net_presign import _fetch_as, _open_sigkey
from tests.review4.test_clones import rounds_of

pytestmark = pytest.mark.slow
T, N = 3, 5


def _key_id(m: Member) -> bytes:
    return hashlib.sha256(spki_der(m.identity.key.public_key())).digest()


@pytest.fixture
def group(teecloud_home: Path, world: World) -> Iterator[tuple[dict[int, Member], Member, int]]:
    """Five members of a committee of its own epoch (the module's chain is shared: another epoch's record
    touches no other test), and a copy of member 2 (a second boot of its share)."""
    allow_build(world.chain, teecloud_home)
    epoch = 1000 + secrets.randbelow(1 << 30)
    shares: list[ThresholdShare] = local_joint_feldman(T, N, epoch=epoch)
    members: dict[int, Member] = {}
    copy: Member | None = None
    try:
        for s in shares:
            members[s.index] = start_member(teecloud_home, world.chain, s, name=f"one{epoch}")
        copy = start_member(teecloud_home, world.chain, shares[1], name=f"copy{epoch}")
        kms_group = world.chain.kms_group
        cid = kms_group.record_committee(
            epoch,
            T,
            shares[0].commitments,
            [CommitteeMember(i, bytes([i]) * 32, bytes(32), m.server.url) for i, m in members.items()],
        )
        kms_group.activate(cid)
        yield members, copy, cid
    finally:
        stop_servers(m.server for m in [*members.values(), *([copy] if copy else [])])


def test_a_second_process_of_a_share_index_is_refused_once_keys_are_recorded(
    world: World, group: tuple[dict[int, Member], Member, int]
) -> None:
    members, copy, cid = group
    kms_group = world.chain.kms_group
    # no key recorded yet: steps (1)-(4) alone, both processes of share 2 admitted (documented)
    assert hello(copy, members[1]).index == 2
    # the operator records each member's current key (what `teecloud up` does at every start)
    served = {i: bytes.fromhex(served_key_id(m.server.url)) for i, m in members.items()}
    assert served == {i: _key_id(m) for i, m in members.items()}  # a member serves its peer key
    kms_group.record_peer_keys(cid, served)
    assert kms_group.committee(cid).peer_keys == served
    assert hello(members[2], members[1]).index == 2
    assert hello(members[1], members[2]).member is not None
    with pytest.raises(KmsDenied, match="another process of share 2") as refused:
        hello(copy, members[1])  # as a client: member 1 refuses it
    assert refused.value.step == "membership"
    with pytest.raises(KmsClientError, match="another process of share 2"):
        hello(members[3], copy)  # as a server: member 3 does not talk to it
    audit = members[1].service.audit.read(limit=5)
    assert audit[-1].decision == "denied" and "another process of share 2" in audit[-1].reason

    # in a round (R4-4's attack): the copy asking a dealer first is refused; its twin is then served
    session = _open_sigkey(members)
    vh3 = rounds_of(members[3])._rounds[bytes.fromhex(session)].views["deal"][0]
    status, body = _fetch_as(copy, members[3], session, vh3)
    assert status == 403 and body["step"] == "membership" and "shares" not in body, body
    status, body = _fetch_as(members[2], members[3], session, vh3)
    assert status == 200 and body["dealer"] == 3, body

    # the operator replaces member 2's process by the other one: admission follows the record at once
    kms_group.record_peer_keys(cid, {2: _key_id(copy)})
    assert hello(copy, members[1]).index == 2
    with pytest.raises(KmsDenied, match="another process of share 2"):
        hello(members[2], members[1])


def test_the_record_is_the_owners_and_names_members_only(
    world: World, group: tuple[dict[int, Member], Member, int]
) -> None:
    members, _, cid = group
    kms_group = world.chain.kms_group
    # the session's chain holds every kms test's blocks: read the log from here on (the committee was just
    # recorded without peer keys, as the record's peer_keys == {} below also says)
    start = world.chain.block_number()
    with pytest.raises(ContractReverted, match="not a member of this committee"):
        kms_group.record_peer_keys(cid, {9: bytes(31) + b"\x01"})
    with pytest.raises(ContractReverted, match="a peer key is not empty"):
        kms_group.record_peer_keys(cid, {1: bytes(32)})
    with pytest.raises(ContractReverted, match="no such committee"):
        kms_group.record_peer_keys(10**6, {1: _key_id(members[1])})
    stranger = world.chain.with_signer(DEV_KEYS[3])
    with pytest.raises(ContractReverted, match="not the owner"):
        stranger.kms_group.record_peer_keys(cid, {1: _key_id(members[1])})
    assert kms_group.committee(cid).peer_keys == {}
    logged = kms_group.conn.events("KmsGroup", kms_group.address, from_block=start, names=["PeerKeyRecorded"])
    assert all(e["args"]["committee_id"] != cid for e in logged)


def test_generated_mutations_of_the_recorded_key_refuse_the_member(
    world: World, group: tuple[dict[int, Member], Member, int]
) -> None:
    """Any other recorded value (each a one-bit flip of member 2's key) refuses member 2; its exact key
    admits it again."""
    members, _, cid = group
    kms_group = world.chain.kms_group
    key = _key_id(members[2])
    rng = secrets.SystemRandom()
    for bit in [0, 255, *rng.sample(range(1, 255), 3)]:
        mutated = bytearray(key)
        mutated[bit // 8] ^= 1 << (bit % 8)
        kms_group.record_peer_keys(cid, {2: bytes(mutated)})
        with pytest.raises(KmsDenied, match="another process of share 2"):
            hello(members[2], members[1])
    kms_group.record_peer_keys(cid, {2: key})
    assert hello(members[2], members[1]).index == 2


def test_kms_peer_keys_records_what_the_members_serve(
    teecloud_home: Path, group: tuple[dict[int, Member], Member, int]
) -> None:
    """`teecloud kms peer-keys` (after a node was restarted by hand): the key each member of the serving
    committee serves now goes on chain; unchanged keys are not sent again; a member that does not answer is
    a clear error and nothing is recorded."""
    from typer.testing import CliRunner

    from teecloud.chain import ChainClient
    from teecloud.cli import app as cli

    members, _, _ = group
    c = ChainClient.embedded(teecloud_home)  # the CLI's own chain (data_home), one process at a time
    c.deploy()
    cid = c.kms_group.record_committee(
        1,
        T,
        [bytes([j]) * 32 for j in range(1, T + 1)],
        [CommitteeMember(i, bytes([i]) * 32, bytes(32), m.server.url) for i, m in members.items()],
    )
    c.kms_group.activate(cid)
    c.close()
    runner = CliRunner()
    r = runner.invoke(cli, ["kms", "peer-keys"])
    assert r.exit_code == 0, r.output
    assert r.output.count("recorded") == N
    c = ChainClient.embedded(teecloud_home)
    assert c.kms_group.committee(cid).peer_keys == {i: _key_id(m) for i, m in members.items()}
    c.close()
    r = runner.invoke(cli, ["kms", "peer-keys"])
    assert r.exit_code == 0 and r.output.count("unchanged") == N, r.output
    members[5].server.stop()
    r = runner.invoke(cli, ["kms", "peer-keys"])
    assert r.exit_code == 1 and "cannot read the peer key served at" in r.output, r.output
    assert "Traceback" not in r.output
