# pragma version 0.4.3
"""
@title KmsAuth
@notice One per teecloud network. The app registry (with an AppAuth factory), the allowed OS images,
        which KMS instances may hold the root keys, and the KMS's public information.
        The KMS asks `is_app_allowed` before releasing an app's keys, and `is_kms_allowed` before
        sharing root keys with another KMS instance. A threshold KMS makes an app's env key (a ceremony
        among its nodes, and signatures) only for an app this contract deployed itself from its blueprint
        (`deployed_apps`), not for any registered contract (review 6, R6-2).
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


interface IAppAuth:
    def is_app_allowed(boot_info: BootInfo) -> (bool, String[128]): view


event AppRegistered:
    app_id: indexed(address)
    by: indexed(address)

event AppDeployed:
    app_id: indexed(address)
    owner: indexed(address)
    compose_hash: bytes32

event AppBlueprintSet:
    blueprint: indexed(address)

event OsImageAdded:
    os_image_hash: indexed(bytes32)

event OsImageRemoved:
    os_image_hash: indexed(bytes32)

event KmsAggregatedMrAdded:
    mr_aggregated: indexed(bytes32)

event KmsAggregatedMrRemoved:
    mr_aggregated: indexed(bytes32)

event KmsDeviceAdded:
    device_id: indexed(bytes32)

event KmsDeviceRemoved:
    device_id: indexed(bytes32)

event KmsInfoSet:
    k256_pubkey: Bytes[65]
    ca_pubkey: Bytes[256]
    quote_hash: bytes32

event GatewayAppIdSet:
    gateway_app_id: indexed(address)

event OwnershipTransferStarted:
    previous_owner: indexed(address)
    new_owner: indexed(address)

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)


owner: public(address)
pending_owner: public(address)
app_blueprint: public(address)
registered_apps: public(HashMap[address, bool])
# apps this contract created from its app blueprint (deploy_and_register_app); register_app never sets it
deployed_apps: public(HashMap[address, bool])
app_count: public(uint256)
allowed_os_images: public(HashMap[bytes32, bool])
kms_allowed_aggregated_mrs: public(HashMap[bytes32, bool])
kms_allowed_device_ids: public(HashMap[bytes32, bool])
kms_k256_pubkey: public(Bytes[65])
# keccak256(kms_k256_pubkey), set with it: one slot for readers that only compare a given key against the root
# (FunctionResultVerifier), instead of the root's length and data slots
kms_k256_pubkey_hash: public(bytes32)
kms_ca_pubkey: public(Bytes[256])
kms_quote_hash: public(bytes32)
gateway_app_id: public(address)

UP_TO_DATE: constant(String[32]) = "UpToDate"


@deploy
def __init__(owner: address, app_blueprint: address):
    assert owner != empty(address), "owner is the zero address"
    self.owner = owner
    log OwnershipTransferred(previous_owner=empty(address), new_owner=owner)
    if app_blueprint != empty(address):
        self.app_blueprint = app_blueprint
        log AppBlueprintSet(blueprint=app_blueprint)


@internal
@view
def _only_owner():
    assert msg.sender == self.owner, "caller is not the owner"


@internal
def _register(app: address):
    assert app.is_contract, "app is not a contract"
    assert not self.registered_apps[app], "app already registered"
    self.registered_apps[app] = True
    self.app_count += 1
    log AppRegistered(app_id=app, by=msg.sender)


@external
def register_app(app: address):
    """@notice Anyone may register an app contract: registering grants nothing by itself,
               the app's own AppAuth still decides which code may boot."""
    self._register(app)


@external
def deploy_and_register_app(
    owner: address,
    disable_upgrades: bool,
    require_tcb_up_to_date: bool,
    allow_any_device: bool,
    device_id: bytes32,
    compose_hash: bytes32,
) -> address:
    assert self.app_blueprint != empty(address), "no app blueprint set"
    app: address = create_from_blueprint(
        self.app_blueprint,
        owner,
        disable_upgrades,
        require_tcb_up_to_date,
        allow_any_device,
        device_id,
        compose_hash,
        code_offset=3,
    )
    self._register(app)
    self.deployed_apps[app] = True
    log AppDeployed(app_id=app, owner=owner, compose_hash=compose_hash)
    return app


