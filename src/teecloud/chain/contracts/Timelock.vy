# pragma version 0.4.3
"""
@title Timelock
@notice Owns an AppAuth (or the KmsAuth) so that every change is announced first: the admin queues a call,
        `CallQueued` tells the world what is coming and when, and nobody can execute it before the delay has
        passed. Users who disagree see the new compose hash coming and can leave before it takes effect.
        Execution is open to anyone once due (the admin already decided; the delay is the protection).
        The delay and the admin change only through the timelock itself, i.e. with the same delay.
"""

MAX_DATA: constant(uint256) = 4096
MAX_DELAY: constant(uint256) = 30 * 86400


event CallQueued:
    call_id: indexed(bytes32)
    target: indexed(address)
    value: uint256
    data: Bytes[MAX_DATA]
    salt: bytes32
    eta: uint256

event CallExecuted:
    call_id: indexed(bytes32)
    target: indexed(address)
    executor: indexed(address)

event CallCancelled:
    call_id: indexed(bytes32)

event MinDelayChanged:
    old_delay: uint256
    new_delay: uint256

event AdminChanged:
    previous_admin: indexed(address)
    new_admin: indexed(address)

event Deposit:
    sender: indexed(address)
    value: uint256


admin: public(address)
min_delay: public(uint256)
# call_id -> time from which it may be executed (0 = not queued)
eta: public(HashMap[bytes32, uint256])
done: public(HashMap[bytes32, bool])


@deploy
@payable
def __init__(admin: address, min_delay: uint256):
    assert admin != empty(address), "admin is the zero address"
    assert min_delay <= MAX_DELAY, "delay above maximum"
    self.admin = admin
    self.min_delay = min_delay
    log AdminChanged(previous_admin=empty(address), new_admin=admin)
    log MinDelayChanged(old_delay=0, new_delay=min_delay)


@external
@payable
def __default__():
    log Deposit(sender=msg.sender, value=msg.value)


@internal
@pure
def _call_id(target: address, amount: uint256, data: Bytes[MAX_DATA], salt: bytes32) -> bytes32:
    return keccak256(abi_encode(target, amount, data, salt))


@external
@pure
def call_id(target: address, amount: uint256, data: Bytes[MAX_DATA], salt: bytes32) -> bytes32:
    return self._call_id(target, amount, data, salt)


@external
def queue(target: address, amount: uint256, data: Bytes[MAX_DATA], salt: bytes32, delay: uint256) -> bytes32:
    assert msg.sender == self.admin, "caller is not the admin"
    assert delay >= self.min_delay, "delay below the minimum"
    assert delay <= MAX_DELAY, "delay above maximum"
    cid: bytes32 = self._call_id(target, amount, data, salt)
    assert self.eta[cid] == 0, "call already queued"
    assert not self.done[cid], "call already executed"
    when: uint256 = block.timestamp + delay
    self.eta[cid] = when
    log CallQueued(call_id=cid, target=target, value=amount, data=data, salt=salt, eta=when)
    return cid


@external
def cancel(cid: bytes32):
    assert msg.sender == self.admin, "caller is not the admin"
    assert self.eta[cid] != 0, "call not queued"
    self.eta[cid] = 0
    log CallCancelled(call_id=cid)


@external
@payable
@nonreentrant
def execute(target: address, amount: uint256, data: Bytes[MAX_DATA], salt: bytes32):
    cid: bytes32 = self._call_id(target, amount, data, salt)
    when: uint256 = self.eta[cid]
    assert when != 0, "call not queued"
    assert block.timestamp >= when, "timelock: too early"
    self.eta[cid] = 0
    self.done[cid] = True
    raw_call(target, data, value=amount)
    log CallExecuted(call_id=cid, target=target, executor=msg.sender)


@external
def set_min_delay(new_delay: uint256):
    assert msg.sender == self, "only the timelock itself (through a queued call)"
    assert new_delay <= MAX_DELAY, "delay above maximum"
    log MinDelayChanged(old_delay=self.min_delay, new_delay=new_delay)
    self.min_delay = new_delay


@external
def set_admin(new_admin: address):
    assert msg.sender == self, "only the timelock itself (through a queued call)"
    assert new_admin != empty(address), "admin is the zero address"
    log AdminChanged(previous_admin=self.admin, new_admin=new_admin)
    self.admin = new_admin
