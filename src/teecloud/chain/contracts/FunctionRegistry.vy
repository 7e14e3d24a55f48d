# pragma version 0.4.3
"""
@title FunctionRegistry
@notice One per teecloud function; its address is the function_id. It says which code hashes (versions)
        of the function may run and have their results accepted, and on which runtime app. Its owner may
        be an address, a Multisig or a Timelock, as for AppAuth: a function's code changes only here.
        At most MAX_CODE_HASHES versions are allowed at once. `check` (FunctionResultVerifier's step 2)
        reads one storage slot: each allowed code hash's entry holds the runtime app it runs on, and
        set_runtime_app_id rewrites every entry.
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

MAX_CODE_HASHES: constant(uint256) = 64
POSITION_BITS: constant(uint256) = 96
POSITION_MASK: constant(uint256) = 2**96 - 1
# the allowed code hashes, in no particular order (removal moves the last one into the gap)
code_hash_list: DynArray[bytes32, MAX_CODE_HASHES]
# code hash -> 0 (not allowed) or runtime_app_id << 96 | (its index in code_hash_list + 1). Invariant: every
# allowed code hash's entry names the current runtime_app_id (set_runtime_app_id rewrites them all), so
# `check` answers from this one slot exactly what the code hash's flag and runtime_app_id answered together.
code_hash_entries: HashMap[bytes32, uint256]


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
        self._allow(code_hash)
        log CodeHashAdded(code_hash=code_hash, by=owner)


@internal
@view
def _only_owner():
    assert msg.sender == self.owner, "caller is not the owner"


@internal
@pure
def _entry(runtime_app_id: address, index: uint256) -> uint256:
    return (convert(runtime_app_id, uint256) << POSITION_BITS) | (index + 1)


@internal
def _allow(code_hash: bytes32):
    assert len(self.code_hash_list) < MAX_CODE_HASHES, "too many allowed code hashes (remove one first)"
    self.code_hash_entries[code_hash] = self._entry(self.runtime_app_id, len(self.code_hash_list))
    self.code_hash_list.append(code_hash)


@internal
def _disallow(code_hash: bytes32):
    index: uint256 = (self.code_hash_entries[code_hash] & POSITION_MASK) - 1
    last: bytes32 = self.code_hash_list.pop()
    if last != code_hash:
        self.code_hash_list[index] = last
        self.code_hash_entries[last] = self._entry(self.runtime_app_id, index)
    self.code_hash_entries[code_hash] = 0


@external
@view
def allowed_code_hashes(code_hash: bytes32) -> bool:
    return self.code_hash_entries[code_hash] != 0


@external
@view
def allowed_code_hash_list() -> DynArray[bytes32, MAX_CODE_HASHES]:
    """@notice The code hashes allowed now, in no particular order."""
    return self.code_hash_list


@external
def add_code_hash(code_hash: bytes32):
    self._only_owner()
    assert code_hash != empty(bytes32), "empty code hash"
    assert self.code_hash_entries[code_hash] == 0, "code hash already allowed"
    self._allow(code_hash)
    log CodeHashAdded(code_hash=code_hash, by=msg.sender)


@external
def remove_code_hash(code_hash: bytes32):
    self._only_owner()
    assert self.code_hash_entries[code_hash] != 0, "code hash not allowed"
    self._disallow(code_hash)
    log CodeHashRemoved(code_hash=code_hash, by=msg.sender)


@external
def upgrade(old_code_hash: bytes32, new_code_hash: bytes32):
    """@notice Replace one version by another in one step (one governance action)."""
    self._only_owner()
    assert self.code_hash_entries[old_code_hash] != 0, "old code hash not allowed"
    assert new_code_hash != empty(bytes32), "empty code hash"
    assert self.code_hash_entries[new_code_hash] == 0, "new code hash already allowed"
    self._disallow(old_code_hash)
    log CodeHashRemoved(code_hash=old_code_hash, by=msg.sender)
    self._allow(new_code_hash)
    log CodeHashAdded(code_hash=new_code_hash, by=msg.sender)


@external
def set_runtime_app_id(runtime_app_id: address):
    self._only_owner()
    assert runtime_app_id != empty(address), "no runtime app"
    self.runtime_app_id = runtime_app_id
    for i: uint256 in range(len(self.code_hash_list), bound=MAX_CODE_HASHES):
        self.code_hash_entries[self.code_hash_list[i]] = self._entry(runtime_app_id, i)
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
    status: uint256 = self._check(code_hash, runtime_app_id)
    if status == 1:
        return False, "code hash not allowed"
    if status == 2:
        return False, "another runtime app"
    return True, ""


@internal
@view
def _check(code_hash: bytes32, runtime_app_id: address) -> uint256:
    entry: uint256 = self.code_hash_entries[code_hash]
    if entry == 0:
        return 1
    if convert(entry >> POSITION_BITS, address) != runtime_app_id:
        return 2
    return 0


@external
@view
def check(code_hash: bytes32, runtime_app_id: address) -> uint256:
    """@notice `is_allowed` as a number (0 allowed, 1 code hash not allowed, 2 another runtime app): the
    verifier's path, without returning a string, from one storage slot."""
    return self._check(code_hash, runtime_app_id)
