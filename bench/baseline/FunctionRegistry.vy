# pragma version 0.4.3
# bench baseline: this contract as of teecloud 11e7786, before issue 22's last gas change (KmsAuth's root
# read as its one-slot hash, the registry's answer from one slot). Only bench/bench_functions.py deploys
# it, to measure the old and new check in the same run.
"""
@title FunctionRegistry
@notice One per teecloud function; its address is the function_id. It says which code hashes (versions)
        of the function may run and have their results accepted, and on which runtime app. Its owner may
        be an address, a Multisig or a Timelock, as for AppAuth: a function's code changes only here.
"""

event CodeHashAdded:
    code_hash: indexed(bytes32)
    by: indexed(address)

event CodeHashRemoved:
    code_hash: indexed(bytes32)
    by: indexed(address)

event RuntimeAppSet:
    runtime_app_id: indexed(address)

event OwnershipTransferStarted:
    previous_owner: indexed(address)
    new_owner: indexed(address)

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)


owner: public(address)
pending_owner: public(address)
name: public(String[64])
# the teecloud app (its AppAuth address) that runs this function and signs its results
runtime_app_id: public(address)
allowed_code_hashes: public(HashMap[bytes32, bool])


@deploy
def __init__(owner: address, name: String[64], runtime_app_id: address, code_hash: bytes32):
    assert owner != empty(address), "owner is the zero address"
    assert runtime_app_id != empty(address), "no runtime app"
    self.owner = owner
    self.name = name
    log OwnershipTransferred(previous_owner=empty(address), new_owner=owner)
    self.runtime_app_id = runtime_app_id
    log RuntimeAppSet(runtime_app_id=runtime_app_id)
    if code_hash != empty(bytes32):
        self.allowed_code_hashes[code_hash] = True
        log CodeHashAdded(code_hash=code_hash, by=owner)


@internal
@view
def _only_owner():
    assert msg.sender == self.owner, "caller is not the owner"


@external
def add_code_hash(code_hash: bytes32):
    self._only_owner()
    assert code_hash != empty(bytes32), "empty code hash"
    assert not self.allowed_code_hashes[code_hash], "code hash already allowed"
    self.allowed_code_hashes[code_hash] = True
    log CodeHashAdded(code_hash=code_hash, by=msg.sender)


@external
def remove_code_hash(code_hash: bytes32):
    self._only_owner()
    assert self.allowed_code_hashes[code_hash], "code hash not allowed"
    self.allowed_code_hashes[code_hash] = False
    log CodeHashRemoved(code_hash=code_hash, by=msg.sender)


@external
def upgrade(old_code_hash: bytes32, new_code_hash: bytes32):
    """@notice Replace one version by another in one step (one governance action)."""
    self._only_owner()
    assert self.allowed_code_hashes[old_code_hash], "old code hash not allowed"
    assert new_code_hash != empty(bytes32), "empty code hash"
    assert not self.allowed_code_hashes[new_code_hash], "new code hash already allowed"
    self.allowed_code_hashes[old_code_hash] = False
    log CodeHashRemoved(code_hash=old_code_hash, by=msg.sender)
    self.allowed_code_hashes[new_code_hash] = True
    log CodeHashAdded(code_hash=new_code_hash, by=msg.sender)


@external
def set_runtime_app_id(runtime_app_id: address):
    self._only_owner()
    assert runtime_app_id != empty(address), "no runtime app"
    self.runtime_app_id = runtime_app_id
    log RuntimeAppSet(runtime_app_id=runtime_app_id)


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


@external
@view
def is_allowed(code_hash: bytes32, runtime_app_id: address) -> (bool, String[64]):
    if not self.allowed_code_hashes[code_hash]:
        return False, "code hash not allowed"
    if runtime_app_id != self.runtime_app_id:
        return False, "another runtime app"
    return True, ""


@external
@view
def check(code_hash: bytes32, runtime_app_id: address) -> uint256:
    """@notice `is_allowed` as a number (0 allowed, 1 code hash not allowed, 2 another runtime app): the
    verifier's path, without returning a string."""
    if not self.allowed_code_hashes[code_hash]:
        return 1
    if runtime_app_id != self.runtime_app_id:
        return 2
    return 0
