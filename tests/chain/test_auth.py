"""AppAuth + KmsAuth: the rules of is_app_allowed / is_kms_allowed; privileged calls check the caller."""

from __future__ import annotations

import dataclasses

import pytest

from teecloud.chain import BootInfo, ChainClient, ContractReverted

from .helpers import DEVICE, OS_IMAGE, boot_info, rand32


@pytest.fixture
def app(chain: ChainClient) -> tuple[str, bytes]:
    h = rand32()
    chain.add_os_image(OS_IMAGE)
    return chain.register_app(None, h), h


def test_allowed_app_passes(chain: ChainClient, app: tuple[str, bytes]) -> None:
    app_id, h = app
    assert chain.is_app_allowed(boot_info(app_id, h)) == (True, "")


def test_unknown_compose_hash_denied(chain: ChainClient, app: tuple[str, bytes]) -> None:
    app_id, _ = app
    assert chain.is_app_allowed(boot_info(app_id, rand32())) == (False, "compose hash not allowed")


def test_unregistered_app_denied(chain: ChainClient, app: tuple[str, bytes]) -> None:
    _, h = app
    other = "0x" + "42" * 20
    assert chain.is_app_allowed(boot_info(other, h)) == (False, "app not registered")


def test_os_image_not_allowed_then_removed(chain: ChainClient, app: tuple[str, bytes]) -> None:
    app_id, h = app
    assert chain.is_app_allowed(boot_info(app_id, h, os_image_hash=rand32())) == (
        False,
        "OS image not allowed",
    )
    chain.remove_os_image(OS_IMAGE)
    assert chain.is_app_allowed(boot_info(app_id, h)) == (False, "OS image not allowed")


def test_boot_info_for_another_app_denied(chain: ChainClient) -> None:
    # an app whose AppAuth is asked about a boot_info naming a different app refuses it
    h = rand32()
    a = chain.register_app(None, h)
    assert chain.call("AppAuth", a, "is_app_allowed", boot_info("0x" + "11" * 20, h).to_abi()) == (
        False,
        "boot info names another app",
    )


def test_add_and_remove_compose_hash(chain: ChainClient, app: tuple[str, bytes]) -> None:
    app_id, h = app
    new = rand32()
    chain.add_compose_hash(app_id, new)
    assert chain.is_app_allowed(boot_info(app_id, new))[0]
    chain.remove_compose_hash(app_id, new)
    assert chain.is_app_allowed(boot_info(app_id, new)) == (False, "compose hash not allowed")
    with pytest.raises(ContractReverted, match="compose hash not allowed"):
        chain.remove_compose_hash(app_id, new)
    with pytest.raises(ContractReverted, match="compose hash already allowed"):
        chain.add_compose_hash(app_id, h)


def test_device_rules(chain: ChainClient) -> None:
    h = rand32()
    chain.add_os_image(OS_IMAGE)
    app_id = chain.register_app(None, h, allow_any_device=False, device_id=DEVICE)
    assert chain.is_app_allowed(boot_info(app_id, h))[0]
    other = rand32()
    assert chain.is_app_allowed(boot_info(app_id, h, device_id=other)) == (False, "device not allowed")
    chain.transact("AppAuth", app_id, "add_device", other)
    assert chain.is_app_allowed(boot_info(app_id, h, device_id=other))[0]
    chain.transact("AppAuth", app_id, "remove_device", other)
    assert not chain.is_app_allowed(boot_info(app_id, h, device_id=other))[0]
    chain.transact("AppAuth", app_id, "set_allow_any_device", True)
    assert chain.is_app_allowed(boot_info(app_id, h, device_id=other))[0]


def test_require_tcb_up_to_date(chain: ChainClient) -> None:
    h = rand32()
    chain.add_os_image(OS_IMAGE)
    app_id = chain.register_app(None, h, require_tcb_up_to_date=True)
    assert chain.is_app_allowed(boot_info(app_id, h))[0]
    assert chain.is_app_allowed(boot_info(app_id, h, tcb_status="OutOfDate")) == (
        False,
        "TCB status is not UpToDate",
    )
    chain.transact("AppAuth", app_id, "set_require_tcb_up_to_date", False)
    assert chain.is_app_allowed(boot_info(app_id, h, tcb_status="OutOfDate"))[0]


def test_disable_upgrades_is_irreversible(chain: ChainClient, app: tuple[str, bytes]) -> None:
    app_id, h = app
    chain.transact("AppAuth", app_id, "disable_upgrades")
    with pytest.raises(ContractReverted, match="upgrades are disabled"):
        chain.add_compose_hash(app_id, rand32())
    with pytest.raises(ContractReverted, match="upgrades are disabled"):
        chain.remove_compose_hash(app_id, h)
    with pytest.raises(ContractReverted, match="upgrades already disabled"):
        chain.transact("AppAuth", app_id, "disable_upgrades")
    assert chain.is_app_allowed(boot_info(app_id, h))[0]  # the frozen release keeps running


