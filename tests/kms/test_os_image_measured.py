"""The KMS's OS-image step for real images (teecloud.kms.os_images.MeasuredOsImages): the allowed
os_image_hash -> its sha256sum.txt -> its measurement.tdx.cbor -> MRTD/RTMR0-2 for the stated vm_config ->
compared with the quote. The CVM here quotes (in the real DCAP v4 format, simulated signer) the registers and
RTMR0-2 event log of a real dstack boot on TDX hardware (shared/vectors/tdx/dstack_quote_report.json), and
the image's measurement file carries that boot's kernel/command-line/initrd digests, MRTD and dstack's TD-HOB
witness: the values a real image's file holds. Every deviation is refused at step os_image, nothing released.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from teecloud.chain.errors import ContractReverted
from teecloud.image.measurement import MEASUREMENT_FILE, TdxImageMeasurement, encode
from teecloud.image.tdx import sha384
from teecloud.kms.errors import AccessDenied
from teecloud.kms.os_images import SHA256SUM_FILE, MeasuredOsImages
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import (
    COMPOSE_V1,
    AppCvm,
    Kms,
    World,
    boot_app,
    client_cert,
    denied_record,
)

DSTACK_WITNESS = bytes.fromhex("80100904000609020b021010")  # dstack-mr's TD-HOB witness test value


@pytest.fixture(scope="module")
def real_boot(vectors: Path) -> dict[str, Any]:
    report = json.loads((vectors / "tdx" / "dstack_quote_report.json").read_text())
    log = json.loads(report["event_log"])
    quote = bytes.fromhex(report["quote"])
    return {
        "events": [(e["imr"], e["event_type"], bytes.fromhex(e["digest"])) for e in log if e["imr"] < 3],
        "mrtd": quote[48 + 136 : 48 + 184],  # DCAP quote v4: 48-byte header, MRTD at body offset 136
        "vm_config": json.loads(report["vm_config"]),
    }


def _measurement(boot: dict[str, Any]) -> TdxImageMeasurement:
    digests = {imr: [d for i, _, d in boot["events"] if i == imr] for imr in (1, 2)}
    return TdxImageMeasurement(
        cmdline_sha384=digests[2][0],
        kernel_authenticode=digests[1][0],
        initrd_sha384=digests[2][1],
        mrtd_single_pass=boot["mrtd"],
        mrtd_two_pass=sha384(b"QEMU 8's page order"),
        td_hob_witness=DSTACK_WITNESS,
    )


def publish(directory: Path, measurement: bytes) -> bytes:
    """An image's files as dstack's build lays them out; returns its os_image_hash (sha256(sha256sum.txt))."""
    sums = (
        f"{hashlib.sha256(b'the kernel').hexdigest()}  bzImage\n"
        f"{hashlib.sha256(measurement).hexdigest()}  {MEASUREMENT_FILE}\n"
    ).encode()
    os_image_hash = hashlib.sha256(sums).digest()
    image_dir = directory / os_image_hash.hex()
    image_dir.mkdir(parents=True)
    (image_dir / SHA256SUM_FILE).write_bytes(sums)
    (image_dir / MEASUREMENT_FILE).write_bytes(measurement)
    return os_image_hash


def allow(world: World, os_image_hash: bytes) -> None:
    """KmsAuth.addOsImage (the module's tests share the chain; the image is the same bytes each time)."""
    try:
        world.chain.add_os_image(os_image_hash)
    except ContractReverted as exc:
        assert "already allowed" in str(exc)


class RealBootTdx(SimulatedTdx):
    """A CVM that quotes a real dstack boot's MRTD and RTMR0-2 (its firmware, kernel and initrd events), then
    runs teecloud's boot events into RTMR3. `events` may be altered to play a host that booted otherwise."""

    def __init__(
        self, home: Path, *, boot: dict[str, Any], os_image_hash: bytes, events: list[Any] | None = None
    ) -> None:
        self._events = events if events is not None else boot["events"]
        super().__init__(home)
        self._os_image_hash = os_image_hash
        self._mrtd = boot["mrtd"]
        self._vm = {**boot["vm_config"], "os_image_hash": os_image_hash.hex()}

    def _boot_measurements(self) -> list[tuple[int, int, bytes]]:
        return list(self._events)

    def vm_config(self) -> dict[str, Any]:
        return dict(self._vm)


@pytest.fixture
def image(tmp_path: Path, real_boot: dict[str, Any], world: World, kms: Kms) -> dict[str, Any]:
    directory = tmp_path / "os-images"
    os_image_hash = publish(directory, encode(_measurement(real_boot)))
    allow(world, os_image_hash)
    kms.service.os_image_reference = MeasuredOsImages(directory)
    return {"dir": directory, "hash": os_image_hash}


def real_app(home: Path, world: World, boot: dict[str, Any], image: dict[str, Any], **kw: Any) -> AppCvm:
    app_id = world.register(COMPOSE_V1)
    tee = RealBootTdx(home, boot=boot, os_image_hash=image["hash"], **kw)
    iid = hashlib.sha256(app_id + b"instance").digest()[:20]
    boot_app(tee, app_id, COMPOSE_V1, iid)
    return AppCvm(tee, app_id, COMPOSE_V1, iid)


def _vm(app: AppCvm, **changes: Any) -> str:
    return json.dumps({**app.tee.vm_config(), **changes})


def denied(kms: Kms, app: AppCvm, vm: str) -> str:
    _, der = client_cert(kms, app)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=vm)
    assert err.value.step == "os_image", err.value.reason
    rec = denied_record(kms)
    assert (rec.step, rec.reason) == ("os_image", err.value.reason)
    return err.value.reason


