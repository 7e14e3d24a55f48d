"""KmsGroup: the threshold KMS's committees on chain (both real EVMs): recorded, activated, read back; a
reshare keeps the epoch's group key (enforced on chain); only the owner writes; the events are the log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teecloud.chain import ChainClient, ContractReverted
from teecloud.chain.kmsgroup import CommitteeMember

from .helpers import rand32


def _members(n: int, first: int = 1) -> list[CommitteeMember]:
    return [
        CommitteeMember(i, rand32(), rand32(), f"https://127.0.0.1:{9000 + i}")
        for i in range(first, first + n)
    ]


def test_dkg_then_reshare_to_a_bigger_committee(chain: ChainClient) -> None:
    group = chain.kms_group
    key = rand32()
    dkg = [key, rand32(), rand32()]
    members = _members(5)
    cid = group.record_committee(1, 3, dkg, members)
    assert group.active(1) is None  # recorded is not serving
    group.activate(cid)
    served = group.active(1)
    assert served is not None
    assert (served.committee_id, served.epoch, served.t, served.n) == (cid, 1, 3, 5)
    assert served.commitments == tuple(dkg) and served.group_public_key == key
    assert served.members == tuple(members)
    assert served.urls[5] == "https://127.0.0.1:9005"

    reshared = [key, rand32(), rand32(), rand32()]  # 4-of-7, same group key
    cid2 = group.record_committee(1, 4, reshared, _members(7, first=1))
    group.activate(cid2)
    now = group.active(1)
    assert now is not None and (now.committee_id, now.t, now.n) == (cid2, 4, 7)
    assert group.group_key(1) == key

    log = [e["event"] for e in group.history()]
    assert log.count("CommitteeRecorded") == 2 and log.count("MemberRecorded") == 12
    assert log.count("CommitteeActivated") == 2
    activated = [e["args"] for e in group.history() if e["event"] == "CommitteeActivated"]
    assert activated[-1]["previous"] == cid and activated[-1]["committee_id"] == cid2
    with pytest.raises(ContractReverted, match="newer committee already serves"):
        group.activate(cid)  # no rollback to the committee the key was moved away from


def test_a_reshare_cannot_change_the_group_key(chain: ChainClient) -> None:
    group = chain.kms_group
    group.record_committee(2, 2, [rand32(), rand32()], _members(3))
    with pytest.raises(ContractReverted, match="keeps the epoch's group key"):
        group.record_committee(2, 2, [rand32(), rand32()], _members(3))
    group.record_committee(3, 2, [rand32(), rand32()], _members(3))  # a new epoch may have a new key


@pytest.mark.parametrize(
    ("t", "n_commitments", "n_members", "reason"),
    [
        (0, 0, 3, "need 1 <= t <= n"),
        (4, 4, 3, "need 1 <= t <= n"),
        (2, 3, 3, "need exactly t commitments"),
        (3, 2, 3, "need exactly t commitments"),
    ],
)
def test_malformed_committees_revert(
    chain: ChainClient, t: int, n_commitments: int, n_members: int, reason: str
) -> None:
    with pytest.raises(ContractReverted, match=reason):
        chain.kms_group.record_committee(7, t, [rand32() for _ in range(n_commitments)], _members(n_members))


def test_member_rules_revert(chain: ChainClient) -> None:
    group = chain.kms_group
    twice = [*_members(2), CommitteeMember(2, rand32(), rand32(), "https://x")]
    with pytest.raises(ContractReverted, match="indices must increase"):
        chain.transact(
            "KmsGroup",
            chain.kms_group_address,
            "record_committee",
            8,
            2,
            [rand32(), rand32()],
            [m.to_abi() for m in twice],
        )
    with pytest.raises(ContractReverted, match="needs its measurement"):
        group.record_committee(8, 1, [rand32()], [CommitteeMember(1, bytes(32), rand32(), "https://x")])
    with pytest.raises(ContractReverted, match="group key is empty"):
        group.record_committee(8, 1, [bytes(32)], _members(1))
    with pytest.raises(ContractReverted, match="no such committee"):
        group.activate(999)


def test_only_the_owner_records_and_activates(chain: ChainClient) -> None:
    cid = chain.kms_group.record_committee(9, 1, [rand32()], _members(1))
    stranger = chain.with_signer(chain.keys[3])  # type: ignore[attr-defined]
    with pytest.raises(ContractReverted, match="not the owner"):
        stranger.kms_group.record_committee(9, 1, [rand32()], _members(1))
    with pytest.raises(ContractReverted, match="not the owner"):
        stranger.kms_group.activate(cid)


def test_member_values_are_checked_before_sending() -> None:
    with pytest.raises(ValueError, match="index"):
        CommitteeMember(0, rand32(), rand32(), "https://x")
    with pytest.raises(ValueError, match="URL"):
        CommitteeMember(1, rand32(), rand32(), "https://" + "x" * 300)


def test_a_deployment_made_before_kms_group_gains_it_and_keeps_the_rest(
    embedded_chain: ChainClient, teecloud_home: Path
) -> None:
    path = teecloud_home / "chain" / "deployment.json"
    data = json.loads(path.read_text())
    (entry,) = data.values()
    old = {k: v for k, v in entry.items() if k != "KmsGroup"}
    data = {k: old for k in data}
    path.write_text(json.dumps(data))
    embedded_chain._deployment_cache = None  # as a process that reads the file afresh
    added = embedded_chain.deploy()
    assert {k: added[k] for k in old} == old and added["KmsGroup"] != entry["KmsGroup"]
    assert embedded_chain.kms_group.active(1) is None
    assert "KmsGroup" in json.loads(path.read_text())[embedded_chain.chain_key]


def test_cli_shows_the_serving_committee_and_its_log(teecloud_home: Path) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app as cli

    with ChainClient.embedded(teecloud_home) as c:  # one process holds the embedded chain at a time
        c.deploy()
    runner = CliRunner()
    r = runner.invoke(cli, ["kms", "group"])
    assert r.exit_code == 1 and "no KMS committee serves epoch 1" in r.output and "Traceback" not in r.output
    members = _members(3)
    c = ChainClient.embedded(teecloud_home)
    cid = c.kms_group.record_committee(1, 2, [b"\x11" * 32, rand32()], members)
    c.kms_group.activate(cid)
    c.close()
    r = runner.invoke(cli, ["kms", "group", "--json", "--history"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert (doc["t"], doc["n"], doc["group_public_key"]) == (2, 3, "11" * 32)
    assert [m["url"] for m in doc["members"]] == [m.url for m in members]
    assert [e["event"] for e in doc["history"]][-1] == "CommitteeActivated"
    r = runner.invoke(cli, ["kms", "group"])
    assert r.exit_code == 0 and "2 of 3" in r.output
    assert "signing key       none recorded" in r.output
    c = ChainClient.embedded(teecloud_home)
    key = _compressed_key()
    c.kms_group.record_signing_key(1, key)
    c.close()
    r = runner.invoke(cli, ["kms", "group", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["signing_key"] == key.hex(), r.output
    r = runner.invoke(cli, ["kms", "group", "--json", "--finality-depth", "1"])  # one block below: not yet
    assert r.exit_code == 0 and json.loads(r.output)["signing_key"] is None, r.output
    r = runner.invoke(cli, ["kms", "group", "--finality-depth", "1000"])
    assert r.exit_code == 1 and "fewer than the finality depth" in r.output and "Traceback" not in r.output


def _compressed_key() -> bytes:
    import coincurve

    return coincurve.PrivateKey().public_key.format(compressed=True)


def test_the_signing_key_is_recorded_once_after_its_committee(chain: ChainClient) -> None:
    group = chain.kms_group
    key = _compressed_key()
    with pytest.raises(ContractReverted, match="no committee recorded for this epoch"):
        group.record_signing_key(11, key)
    group.activate(group.record_committee(11, 2, [rand32(), rand32()], _members(3)))
    assert group.signing_key(11) is None
    group.record_signing_key(11, key)
    assert group.signing_key(11) == key
    with pytest.raises(ContractReverted, match="recorded once"):
        group.record_signing_key(11, _compressed_key())  # a new signing key is a new epoch
    stranger = chain.with_signer(chain.keys[3])  # type: ignore[attr-defined]
    with pytest.raises(ContractReverted, match="not the owner"):
        stranger.kms_group.record_signing_key(11, key)
    recorded = [e["args"] for e in group.history() if e["event"] == "SigningKeyRecorded"]
    assert recorded[-1]["epoch"] == 11 and bytes(recorded[-1]["signing_key"]) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [(b"\x04" + bytes(32), "compressed point"), (b"\x02" + bytes(31), "33 bytes"), (b"", "33 bytes")],
)
def test_a_malformed_signing_key_reverts(chain: ChainClient, key: bytes, reason: str) -> None:
    chain.kms_group.record_committee(12, 1, [rand32()], _members(1))
    with pytest.raises(ValueError, match="33-byte SEC1"):
        chain.kms_group.record_signing_key(12, key)  # the facade refuses before sending
    with pytest.raises(ContractReverted, match=reason):
        chain.transact("KmsGroup", chain.kms_group_address, "record_signing_key", 12, key)


def test_records_read_at_a_finality_depth(chain: ChainClient) -> None:
    """A record counts once it is `depth` blocks deep: read at the block that many below the head (each
    transaction here mines one block)."""
    group = chain.kms_group
    cid = group.record_committee(13, 1, [rand32()], _members(1))
    group.activate(cid)
    key = _compressed_key()
    group.record_signing_key(13, key)
    assert group.signing_key(13, at=group.final_block(0)) == key
    assert group.signing_key(13, at=group.final_block(1)) is None  # one block below: not recorded yet
    below = group.final_block(2)
    assert group.active(13, at=below) is None  # recorded, not yet activated there
    head = chain.head()
    assert below.number == head.number - 2
    for other in (14, 15):  # two more blocks on top
        group.record_committee(other, 1, [rand32()], _members(1))
    assert group.signing_key(13, at=group.final_block(2)) == key
    committee = group.active(13, at=group.final_block(2))
    assert committee is not None and committee.committee_id == cid
    with pytest.raises(ValueError, match="finality depth"):
        group.final_block(-1)
    from teecloud.chain import ChainError

    with pytest.raises(ChainError, match="fewer than the finality depth"):
        group.final_block(chain.head().number + 1)


def test_members_current_peer_keys_are_recorded_and_replaced(chain: ChainClient) -> None:
    group = chain.kms_group
    cid = group.record_committee(16, 2, [rand32(), rand32()], _members(3))
    assert group.committee(cid).peer_keys == {}
    first = {1: rand32(), 3: rand32()}
    group.record_peer_keys(cid, first)
    assert group.committee(cid).peer_keys == first  # member 2 has none yet
    restarted = rand32()
    group.record_peer_keys(cid, {3: restarted})  # a restarted member's new key replaces its old one
    assert group.committee(cid).peer_keys == {1: first[1], 3: restarted}
    with pytest.raises(ContractReverted, match="not a member of this committee"):
        group.record_peer_keys(cid, {4: rand32()})
    with pytest.raises(ContractReverted, match="one key per index"):
        chain.transact("KmsGroup", chain.kms_group_address, "record_peer_keys", cid, [1, 2], [rand32()])
    logged = [e["args"] for e in group.history() if e["event"] == "PeerKeyRecorded"]
    assert [(e["index"], bytes(e["peer_key"])) for e in logged if e["committee_id"] == cid][-1] == (
        3,
        restarted,
    )


def _p256_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    )


def test_the_group_ca_key_and_root_hash_are_recorded_once_after_the_committee(chain: ChainClient) -> None:
    group = chain.kms_group
    key, root_hash = _p256_key(), rand32()
    with pytest.raises(ContractReverted, match="no committee recorded for this epoch"):
        group.record_ca(21, key, root_hash)
    group.activate(group.record_committee(21, 2, [rand32(), rand32()], _members(3)))
    assert group.group_ca(21) is None
    group.record_ca(21, key, root_hash)
    recorded = group.group_ca(21)
    assert recorded is not None and (recorded.ca_key, recorded.root_cert_hash) == (key, root_hash)
    with pytest.raises(ContractReverted, match="recorded once"):
        group.record_ca(21, key, rand32())  # another root is a new epoch
    stranger = chain.with_signer(chain.keys[3])  # type: ignore[attr-defined]
    with pytest.raises(ContractReverted, match="not the owner"):
        stranger.kms_group.record_ca(21, key, root_hash)
    log = [e["args"] for e in group.history() if e["event"] == "CaRecorded"]
    assert log[-1]["epoch"] == 21 and bytes(log[-1]["ca_key"]) == key
    assert bytes(log[-1]["root_cert_hash"]) == root_hash


@pytest.mark.parametrize(
    ("key", "root_hash", "reason"),
    [
        (b"\x04" + bytes(32), b"\x01" * 32, "compressed point"),
        (b"\x02" + bytes(31), b"\x01" * 32, "33 bytes"),
        (b"\x02" + bytes(32), bytes(32), "root certificate hash is empty"),
    ],
)
def test_a_malformed_ca_record_reverts(chain: ChainClient, key: bytes, root_hash: bytes, reason: str) -> None:
    chain.kms_group.record_committee(22, 1, [rand32()], _members(1))
    with pytest.raises(ContractReverted, match=reason):
        chain.transact("KmsGroup", chain.kms_group_address, "record_ca", 22, key, root_hash)


def _root_pem(not_before: int) -> str:
    """A self-signed root of the group root's shape (its key a whole P-256 key: a stand-in here)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    from teecloud.keys import threshold_certs as tc
    from teecloud.keys.certs import cert_to_pem

    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    to_sign = tc.root_ca_to_sign(pub, not_before=not_before)
    r, s = decode_dss_signature(key.sign(to_sign.tbs, ec.ECDSA(hashes.SHA256())))
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return cert_to_pem(tc.assemble_certificate(to_sign, sig, key.public_key()))