def test_registered_with_upgrades_disabled(chain: ChainClient) -> None:
    h = rand32()
    app_id = chain.register_app(None, h, disable_upgrades=True)
    assert chain.is_compose_hash_allowed(app_id, h)
    with pytest.raises(ContractReverted, match="upgrades are disabled"):
        chain.add_compose_hash(app_id, rand32())


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        ("add_compose_hash", (b"\x01" * 32,)),
        ("remove_compose_hash", (b"\x01" * 32,)),
        ("add_device", (b"\x01" * 32,)),
        ("remove_device", (b"\x01" * 32,)),
        ("set_allow_any_device", (False,)),
        ("set_require_tcb_up_to_date", (True,)),
        ("disable_upgrades", ()),
        ("transfer_ownership", ("0x" + "22" * 20,)),
        ("retire_instance", ("0x" + "00" * 19 + "01",)),
    ],
)
def test_app_owner_only(
    chain: ChainClient, app: tuple[str, bytes], fn: str, args: tuple[object, ...]
) -> None:
    app_id, h = app
    stranger = chain.with_signer(chain.keys[5])  # type: ignore[attr-defined]
    with pytest.raises(ContractReverted, match="caller is not the owner"):
        stranger.transact("AppAuth", app_id, fn, *args)
    assert chain.is_app_allowed(boot_info(app_id, h))[0]  # nothing changed


def test_app_ownership_two_step(chain: ChainClient, app: tuple[str, bytes]) -> None:
    app_id, _ = app
    new = chain.with_signer(chain.keys[1])  # type: ignore[attr-defined]
    other = chain.with_signer(chain.keys[2])  # type: ignore[attr-defined]
    chain.transact("AppAuth", app_id, "transfer_ownership", new.address)
    assert chain.app_owner(app_id) == chain.address  # not yet
    with pytest.raises(ContractReverted, match="caller is not the pending owner"):
        other.transact("AppAuth", app_id, "accept_ownership")
    new.transact("AppAuth", app_id, "accept_ownership")
    assert chain.app_owner(app_id) == new.address
    with pytest.raises(ContractReverted, match="caller is not the owner"):
        chain.add_compose_hash(app_id, rand32())
    new.add_compose_hash(app_id, rand32())


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        ("add_os_image_hash", (b"\x01" * 32,)),
        ("remove_os_image_hash", (OS_IMAGE,)),
        ("add_kms_aggregated_mr", (b"\x01" * 32,)),
        ("remove_kms_aggregated_mr", (b"\x01" * 32,)),
        ("add_kms_device", (b"\x01" * 32,)),
        ("remove_kms_device", (b"\x01" * 32,)),
        ("set_kms_info", (b"\x02" * 33, b"\x03" * 65, b"\x04" * 32)),
        ("set_gateway_app_id", ("0x" + "22" * 20,)),
        ("transfer_ownership", ("0x" + "22" * 20,)),
    ],
)
def test_kms_owner_only(
    chain: ChainClient, app: tuple[str, bytes], fn: str, args: tuple[object, ...]
) -> None:
    stranger = chain.with_signer(chain.keys[5])  # type: ignore[attr-defined]
    with pytest.raises(ContractReverted, match="caller is not the owner"):
        stranger.transact("KmsAuth", chain.kms_auth, fn, *args)


def test_set_app_blueprint_owner_only(chain: ChainClient) -> None:
    stranger = chain.with_signer(chain.keys[5])  # type: ignore[attr-defined]
    with pytest.raises(ContractReverted, match="caller is not the owner"):
        stranger.transact(
            "KmsAuth", chain.kms_auth, "set_app_blueprint", chain.deployment["AppAuthBlueprint"]
        )


def test_register_app_rules(chain: ChainClient, app: tuple[str, bytes]) -> None:
    app_id, _ = app
    with pytest.raises(ContractReverted, match="app already registered"):
        chain.register_existing_app(app_id)
    with pytest.raises(ContractReverted, match="app is not a contract"):
        chain.register_existing_app("0x" + "33" * 20)
    # an AppAuth deployed outside the factory can be registered by anyone (registration grants nothing)
    h = rand32()
    own = chain.deploy_contract("AppAuth", chain.address, False, False, True, b"\0" * 32, h)
    assert not chain.is_registered(own)
    assert chain.is_app_allowed(boot_info(own, h)) == (False, "app not registered")
    chain.with_signer(chain.keys[3]).register_existing_app(own)  # type: ignore[attr-defined]
    assert chain.is_app_allowed(boot_info(own, h))[0]


