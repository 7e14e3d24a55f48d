"""One home per wire format: VmConfig (teecloud.vmconfig) and mr_aggregated (attestation.eventlog)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from teecloud import vmconfig
from teecloud.attestation.eventlog import mr_aggregated
from teecloud.tee.simulated import SimulatedTdx


def test_vm_config_round_trips_and_keeps_unknown_fields(teecloud_home: Path) -> None:
    tee = SimulatedTdx(teecloud_home)
    text = vmconfig.of(tee)
    config = vmconfig.parse(text)
    assert config.os_image_hash == tee.os_image_hash
    assert (config.cpu_count, config.memory_size) == (
        tee.vm_config()["cpu_count"],
        tee.vm_config()["memory_size"],
    )
    assert config.extra["qemu_version"] == "simulated"
    assert json.loads(config.to_json()) == json.loads(text)
    assert vmconfig.parse(json.loads(text)) == config


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("", "no vm_config"),
        (None, "no vm_config"),
        ("x" * 5000, "at most 4096"),
        ("[1]", "not a JSON object"),
        ("{", "not JSON"),
        (json.dumps({f"k{i}": i for i in range(65)}), "more than 64"),
        (json.dumps({"os_image_hash": "ab", "cpu_count": 1, "memory_size": 1}), "32 bytes"),
        (json.dumps({"os_image_hash": "00" * 32, "cpu_count": True, "memory_size": 1}), "cpu_count"),
        (json.dumps({"os_image_hash": "00" * 32, "cpu_count": 1, "memory_size": 2**64}), "memory_size"),
    ],
)
def test_vm_config_refusals_say_what_is_wrong(value: object, needle: str) -> None:
    with pytest.raises(vmconfig.VmConfigError, match=needle):
        vmconfig.parse(value)


def test_mr_aggregated_appends_the_config_registers_only_when_set() -> None:
    ms = {n: bytes([i]) * 48 for i, n in enumerate(("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"))}
    base = b"".join(ms[n] for n in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"))
    zeros = {**ms, "mr_config_id": bytes(48), "mr_owner": bytes(48), "mr_owner_config": bytes(48)}
    assert mr_aggregated(ms) == mr_aggregated(zeros) == hashlib.sha256(base).digest()
    owned = {**zeros, "mr_owner": b"\x07" * 48}
    assert mr_aggregated(owned) == hashlib.sha256(base + bytes(48) + b"\x07" * 48 + bytes(48)).digest()


def test_kms_identity_is_what_verifiers_derive(teecloud_home: Path) -> None:
    """The KMS's mr_aggregated (what KmsAuth allowlists) is the one verifiers derive from its quote."""
    import dataclasses

    from teecloud.attestation.policy import Policy
    from teecloud.attestation.verifier import verify_tdx_with_event_log
    from teecloud.keys.ratls import event_log_json
    from teecloud.kms.bootstrap import boot_kms_tee

    tee = SimulatedTdx(teecloud_home)
    identity = boot_kms_tee(tee)
    ev = verify_tdx_with_event_log(
        tee.quote(b""),
        tee.collateral(),
        event_log_json(tee.event_log()),
        now=int(__import__("time").time()),
        dev_root_der=tee.dev_root_der(),
        policy=dataclasses.replace(Policy.default(), allow_simulated=True),
    )
    assert ev.app_info is not None and ev.app_info.mr_aggregated == identity.mr_aggregated


def test_hex_ids_are_read_one_way() -> None:
    from teecloud.ids import HexError, parse_app_id, parse_hash, parse_hex

    aid = bytes(range(20))
    for text in (aid.hex(), "0x" + aid.hex(), "  0X" + aid.hex().upper() + "\n"):
        assert parse_app_id(text) == aid
    assert parse_hash("ab" * 32) == b"\xab" * 32
    assert parse_hex("") == b""
    for bad, needle in (
        ("zz", "20 bytes of hex"),
        ("ab" * 19, "got 19 bytes"),
        (None, "hex string"),
        ("a" * (2**20 + 2), "longer"),
    ):
        with pytest.raises(HexError, match=needle):
            parse_app_id(bad)
    with pytest.raises(ValueError, match="my_field"):  # a HexError is a ValueError naming the field
        parse_hex("0xq", name="my_field")