@external
def set_app_blueprint(blueprint: address):
    self._only_owner()
    assert blueprint.is_contract, "blueprint is not a contract"
    self.app_blueprint = blueprint
    log AppBlueprintSet(blueprint=blueprint)


@external
def add_os_image_hash(os_image_hash: bytes32):
    self._only_owner()
    assert not self.allowed_os_images[os_image_hash], "OS image already allowed"
    self.allowed_os_images[os_image_hash] = True
    log OsImageAdded(os_image_hash=os_image_hash)


@external
def remove_os_image_hash(os_image_hash: bytes32):
    self._only_owner()
    assert self.allowed_os_images[os_image_hash], "OS image not allowed"
    self.allowed_os_images[os_image_hash] = False
    log OsImageRemoved(os_image_hash=os_image_hash)


@external
def add_kms_aggregated_mr(mr_aggregated: bytes32):
    self._only_owner()
    assert not self.kms_allowed_aggregated_mrs[mr_aggregated], "KMS measurement already allowed"
    self.kms_allowed_aggregated_mrs[mr_aggregated] = True
    log KmsAggregatedMrAdded(mr_aggregated=mr_aggregated)


@external
def remove_kms_aggregated_mr(mr_aggregated: bytes32):
    self._only_owner()
    assert self.kms_allowed_aggregated_mrs[mr_aggregated], "KMS measurement not allowed"
    self.kms_allowed_aggregated_mrs[mr_aggregated] = False
    log KmsAggregatedMrRemoved(mr_aggregated=mr_aggregated)


@external
def add_kms_device(device_id: bytes32):
    self._only_owner()
    assert not self.kms_allowed_device_ids[device_id], "KMS device already allowed"
    self.kms_allowed_device_ids[device_id] = True
    log KmsDeviceAdded(device_id=device_id)


@external
def remove_kms_device(device_id: bytes32):
    self._only_owner()
    assert self.kms_allowed_device_ids[device_id], "KMS device not allowed"
    self.kms_allowed_device_ids[device_id] = False
    log KmsDeviceRemoved(device_id=device_id)


@external
def set_kms_info(k256_pubkey: Bytes[65], ca_pubkey: Bytes[256], quote_hash: bytes32):
    self._only_owner()
    self.kms_k256_pubkey = k256_pubkey
    self.kms_k256_pubkey_hash = keccak256(k256_pubkey)
    self.kms_ca_pubkey = ca_pubkey
    self.kms_quote_hash = quote_hash
    log KmsInfoSet(k256_pubkey=k256_pubkey, ca_pubkey=ca_pubkey, quote_hash=quote_hash)


@external
def set_gateway_app_id(gateway_app_id: address):
    self._only_owner()
    self.gateway_app_id = gateway_app_id
    log GatewayAppIdSet(gateway_app_id=gateway_app_id)


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
def is_app_allowed(boot_info: BootInfo) -> (bool, String[128]):
    if not self.registered_apps[boot_info.app_id]:
        return False, "app not registered"
    if not self.allowed_os_images[boot_info.os_image_hash]:
        return False, "OS image not allowed"
    ok: bool = False
    reason: String[128] = ""
    ok, reason = staticcall IAppAuth(boot_info.app_id).is_app_allowed(boot_info)
    return ok, reason


@external
@view
def is_kms_allowed(boot_info: BootInfo) -> (bool, String[128]):
    if keccak256(boot_info.tcb_status) != keccak256(UP_TO_DATE):
        return False, "TCB status is not UpToDate"
    if not self.allowed_os_images[boot_info.os_image_hash]:
        return False, "OS image not allowed"
    if not self.kms_allowed_aggregated_mrs[boot_info.mr_aggregated]:
        return False, "KMS aggregated measurement not allowed"
    if not self.kms_allowed_device_ids[boot_info.device_id]:
        return False, "KMS device not allowed"
    return True, ""
