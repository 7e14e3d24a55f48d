"""The os-image-hash event is believed only when the booted firmware (MRTD), kernel (RTMR1) and command line
+ initrd (RTMR2) are the claimed image's reference values. A CVM that claims an allowed image while running
another kernel is denied at step `os_image`, the differing register named, audited, nothing released."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from teecloud.kms.api import PATH_GET_APP_KEY
from teecloud.kms.errors import AccessDenied, KmsUsageError
from teecloud.kms.service import (
    KmsServer,
    KmsService,
    simulated_os_image_mrtd,
    simulated_os_image_reference,
)
from teecloud.tee.simulated import SimulatedTdx, os_image_hash_for, reference_measurements
from tests.kms.conftest import (
    COMPOSE_V1,
    SIM_OS,
    AppCvm,
    Kms,
    World,
    assert_nothing_released,
    boot_app,
    client_cert,
    denied_record,
    make_app,
    make_kms,
    post_with_cert,
)


class OtherBootTdx(SimulatedTdx):
    """A CVM that boots its claimed image's firmware but measures something else into the given RTMRs
    (another kernel, command line or initrd). Its event log still replays: only the reference differs."""

    def __init__(self, home: Path, *, swap: tuple[int, ...], **kw: Any) -> None:
        self._swap = swap  # read by _boot_measurements, which the base __init__ calls
        super().__init__(home, **kw)

    def _boot_measurements(self) -> list[tuple[int, int, bytes]]:
        return [
            (imr, ev, hashlib.sha384(b"attacker's " + digest).digest() if imr in self._swap else digest)
            for imr, ev, digest in super()._boot_measurements()
        ]


def other_boot_app(home: Path, app_id: bytes, *, swap: tuple[int, ...], **kw: Any) -> AppCvm:
    tee = OtherBootTdx(home, swap=swap, **kw)
    iid = hashlib.sha256(app_id + b"instance").digest()[:20]
    boot_app(tee, app_id, COMPOSE_V1, iid)  # claims os_image_hash_for(SIM_OS), an allowed image
    return AppCvm(tee, app_id, COMPOSE_V1, iid)


@pytest.fixture
def kms(teecloud_home: Path, world: World) -> Kms:
    return make_kms(teecloud_home, world.chain)


@pytest.fixture
def server(kms: Kms) -> Iterator[KmsServer]:
    with KmsServer(kms.service) as s:
        yield s


def http_denied(kms: Kms, server: KmsServer, app: AppCvm) -> str:
    key, der = client_cert(kms, app)
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der)
    assert status == 403, body
    assert_nothing_released(body)
    assert body["step"] == "os_image", body
    rec = denied_record(kms)
    assert (rec.step, rec.reason) == ("os_image", body["reason"])
    assert rec.boot_info is not None and rec.boot_info["os_image_hash"] == os_image_hash_for(SIM_OS).hex()
    return str(body["reason"])


def http_allowed(kms: Kms, server: KmsServer, app: AppCvm) -> dict[str, Any]:
    key, der = client_cert(kms, app)
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der)
    assert status == 200, body
    assert body["app_id"] == app.app_id.hex() and body["disk_crypt_key"]
    assert kms.audit.read()[-1].decision == "allowed"
    return body


# ------------------------------------------------------------------------------------------ the simulator


def test_the_kms_reference_is_the_simulators(teecloud_home: Path) -> None:
    for image in (SIM_OS, "another-image"):
        tee = SimulatedTdx(teecloud_home, os_image=image)
        ref = simulated_os_image_reference(tee.os_image_hash)
        assert ref is not None and set(ref) == {"mrtd", "rtmr1", "rtmr2"}
        assert ref == {k: tee.measurements()[k] for k in ref}
        assert ref == reference_measurements(tee.os_image_hash)
    assert simulated_os_image_reference(b"\x01" * 31) is None
    assert simulated_os_image_mrtd is simulated_os_image_reference  # former name, same check


# ------------------------------------------------------------------------------------------ end to end


def test_the_normal_app_gets_its_keys(teecloud_home: Path, world: World, kms: Kms, server: KmsServer) -> None:
    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1)
    http_allowed(kms, server, app)


@pytest.mark.parametrize(
    ("swap", "named", "not_named"),
    [
        ((1,), ["RTMR1"], ["MRTD", "RTMR2"]),
        ((2,), ["RTMR2"], ["MRTD", "RTMR1"]),
        ((1, 2), ["RTMR1", "RTMR2"], ["MRTD"]),
    ],
)
def test_another_kernel_or_initrd_is_denied(
    teecloud_home: Path,
    world: World,
    kms: Kms,
    server: KmsServer,
    swap: tuple[int, ...],
    named: list[str],
    not_named: list[str],
) -> None:
    app_id = world.register(COMPOSE_V1)
    bad = other_boot_app(teecloud_home, app_id, swap=swap)
    # same firmware as the allowed image: the old MRTD-only check let this CVM through
    assert bad.tee.measurements()["mrtd"] == reference_measurements(os_image_hash_for(SIM_OS))["mrtd"]
    reason = http_denied(kms, server, bad)
    for reg in named:
        assert reg in reason, reason
    for reg in not_named:
        assert reg not in reason, reason
    assert os_image_hash_for(SIM_OS).hex() in reason
    # the same app on the real image still gets its keys from the same KMS
    http_allowed(kms, server, make_app(teecloud_home, app_id, COMPOSE_V1))


def test_rtmr0_swap_alone_passes_the_image_check(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    """RTMR0 depends on the VM shape, which the quote does not carry: the simulated reference does not
    give it, so a different firmware configuration is not an OS-image mismatch (docs/kms.md step 6)."""
    app_id = world.register(COMPOSE_V1)
    http_allowed(kms, server, other_boot_app(teecloud_home, app_id, swap=(0,)))
    http_allowed(kms, server, make_app(teecloud_home, app_id, COMPOSE_V1, cpu_count=8, memory_size=8 << 30))


def test_an_extension_outside_the_event_log_is_denied(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    """An extra extend_rtmr(1, ...) with no event-log entry: the replay no longer reaches RTMR1."""
    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1)
    app.tee.extend_rtmr(1, hashlib.sha384(b"late kernel module").digest())
    key, der = client_cert(kms, app)
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der)
    assert status == 403, body
    assert_nothing_released(body)
    assert body["step"] == "event_log_verified" and "RTMR1" in body["reason"], body
    assert denied_record(kms).reason == body["reason"]


def test_sign_cert_is_denied_too(teecloud_home: Path, world: World, kms: Kms) -> None:
    bad = other_boot_app(teecloud_home, world.register(COMPOSE_V1), swap=(1,))
    _, der = client_cert(kms, bad)
    with pytest.raises(AccessDenied) as err:
        kms.service.sign_cert(der, "unused")
    assert err.value.step == "os_image" and "RTMR1" in err.value.reason
    assert denied_record(kms).step == "os_image"


# ------------------------------------------------------------------------------------------ configuration


def deny_with(kms: Kms, app: AppCvm, ref: Any) -> AccessDenied:
    kms.service.os_image_reference = ref
    _, der = client_cert(kms, app)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der)
    assert err.value.step == "os_image"
    rec = denied_record(kms)
    assert (rec.step, rec.reason) == ("os_image", err.value.reason)
    return err.value


def test_a_reference_with_rtmr0_compares_it(teecloud_home: Path, world: World, kms: Kms) -> None:
    """A deployment with one fixed VM shape may give rtmr0 in its reference; then it is compared too."""

    def fixed_shape(h: bytes) -> Mapping[str, bytes] | None:
        return reference_measurements(h, cpu_count=2, memory_size=2 * 1024**3)

    app_id = world.register(COMPOSE_V1)
    err = deny_with(
        kms, make_app(teecloud_home, app_id, COMPOSE_V1, cpu_count=4, memory_size=2 * 1024**3), fixed_shape
    )
    assert "RTMR0" in err.reason and "RTMR1" not in err.reason
    _, der = client_cert(kms, make_app(teecloud_home, app_id, COMPOSE_V1))  # default shape: 2 CPUs, 2 GiB
    assert kms.service.get_app_key(der).app_id == app_id.hex()


def test_an_incomplete_reference_fails_closed(teecloud_home: Path, world: World, kms: Kms) -> None:
    """A reference function giving MRTD only (the old check) cannot vouch for the kernel: refused."""
    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1)
    mrtd_only = lambda h: {"mrtd": reference_measurements(h)["mrtd"]}  # noqa: E731
    err = deny_with(kms, app, mrtd_only)
    assert "RTMR1" in err.reason and "RTMR2" in err.reason and "lack" in err.reason
    err = deny_with(kms, app, lambda h: reference_measurements(h)["mrtd"])  # a bare MRTD (old signature)
    assert "not a register map" in err.reason
    err = deny_with(kms, app, lambda h: None)
    assert "no reference measurements for OS image" in err.reason


def test_a_failing_reference_function_fails_closed(teecloud_home: Path, world: World, kms: Kms) -> None:
    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1)

    def broken(h: bytes) -> Mapping[str, bytes] | None:
        raise OSError("reference store unreadable")

    kms.service.os_image_reference = broken
    _, der = client_cert(kms, app)
    with pytest.raises(OSError):
        kms.service.get_app_key(der)
    rec = denied_record(kms)
    assert rec.step == "internal"


def test_old_keyword_still_configures_the_full_check(teecloud_home: Path, world: World, kms: Kms) -> None:
    kw: dict[str, Any] = {
        "state": kms.service.state,
        "identity": kms.service.identity,
        "tee": kms.tee,
        "chain": world.chain,
        "collateral": kms.service.collateral,
        "audit": kms.service.audit,
        "config": kms.service.config,
        "dev_root_der": kms.tee.dev_root_der(),
        "block_number": world.chain.block_number,
    }
    legacy = KmsService(**kw, os_image_mrtd=simulated_os_image_mrtd)
    assert legacy.os_image_reference is simulated_os_image_reference
    bad = other_boot_app(teecloud_home, world.register(COMPOSE_V1), swap=(2,))
    _, der = client_cert(kms, bad)
    with pytest.raises(AccessDenied) as err:
        legacy.get_app_key(der)
    assert err.value.step == "os_image" and "RTMR2" in err.value.reason
    with pytest.raises(KmsUsageError, match="not both"):
        KmsService(
            **kw, os_image_reference=simulated_os_image_reference, os_image_mrtd=simulated_os_image_mrtd
        )
