# pragma version 0.4.3
"""
@title KmsGroup
@notice The threshold KMS's committees, on chain (docs/kms.md, "Threshold mode"): for every root epoch, the
        group public key and share commitments of each committee that holds it (a DKG creates the first,
        every reshare a new one), its members (share index, measurement, device, URL), and which committee
        serves. Clients take the group they combine under from here, not from an operator's file, and the
        events are the membership log (every DKG, reshare and activation).
        Rule kept on chain: within one epoch every committee has the same group key (commitments[0]): a
        reshare moves shares, never the key. A new key is a new epoch (a rotation).
        The group's secp256k1 signing key (the GetKey chain's KMS key, made by the running nodes after the
        DKG) is recorded once per epoch, after its committee: clients verify KMS signatures under it.
        The group's P-256 CA key (its root CA's key, made by the running nodes) and the sha256 of the root CA
        certificate's DER (self-signed by t nodes) are recorded once per epoch, after its committee: clients
        check the root certificate they are handed against this record.
        Each member's CURRENT boot-time peer key (sha256 of its SPKI; a node makes a new one at every
        start) is recorded per committee and share index: members admit a running peer only under the key
        recorded for its index, so one live process per share index takes part in rounds.
"""

MAX_NODES: constant(uint256) = 64


struct Member:
    index: uint8
    mr_aggregated: bytes32
    device_id: bytes32
    url: String[256]


event CommitteeRecorded:
    committee_id: indexed(uint256)
    epoch: indexed(uint64)
    t: uint8
    n: uint8
    group_key: bytes32

event MemberRecorded:
    committee_id: indexed(uint256)
    index: uint8
    mr_aggregated: bytes32
    device_id: bytes32
    url: String[256]

event CommitteeActivated:
    epoch: indexed(uint64)
    committee_id: indexed(uint256)
    previous: uint256

event SigningKeyRecorded:
    epoch: indexed(uint64)
    signing_key: Bytes[33]

event CaRecorded:
    epoch: indexed(uint64)
    ca_key: Bytes[33]
    root_cert_hash: bytes32

event PeerKeyRecorded:
    committee_id: indexed(uint256)
    index: uint8
    peer_key: bytes32

event OwnershipTransferStarted:
    previous_owner: indexed(address)
    new_owner: indexed(address)

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)


owner: public(address)
pending_owner: public(address)
committee_count: public(uint256)
# committee id (1-based) ->
committee_epoch: public(HashMap[uint256, uint64])
committee_t: public(HashMap[uint256, uint8])
committee_block: public(HashMap[uint256, uint256])
_commitments: HashMap[uint256, DynArray[bytes32, MAX_NODES]]
_members: HashMap[uint256, DynArray[Member, MAX_NODES]]
# epoch ->
group_key: public(HashMap[uint64, bytes32])
active: public(HashMap[uint64, uint256])
# the group's secp256k1 signing key (SEC1 compressed, 33 bytes); empty until recorded, then never changed
signing_key: public(HashMap[uint64, Bytes[33]])
# the group's P-256 CA key (SEC1 compressed) and sha256 of its root CA certificate (DER); empty until
# recorded, then never changed
ca_key: public(HashMap[uint64, Bytes[33]])
ca_root_hash: public(HashMap[uint64, bytes32])
# committee id -> share index -> sha256(SPKI) of the member's current boot-time peer key (empty: none yet)
peer_key: public(HashMap[uint256, HashMap[uint8, bytes32]])


@deploy
def __init__(owner: address):
    assert owner != empty(address), "owner is the zero address"
    self.owner = owner
    log OwnershipTransferred(previous_owner=empty(address), new_owner=owner)


@internal
@view
def _only_owner():
    assert msg.sender == self.owner, "caller is not the owner"


@external
def record_committee(
    epoch: uint64,
    t: uint8,
    commitments: DynArray[bytes32, MAX_NODES],
    members: DynArray[Member, MAX_NODES],
) -> uint256:
    """@notice Record a committee (the result of a DKG or a reshare); it serves once activated."""
    self._only_owner()
    n: uint256 = len(members)
    assert t >= 1 and convert(t, uint256) <= n, "need 1 <= t <= n"
    assert len(commitments) == convert(t, uint256), "need exactly t commitments"
    key: bytes32 = commitments[0]
    assert key != empty(bytes32), "the group key is empty"
    if self.group_key[epoch] == empty(bytes32):
        self.group_key[epoch] = key
    else:
        assert self.group_key[epoch] == key, "a reshare keeps the epoch's group key"
    last: uint8 = 0
    for m: Member in members:
        assert m.index > last, "member indices must increase"
        assert convert(m.index, uint256) <= MAX_NODES, "member index above 64"
        assert m.mr_aggregated != empty(bytes32), "a member needs its measurement"
        last = m.index
    cid: uint256 = self.committee_count + 1
    self.committee_count = cid
    self.committee_epoch[cid] = epoch
    self.committee_t[cid] = t
    self.committee_block[cid] = block.number
    self._commitments[cid] = commitments
    self._members[cid] = members
    log CommitteeRecorded(committee_id=cid, epoch=epoch, t=t, n=convert(n, uint8), group_key=key)
    for m: Member in members:
        log MemberRecorded(
            committee_id=cid, index=m.index, mr_aggregated=m.mr_aggregated, device_id=m.device_id, url=m.url
        )
    return cid