def test_a_cvm_of_the_measured_image_gets_its_keys(
    teecloud_home: Path, world: World, kms: Kms, real_boot: dict[str, Any], image: dict[str, Any]
) -> None:
    app = real_app(teecloud_home, world, real_boot, image)
    _, der = client_cert(kms, app)
    keys = kms.service.get_app_key(der, vm_config=_vm(app))
    assert keys.app_id == app.app_id.hex() and keys.os_image_hash == image["hash"].hex()


# every recomputed event of RTMR0-2 (RTMR0's ACPI events 8-10 are the log's own: the last test)
RECOMPUTED = [(0, k) for k in range(13) if k not in (8, 9, 10)]
RECOMPUTED += [(1, k) for k in range(5)] + [(2, 0), (2, 1)]


@pytest.mark.parametrize(("imr", "index"), RECOMPUTED, ids=[f"rtmr{i}-event{k}" for i, k in RECOMPUTED])
def test_a_cvm_that_booted_something_else_is_denied(
    teecloud_home: Path,
    world: World,
    kms: Kms,
    real_boot: dict[str, Any],
    image: dict[str, Any],
    imr: int,
    index: int,
) -> None:
    """Each event the firmware, kernel, command line or initrd put in RTMR0-2, altered (the TD HOB of
    another memory layout, another firmware volume or variable, kernel, command line, initrd, boot option):
    the log still replays to the quote, and the register is named."""
    events = list(real_boot["events"])
    at = [k for k, (i, _, _) in enumerate(events) if i == imr][index]
    i, kind, digest = events[at]
    events[at] = (i, kind, sha384(b"the host's " + digest))
    app = real_app(teecloud_home, world, real_boot, image, events=events)
    reason = denied(kms, app, _vm(app))
    assert f"RTMR{imr}" in reason and "MRTD" not in reason


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"memory_size": 32 << 30}, "RTMR0"),  # another TD HOB
        ({"qemu_version": "8.2.2"}, "MRTD"),  # the other page order
    ],
)
def test_a_false_vm_config_is_denied(
    teecloud_home: Path,
    world: World,
    kms: Kms,
    real_boot: dict[str, Any],
    image: dict[str, Any],
    changes: dict[str, Any],
    named: str,
) -> None:
    app = real_app(teecloud_home, world, real_boot, image)
    assert named in denied(kms, app, _vm(app, **changes))