def test_cli_checks_a_root_certificate_against_the_chain(teecloud_home: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app as cli
    from teecloud.kms.threshold_client import group_ca_record

    good, other = _root_pem(1_700_000_000), _root_pem(1_700_000_000)
    (tmp_path / "good.pem").write_text(good)
    (tmp_path / "other.pem").write_text(other)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with ChainClient.embedded(teecloud_home) as c:
        c.deploy()
        c.kms_group.activate(c.kms_group.record_committee(1, 1, [rand32()], _members(1)))
    runner = CliRunner()
    r = runner.invoke(cli, ["kms", "group", "--root-cert", str(tmp_path / "good.pem")])
    assert r.exit_code == 1 and "records no group CA for epoch 1" in r.output and "Traceback" not in r.output
    with ChainClient.embedded(teecloud_home) as c:
        c.kms_group.record_ca(1, *group_ca_record(good))
    r = runner.invoke(cli, ["kms", "group", "--json", "--root-cert", str(tmp_path / "good.pem")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["root_cert"] == "matches the chain's record"
    assert (bytes.fromhex(doc["ca_key"]), bytes.fromhex(doc["ca_root_sha256"])) == group_ca_record(good)
    for bad in ("other.pem", "junk.pem", "missing.pem"):
        r = runner.invoke(cli, ["kms", "group", "--root-cert", str(tmp_path / bad)])
        assert r.exit_code == 1 and "not the group root CA KmsGroup records" in r.output, r.output
        assert "Traceback" not in r.output