def test_kms_allowed_rules(chain: ChainClient) -> None:
    bi = boot_info("0x" + "00" * 20, b"\0" * 32)
    assert chain.is_kms_allowed(bi) == (False, "OS image not allowed")
    chain.add_os_image(OS_IMAGE)
    assert chain.is_kms_allowed(bi) == (False, "KMS aggregated measurement not allowed")
    chain.add_kms_mr(bi.mr_aggregated)
    assert chain.is_kms_allowed(bi) == (False, "KMS device not allowed")
    chain.add_kms_device(DEVICE)
    assert chain.is_kms_allowed(bi) == (True, "")
    assert chain.is_kms_allowed(dataclasses.replace(bi, tcb_status="OutOfDate")) == (
        False,
        "TCB status is not UpToDate",
    )
    assert not chain.is_kms_allowed(dataclasses.replace(bi, device_id=rand32()))[0]
    assert not chain.is_kms_allowed(dataclasses.replace(bi, mr_aggregated=rand32()))[0]
    chain.transact("KmsAuth", chain.kms_auth, "remove_kms_device", DEVICE)
    assert chain.is_kms_allowed(bi) == (False, "KMS device not allowed")


def test_kms_info_roundtrip(chain: ChainClient) -> None:
    chain.set_kms_info(b"\x02" * 33, b"\x04" * 65, b"\x09" * 32)
    gw = chain.register_app(None, rand32())
    chain.set_gateway_app_id(gw)
    info = chain.kms_info()
    assert info == {
        "k256_pubkey": b"\x02" * 33,
        "ca_pubkey": b"\x04" * 65,
        "quote_hash": b"\x09" * 32,
        "gateway_app_id": gw,
    }


def test_every_change_emits_an_event(chain: ChainClient, app: tuple[str, bytes]) -> None:
    app_id, _ = app
    before = len(chain.events("AppAuth", app_id))
    chain.add_compose_hash(app_id, rand32())
    chain.transact("AppAuth", app_id, "set_allow_any_device", False)
    chain.transact("AppAuth", app_id, "add_device", rand32())
    chain.transact("AppAuth", app_id, "disable_upgrades")
    chain.retire_instance(app_id, INSTANCE)
    names = [e["event"] for e in chain.events("AppAuth", app_id)[before:]]
    assert names == [
        "ComposeHashAdded",
        "AllowAnyDeviceSet",
        "DeviceAdded",
        "UpgradesDisabled",
        "InstanceRetired",
    ]


INSTANCE = "0x" + "1e" * 20


def test_retired_instance_is_refused_for_good(chain: ChainClient, app: tuple[str, bytes]) -> None:
    app_id, h = app
    mine = boot_info(app_id, h, instance_id=bytes.fromhex(INSTANCE[2:]))
    sibling = boot_info(app_id, h, instance_id=b"\x2f" * 20)
    assert chain.is_app_allowed(mine) == (True, "") and not chain.is_instance_retired(app_id, INSTANCE)
    r = chain.retire_instance(app_id, INSTANCE)
    e = chain.event_of(r, "AppAuth", "InstanceRetired")
    assert e["instance_id"].lower() == INSTANCE and e["by"] == chain.address
    assert chain.is_instance_retired(app_id, INSTANCE)
    # through KmsAuth (what the KMS asks) and through the app's own AppAuth
    assert chain.is_app_allowed(mine) == (False, "instance retired")
    assert chain.call("AppAuth", app_id, "is_app_allowed", mine.to_abi()) == (False, "instance retired")
    assert chain.is_app_allowed(sibling) == (True, "")  # other instances of the app are untouched
    # nothing brings it back: not a new compose hash, not disabling upgrades, not retiring it again
    new = rand32()
    chain.add_compose_hash(app_id, new)
    assert chain.is_app_allowed(dataclasses.replace(mine, compose_hash=new)) == (False, "instance retired")
    with pytest.raises(ContractReverted, match="instance already retired"):
        chain.retire_instance(app_id, INSTANCE)
    chain.transact("AppAuth", app_id, "disable_upgrades")
    chain.retire_instance(app_id, "0x" + "2f" * 20)  # still possible once upgrades are frozen
    assert chain.is_app_allowed(sibling) == (False, "instance retired")
    with pytest.raises(ContractReverted, match="no instance id"):
        chain.retire_instance(app_id, "0x" + "00" * 20)
    state = chain.app_state(app_id)
    assert [i.lower() for i in state.retired_instances] == [INSTANCE, "0x" + "2f" * 20]


def test_boot_info_validation() -> None:
    with pytest.raises(ValueError, match="app_id"):
        BootInfo(
            b"\0" * 19, b"\0" * 32, b"\0" * 20, b"\0" * 32, b"\0" * 32, b"\0" * 32, b"\0" * 32, "UpToDate"
        )
    with pytest.raises(ValueError, match="tcb_status"):
        BootInfo(b"\0" * 20, b"\0" * 32, b"\0" * 20, b"\0" * 32, b"\0" * 32, b"\0" * 32, b"\0" * 32, "x" * 40)
    with pytest.raises(ValueError, match="advisory_ids"):
        BootInfo(
            b"\0" * 20,
            b"\0" * 32,
            b"\0" * 20,
            b"\0" * 32,
            b"\0" * 32,
            b"\0" * 32,
            b"\0" * 32,
            "UpToDate",
            tuple("a" for _ in range(65)),
        )
