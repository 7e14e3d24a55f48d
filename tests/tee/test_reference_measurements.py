"""reference_measurements: the simulator's reference values equal what a SimulatedTdx really measures."""

from __future__ import annotations

import hashlib

import pytest

from teecloud.attestation.dcap import parse_quote
from teecloud.tee import TeeUsageError
from teecloud.tee.simulated import SimulatedTdx, os_image_hash_for, reference_measurements

IMAGES = ("teecloud-sim-os-0.1", "teecloud-sim-os-0.2", "dstack-0.5.3")
SHAPES = ((2, 2 * 1024**3), (1, 512 * 1024**2), (8, 16 * 1024**3), (64, 3 * 1024**3 + 4096))


@pytest.mark.parametrize("image", IMAGES)
@pytest.mark.parametrize(("cpus", "memory"), SHAPES)
def test_reference_equals_a_booted_cvm(image: str, cpus: int, memory: int) -> None:
    tee = SimulatedTdx(os_image=image, cpu_count=cpus, memory_size=memory)
    ref = reference_measurements(tee.os_image_hash, cpu_count=cpus, memory_size=memory)
    assert set(ref) == {"mrtd", "rtmr0", "rtmr1", "rtmr2"}
    measured = tee.measurements()
    assert {k: measured[k] for k in ref} == ref
    # and the quote itself carries those values
    quoted = parse_quote(tee.quote(b"ref"))["measurements"]
    assert {k: quoted[k] for k in ref} == ref


@pytest.mark.parametrize("image", IMAGES)
def test_image_only_registers_do_not_depend_on_vm_shape(image: str) -> None:
    h = os_image_hash_for(image)
    ref = reference_measurements(h)
    assert set(ref) == {"mrtd", "rtmr1", "rtmr2"}
    for cpus, memory in SHAPES:
        m = SimulatedTdx(os_image=image, cpu_count=cpus, memory_size=memory).measurements()
        assert {k: m[k] for k in ref} == ref
    rtmr0s = {reference_measurements(h, cpu_count=c, memory_size=m)["rtmr0"] for c, m in SHAPES}
    assert len(rtmr0s) == len(SHAPES)  # RTMR0 does read the VM shape


def test_images_differ_in_every_register() -> None:
    a = reference_measurements(os_image_hash_for(IMAGES[0]), cpu_count=2, memory_size=1 << 31)
    b = reference_measurements(os_image_hash_for(IMAGES[1]), cpu_count=2, memory_size=1 << 31)
    assert all(a[k] != b[k] for k in a)


def test_reference_is_keyed_by_hash_not_name() -> None:
    # any 32-byte identifier has reference values; the on-chain allowlist decides which images are allowed
    h = hashlib.sha256(b"some other image").digest()
    assert reference_measurements(h) != reference_measurements(os_image_hash_for(IMAGES[0]))


def test_runtime_events_and_extensions_leave_the_reference_behind() -> None:
    tee = SimulatedTdx()
    ref = reference_measurements(tee.os_image_hash, cpu_count=2, memory_size=2 * 1024**3)
    tee.emit_event("app-id", bytes(20))  # RTMR3 only: still matches
    assert {k: tee.measurements()[k] for k in ref} == ref
    tee.extend_rtmr(1, hashlib.sha384(b"another kernel").digest())
    assert tee.measurements()["rtmr1"] != ref["rtmr1"]


@pytest.mark.parametrize(
    ("args", "kw"),
    [
        ((b"\x00" * 31,), {}),
        (("ab" * 32,), {}),
        ((bytes(32),), {"cpu_count": 2}),
        ((bytes(32),), {"memory_size": 1 << 30}),
        ((bytes(32),), {"cpu_count": 0, "memory_size": 1 << 30}),
        ((bytes(32),), {"cpu_count": 2, "memory_size": -1}),
        ((bytes(32),), {"cpu_count": True, "memory_size": 1 << 30}),
        ((bytes(32),), {"cpu_count": 1 << 32, "memory_size": 1 << 30}),
    ],
)
def test_bad_arguments_are_usage_errors(args: tuple[object, ...], kw: dict[str, object]) -> None:
    with pytest.raises(TeeUsageError):
        reference_measurements(*args, **kw)  # type: ignore[arg-type]


def test_simulated_tdx_rejects_an_impossible_vm_shape() -> None:
    with pytest.raises(TeeUsageError, match="cpu_count"):
        SimulatedTdx(cpu_count=-1)