def test_a_shape_without_a_stable_kernel_hash_is_refused_with_the_reason(
    teecloud_home: Path, world: World, kms: Kms, real_boot: dict[str, Any], image: dict[str, Any]
) -> None:
    app = real_app(teecloud_home, world, real_boot, image)
    reason = denied(kms, app, _vm(app, memory_size=5 << 29))  # 2.5 GiB
    assert "cannot compute the reference" in reason and "2.75 GiB" in reason


def test_a_firmware_log_of_another_layout_is_refused(
    teecloud_home: Path, world: World, kms: Kms, real_boot: dict[str, Any], image: dict[str, Any]
) -> None:
    events = [*real_boot["events"], (0, 0x80000001, sha384(b"one more variable"))]
    app = real_app(teecloud_home, world, real_boot, image, events=events)
    assert "has 14 events, not the 13" in denied(kms, app, _vm(app))


def test_measurement_files_that_do_not_bind_to_the_image_are_refused(
    teecloud_home: Path, world: World, kms: Kms, real_boot: dict[str, Any], image: dict[str, Any]
) -> None:
    app = real_app(teecloud_home, world, real_boot, image)
    image_dir = image["dir"] / image["hash"].hex()
    forged = TdxImageMeasurement(
        **{**_measurement(real_boot).__dict__, "kernel_authenticode": sha384(b"the host's kernel")}
    )
    (image_dir / MEASUREMENT_FILE).write_bytes(encode(forged))
    reason = denied(kms, app, _vm(app))
    assert "measurement files are unusable" in reason and "not the one OS image" in reason
    (image_dir / MEASUREMENT_FILE).unlink()
    assert "measurement files are unusable" in denied(kms, app, _vm(app))


def test_an_image_without_measurement_files_is_refused(
    teecloud_home: Path, world: World, kms: Kms, real_boot: dict[str, Any], image: dict[str, Any]
) -> None:
    elsewhere = TdxImageMeasurement(**{**_measurement(real_boot).__dict__, "mrtd_two_pass": bytes(48)})
    other = publish(image["dir"].parent / "elsewhere", encode(elsewhere))
    allow(world, other)
    app = real_app(teecloud_home, world, real_boot, {"hash": other})
    assert "no reference measurements for OS image" in denied(kms, app, _vm(app))


def test_lite_verification_takes_the_acpi_digests_from_the_log(
    teecloud_home: Path, world: World, kms: Kms, real_boot: dict[str, Any], image: dict[str, Any]
) -> None:
    """The documented limit of lite verification (docs/threat-model.md): other ACPI tables, logged and
    quoted, are accepted; nothing else in RTMR0 may change (test above)."""
    events = list(real_boot["events"])
    for acpi in [k for k, (i, _, _) in enumerate(events) if i == 0][8:11]:
        events[acpi] = (0, 0xA, sha384(b"the host's ACPI data " + events[acpi][2]))
    app = real_app(teecloud_home, world, real_boot, image, events=events)
    _, der = client_cert(kms, app)
    assert kms.service.get_app_key(der, vm_config=_vm(app)).app_id == app.app_id.hex()


def test_the_reference_without_a_shape_gives_the_image_registers(
    real_boot: dict[str, Any], tmp_path: Path
) -> None:
    h = publish(tmp_path, encode(_measurement(real_boot)))
    ref = MeasuredOsImages(tmp_path)
    regs = ref(h)
    assert regs is not None and set(regs) == {"mrtd", "rtmr1", "rtmr2"}
    assert regs["mrtd"] == real_boot["mrtd"]
    assert ref(bytes(32)) is None and ref(b"short") is None
    with pytest.raises(AccessDenied, match="both cpu_count and memory_size"):
        ref(h, cpu_count=2)
