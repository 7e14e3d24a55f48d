# pragma version 0.4.3
"""
@title Multisig
@notice M-of-N governance. An owner proposes a call (target, value, data); owners approve it; once
        `threshold` current owners have approved, any owner executes it, exactly once. The owner set and
        the threshold change only through the multisig's own proposals.
"""

MAX_OWNERS: constant(uint256) = 16
MAX_DATA: constant(uint256) = 4096


struct Proposal:
    call_hash: bytes32
    proposer: address
    executed: bool
    cancelled: bool


event ProposalCreated:
    proposal_id: indexed(uint256)
    proposer: indexed(address)
    target: indexed(address)
    value: uint256
    data: Bytes[MAX_DATA]

event ProposalApproved:
    proposal_id: indexed(uint256)
    owner: indexed(address)

event ApprovalRevoked:
    proposal_id: indexed(uint256)
    owner: indexed(address)

event ProposalExecuted:
    proposal_id: indexed(uint256)
    executor: indexed(address)

event ProposalCancelled:
    proposal_id: indexed(uint256)
    by: indexed(address)

event OwnerAdded:
    owner: indexed(address)

event OwnerRemoved:
    owner: indexed(address)

event ThresholdChanged:
    threshold: uint256

event Deposit:
    sender: indexed(address)
    value: uint256


owners: public(DynArray[address, MAX_OWNERS])
is_owner: public(HashMap[address, bool])
threshold: public(uint256)
proposal_count: public(uint256)
proposals: public(HashMap[uint256, Proposal])
approved: public(HashMap[uint256, HashMap[address, bool]])
# An owner's membership term: bumped when the owner is removed, so approvals given in an earlier term never
# count again if the same address is re-added later.
owner_term: public(HashMap[address, uint256])
approval_term: HashMap[uint256, HashMap[address, uint256]]


@deploy
@payable
def __init__(owners: DynArray[address, MAX_OWNERS], threshold: uint256):
    assert len(owners) > 0, "no owners"
    for o: address in owners:
        assert o != empty(address), "owner is the zero address"
        assert not self.is_owner[o], "duplicate owner"
        self.is_owner[o] = True
        self.owners.append(o)
        log OwnerAdded(owner=o)
    assert threshold >= 1 and threshold <= len(owners), "threshold out of range"
    self.threshold = threshold
    log ThresholdChanged(threshold=threshold)


@external
@payable
def __default__():
    log Deposit(sender=msg.sender, value=msg.value)


@internal
@view
def _only_owner():
    assert self.is_owner[msg.sender], "caller is not an owner"


@internal
@view
def _only_self():
    assert msg.sender == self, "only the multisig itself (through a proposal)"


@internal
@view
def _open(proposal_id: uint256):
    assert proposal_id < self.proposal_count, "no such proposal"
    assert not self.proposals[proposal_id].executed, "proposal already executed"
    assert not self.proposals[proposal_id].cancelled, "proposal cancelled"


@external
@view
def call_hash(target: address, amount: uint256, data: Bytes[MAX_DATA]) -> bytes32:
    return keccak256(abi_encode(target, amount, data))


@external
@view
def approval_count(proposal_id: uint256) -> uint256:
    """@notice Approvals from the *current* owners (a removed owner's approval no longer counts)."""
    return self._approvals(proposal_id)


@internal
@view
def _has_approved(proposal_id: uint256, owner: address) -> bool:
    return self.approved[proposal_id][owner] and self.approval_term[proposal_id][owner] == self.owner_term[owner]


@internal
@view
def _approvals(proposal_id: uint256) -> uint256:
    n: uint256 = 0
    for o: address in self.owners:
        if self._has_approved(proposal_id, o):
            n += 1
    return n


@internal
def _approve(proposal_id: uint256, owner: address):
    self.approved[proposal_id][owner] = True
    self.approval_term[proposal_id][owner] = self.owner_term[owner]
    log ProposalApproved(proposal_id=proposal_id, owner=owner)


@external
def propose(target: address, amount: uint256, data: Bytes[MAX_DATA]) -> uint256:
    """@notice Proposing counts as the proposer's approval."""
    self._only_owner()
    proposal_id: uint256 = self.proposal_count
    self.proposal_count = proposal_id + 1
    self.proposals[proposal_id] = Proposal(
        call_hash=keccak256(abi_encode(target, amount, data)),
        proposer=msg.sender,
        executed=False,
        cancelled=False,
    )
    log ProposalCreated(proposal_id=proposal_id, proposer=msg.sender, target=target, value=amount, data=data)
    self._approve(proposal_id, msg.sender)
    return proposal_id


@external
def approve(proposal_id: uint256):
    self._only_owner()
    self._open(proposal_id)
    assert not self._has_approved(proposal_id, msg.sender), "already approved"
    self._approve(proposal_id, msg.sender)


@external
def revoke(proposal_id: uint256):
    self._only_owner()
    self._open(proposal_id)
    assert self._has_approved(proposal_id, msg.sender), "not approved"
    self.approved[proposal_id][msg.sender] = False
    log ApprovalRevoked(proposal_id=proposal_id, owner=msg.sender)


@external
def cancel(proposal_id: uint256):
    self._only_owner()  # a removed owner cannot cancel what it proposed while it was one
    self._open(proposal_id)
    assert msg.sender == self.proposals[proposal_id].proposer, "caller is not the proposer"
    self.proposals[proposal_id].cancelled = True
    log ProposalCancelled(proposal_id=proposal_id, by=msg.sender)


@external
@nonreentrant
def execute(proposal_id: uint256, target: address, amount: uint256, data: Bytes[MAX_DATA]):
    self._only_owner()
    self._open(proposal_id)
    assert keccak256(abi_encode(target, amount, data)) == self.proposals[proposal_id].call_hash, "call does not match the proposal"
    assert self._approvals(proposal_id) >= self.threshold, "not enough approvals"
    # marked before the call: a proposal runs at most once, even if the call re-enters
    self.proposals[proposal_id].executed = True
    raw_call(target, data, value=amount)
    log ProposalExecuted(proposal_id=proposal_id, executor=msg.sender)


@external
def add_owner(owner: address):
    self._only_self()
    assert owner != empty(address), "owner is the zero address"
    assert not self.is_owner[owner], "already an owner"
    self.is_owner[owner] = True
    self.owners.append(owner)
    log OwnerAdded(owner=owner)


@external
def remove_owner(owner: address):
    self._only_self()
    assert self.is_owner[owner], "not an owner"
    assert len(self.owners) - 1 >= self.threshold, "would leave fewer owners than the threshold"
    self.is_owner[owner] = False
    self.owner_term[owner] += 1
    kept: DynArray[address, MAX_OWNERS] = []
    for o: address in self.owners:
        if o != owner:
            kept.append(o)
    self.owners = kept
    log OwnerRemoved(owner=owner)


@external
def change_threshold(threshold: uint256):
    self._only_self()
    assert threshold >= 1 and threshold <= len(self.owners), "threshold out of range"
    self.threshold = threshold
    log ThresholdChanged(threshold=threshold)


@external
@view
def get_owners() -> DynArray[address, MAX_OWNERS]:
    return self.owners