@external
def activate(committee_id: uint256):
    """@notice Make a recorded committee the one that serves its epoch (after its nodes hold their shares);
               only a newer one than the committee serving now."""
    self._only_owner()
    assert committee_id >= 1 and committee_id <= self.committee_count, "no such committee"
    epoch: uint64 = self.committee_epoch[committee_id]
    previous: uint256 = self.active[epoch]
    assert previous != committee_id, "already active"
    # forward only: an older committee's shares were (or may have been) retired, and re-activating it would
    # hand the epoch back to nodes an operator moved the key away from
    assert committee_id > previous, "a newer committee already serves this epoch"
    self.active[epoch] = committee_id
    log CommitteeActivated(epoch=epoch, committee_id=committee_id, previous=previous)


@external
def record_signing_key(epoch: uint64, key: Bytes[33]):
    """@notice Record the group's threshold signing key of an epoch (owner only, once): a new signing key
               is a new epoch, as a new group key is."""
    self._only_owner()
    assert self.group_key[epoch] != empty(bytes32), "no committee recorded for this epoch"
    assert len(key) == 33, "a signing key is 33 bytes (SEC1 compressed)"
    prefix: bytes1 = convert(slice(key, 0, 1), bytes1)
    assert prefix == 0x02 or prefix == 0x03, "a signing key is a compressed point (02 or 03)"
    assert len(self.signing_key[epoch]) == 0, "the epoch's signing key is recorded once"
    self.signing_key[epoch] = key
    log SigningKeyRecorded(epoch=epoch, signing_key=key)


@external
def record_ca(epoch: uint64, key: Bytes[33], root_cert_hash: bytes32):
    """@notice Record the group's P-256 CA key and the sha256 of its root CA certificate (DER) for an epoch
               (owner only, once): a new CA key or root is a new epoch, as a new signing key is."""
    self._only_owner()
    assert self.group_key[epoch] != empty(bytes32), "no committee recorded for this epoch"
    assert len(key) == 33, "a CA key is 33 bytes (SEC1 compressed)"
    prefix: bytes1 = convert(slice(key, 0, 1), bytes1)
    assert prefix == 0x02 or prefix == 0x03, "a CA key is a compressed point (02 or 03)"
    assert root_cert_hash != empty(bytes32), "the root certificate hash is empty"
    assert len(self.ca_key[epoch]) == 0, "the epoch's CA key and root are recorded once"
    self.ca_key[epoch] = key
    self.ca_root_hash[epoch] = root_cert_hash
    log CaRecorded(epoch=epoch, ca_key=key, root_cert_hash=root_cert_hash)


@external
def record_peer_keys(
    committee_id: uint256, indices: DynArray[uint8, MAX_NODES], keys: DynArray[bytes32, MAX_NODES]
):
    """@notice Record members' current boot-time peer keys (owner only; a restarted member's new key
               replaces its old one): peers admit member i under this key only."""
    self._only_owner()
    assert committee_id >= 1 and committee_id <= self.committee_count, "no such committee"
    assert len(indices) == len(keys), "one key per index"
    for k: uint256 in range(MAX_NODES):
        if k >= len(indices):
            break
        index: uint8 = indices[k]
        assert keys[k] != empty(bytes32), "a peer key is not empty"
        found: bool = False
        for m: Member in self._members[committee_id]:
            if m.index == index:
                found = True
                break
        assert found, "not a member of this committee"
        self.peer_key[committee_id][index] = keys[k]
        log PeerKeyRecorded(committee_id=committee_id, index=index, peer_key=keys[k])


@external
@view
def peer_keys(committee_id: uint256) -> DynArray[bytes32, MAX_NODES]:
    """@notice Every member's recorded peer key, in member order (empty where none is recorded)."""
    out: DynArray[bytes32, MAX_NODES] = []
    for m: Member in self._members[committee_id]:
        out.append(self.peer_key[committee_id][m.index])
    return out


@external
@view
def commitments(committee_id: uint256) -> DynArray[bytes32, MAX_NODES]:
    return self._commitments[committee_id]


@external
@view
def members(committee_id: uint256) -> DynArray[Member, MAX_NODES]:
    return self._members[committee_id]


@external
def transfer_ownership(new_owner: address):
    self._only_owner()
    self.pending_owner = new_owner
    log OwnershipTransferStarted(previous_owner=self.owner, new_owner=new_owner)


@external
def accept_ownership():
    assert msg.sender == self.pending_owner, "caller is not the pending owner"
    log OwnershipTransferred(previous_owner=self.owner, new_owner=msg.sender)
    self.owner = msg.sender
    self.pending_owner = empty(address)
