# pragma version 0.4.3
"""
@title AppAuth
@notice One contract per app; its address is the app_id. It decides which compose hashes, on which
        devices, may obtain the app's keys from the KMS. Its owner may be an address, a Multisig or a
        Timelock (then every change is announced and only takes effect after the delay).
"""

struct BootInfo:
    app_id: address
    compose_hash: bytes32
    instance_id: address
    device_id: bytes32
    mr_aggregated: bytes32
    mr_system: bytes32
    os_image_hash: bytes32
    tcb_status: String[32]
    advisory_ids: DynArray[String[64], 64]


event ComposeHashAdded:
    compose_hash: indexed(bytes32)
    by: indexed(address)

event ComposeHashRemoved:
    compose_hash: indexed(bytes32)
    by: indexed(address)

event DeviceAdded:
    device_id: indexed(bytes32)

event DeviceRemoved:
    device_id: indexed(bytes32)

event AllowAnyDeviceSet:
    allow_any_device: bool

event RequireTcbUpToDateSet:
    require_tcb_up_to_date: bool

event UpgradesDisabled:
    by: indexed(address)

event InstanceRetired:
    instance_id: indexed(address)
    by: indexed(address)

event OwnershipTransferStarted:
    previous_owner: indexed(address)
    new_owner: indexed(address)

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)


owner: public(address)
pending_owner: public(address)
allowed_compose_hashes: public(HashMap[bytes32, bool])
allowed_device_ids: public(HashMap[bytes32, bool])
allow_any_device: public(bool)
require_tcb_up_to_date: public(bool)
upgrades_disabled: public(bool)
# instances removed for good (`teecloud rm`): the KMS never releases their keys again
retired_instances: public(HashMap[address, bool])
# the KmsAuth (or account) that created this app; informational
creator: public(address)

UP_TO_DATE: constant(String[32]) = "UpToDate"


@deploy
def __init__(
    owner: address,
    disable_upgrades: bool,
    require_tcb_up_to_date: bool,
    allow_any_device: bool,
    device_id: bytes32,
    compose_hash: bytes32,
):
    assert owner != empty(address), "owner is the zero address"
    self.owner = owner
    self.creator = msg.sender
    log OwnershipTransferred(previous_owner=empty(address), new_owner=owner)
    self.allow_any_device = allow_any_device
    log AllowAnyDeviceSet(allow_any_device=allow_any_device)
    self.require_tcb_up_to_date = require_tcb_up_to_date
    log RequireTcbUpToDateSet(require_tcb_up_to_date=require_tcb_up_to_date)
    if device_id != empty(bytes32):
        self.allowed_device_ids[device_id] = True
        log DeviceAdded(device_id=device_id)
    if compose_hash != empty(bytes32):
        self.allowed_compose_hashes[compose_hash] = True
        log ComposeHashAdded(compose_hash=compose_hash, by=owner)
    if disable_upgrades:
        self.upgrades_disabled = True
        log UpgradesDisabled(by=owner)


@internal
@view
def _only_owner():
    assert msg.sender == self.owner, "caller is not the owner"


@external
def add_compose_hash(compose_hash: bytes32):
    self._only_owner()
    assert not self.upgrades_disabled, "upgrades are disabled"
    assert compose_hash != empty(bytes32), "empty compose hash"
    assert not self.allowed_compose_hashes[compose_hash], "compose hash already allowed"
    self.allowed_compose_hashes[compose_hash] = True
    log ComposeHashAdded(compose_hash=compose_hash, by=msg.sender)


@external
def remove_compose_hash(compose_hash: bytes32):
    self._only_owner()
    assert not self.upgrades_disabled, "upgrades are disabled"
    assert self.allowed_compose_hashes[compose_hash], "compose hash not allowed"
    self.allowed_compose_hashes[compose_hash] = False
    log ComposeHashRemoved(compose_hash=compose_hash, by=msg.sender)


@external
def add_device(device_id: bytes32):
    self._only_owner()
    assert not self.allowed_device_ids[device_id], "device already allowed"
    self.allowed_device_ids[device_id] = True
    log DeviceAdded(device_id=device_id)


@external
def remove_device(device_id: bytes32):
    self._only_owner()
    assert self.allowed_device_ids[device_id], "device not allowed"
    self.allowed_device_ids[device_id] = False
    log DeviceRemoved(device_id=device_id)


@external
def set_allow_any_device(allow_any_device: bool):
    self._only_owner()
    self.allow_any_device = allow_any_device
    log AllowAnyDeviceSet(allow_any_device=allow_any_device)


@external
def set_require_tcb_up_to_date(require_tcb_up_to_date: bool):
    self._only_owner()
    self.require_tcb_up_to_date = require_tcb_up_to_date
    log RequireTcbUpToDateSet(require_tcb_up_to_date=require_tcb_up_to_date)


@external
def disable_upgrades():
    """@notice Irreversible: the allowed compose hashes are frozen from now on."""
    self._only_owner()
    assert not self.upgrades_disabled, "upgrades already disabled"
    self.upgrades_disabled = True
    log UpgradesDisabled(by=msg.sender)


@external
def retire_instance(instance_id: address):
    """
    @notice Irreversible: no KMS releases this instance's keys again (is_app_allowed refuses it). Allowed
            even after disable_upgrades: retiring an instance takes nothing new into the app.
    """
    self._only_owner()
    assert instance_id != empty(address), "no instance id (the app runs without one)"
    assert not self.retired_instances[instance_id], "instance already retired"
    self.retired_instances[instance_id] = True
    log InstanceRetired(instance_id=instance_id, by=msg.sender)


@external
def transfer_ownership(new_owner: address):
    """@notice Two steps: the new owner must call accept_ownership (guards against typos)."""
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
def is_app_allowed(boot_info: BootInfo) -> (bool, String[128]):
    if boot_info.app_id != self:
        return False, "boot info names another app"
    if self.retired_instances[boot_info.instance_id]:
        return False, "instance retired"
    if self.require_tcb_up_to_date and keccak256(boot_info.tcb_status) != keccak256(UP_TO_DATE):
        return False, "TCB status is not UpToDate"
    if not self.allowed_compose_hashes[boot_info.compose_hash]:
        return False, "compose hash not allowed"
    if not (self.allow_any_device or self.allowed_device_ids[boot_info.device_id]):
        return False, "device not allowed"
    return True, ""
