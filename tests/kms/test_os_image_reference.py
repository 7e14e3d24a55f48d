"""The os-image-hash event is believed only when the booted firmware (MRTD), kernel (RTMR1) and command line
+ initrd (RTMR2) are the claimed image's reference values, and — for app keys and certificates — the firmware
configuration (RTMR0) is the reference for the VM shape the caller's vm_config states. A CVM that claims an
allowed image while running another kernel or other ACPI tables is denied at step `os_image`, the differing
register named, audited, nothing released; so is a request without a well-formed, matching vm_config."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from teecloud.kms.api import PATH_GET_APP_KEY
from teecloud.kms.errors import AccessDenied
from teecloud.kms.server import KmsServer
from teecloud.tee.simulated import (
    SimulatedTdx,
    os_image_hash_for,
    reference_measurements,
    simulated_os_image_reference,
)
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
    post_with_cert,
    vm_config,
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


def http_denied(kms: Kms, server: KmsServer, app: AppCvm, vm: Any = None) -> str:
    """GetAppKey over HTTP, denied at `os_image`; `vm` is the body's vm_config (default: the app's own)."""
    key, der = client_cert(kms, app)
    body_in = {} if vm is False else {"vm_config": vm_config(app) if vm is None else vm}
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, body_in)
    assert status == 403, body
    assert_nothing_released(body)
    assert body["step"] == "os_image", body
    rec = denied_record(kms)
    assert (rec.step, rec.reason) == ("os_image", body["reason"])
    assert rec.boot_info is not None and rec.boot_info["os_image_hash"] == os_image_hash_for(SIM_OS).hex()
    return str(body["reason"])


def http_allowed(kms: Kms, server: KmsServer, app: AppCvm) -> dict[str, Any]:
    key, der = client_cert(kms, app)
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm_config(app)})
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
        shaped = simulated_os_image_reference(tee.os_image_hash, cpu_count=2, memory_size=2 * 1024**3)
        assert shaped is not None and shaped == {k: tee.measurements()[k] for k in (*ref, "rtmr0")}
    assert simulated_os_image_reference(b"\x01" * 31) is None
    assert simulated_os_image_reference(bytes(32), cpu_count=0, memory_size=1) is None  # bad shape: none


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


def test_rtmr0_of_another_firmware_configuration_is_denied(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    """Other ACPI tables (RTMR0) under the true vm_config: denied naming RTMR0 only."""
    app_id = world.register(COMPOSE_V1)
    reason = http_denied(kms, server, other_boot_app(teecloud_home, app_id, swap=(0,)))
    assert "RTMR0" in reason and not any(r in reason for r in ("MRTD", "RTMR1", "RTMR2")), reason


def test_another_vm_shape_claiming_the_allowed_shape_is_denied(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    """A CVM booted with 8 CPUs and 8 GiB whose client states the usual 2 CPUs / 2 GiB: its RTMR0 is not
    that shape's reference. Stating its real shape, the same CVM gets its keys (the shape only selects the
    reference; RTMR0 must still equal it)."""
    app_id = world.register(COMPOSE_V1)
    big = make_app(teecloud_home, app_id, COMPOSE_V1, cpu_count=8, memory_size=8 << 30)
    usual = make_app(teecloud_home, app_id, COMPOSE_V1)
    lie = vm_config(usual)
    assert lie != vm_config(big)
    reason = http_denied(kms, server, big, lie)
    assert "RTMR0" in reason and "2 CPUs" in reason, reason
    assert not any(r in reason for r in ("MRTD", "RTMR1", "RTMR2")), reason
    with pytest.raises(AccessDenied, match="RTMR0"):
        kms.service.sign_cert(client_cert(kms, big)[1], "unused", vm_config=lie)
    http_allowed(kms, server, big)
    http_allowed(kms, server, usual)


@pytest.mark.parametrize(
    ("vm", "needle"),
    [
        (False, "no vm_config"),  # the field absent
        ("", "no vm_config"),
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ("[" * 3000, "not JSON"),  # nesting: bounded, refused
        ("x" * 5000, "at most 4096"),
        (json.dumps({"cpu_count": 2, "memory_size": 2 << 30}), "os_image_hash"),
        (json.dumps({"os_image_hash": "zz" * 32, "cpu_count": 2, "memory_size": 1}), "os_image_hash"),
        (json.dumps({"os_image_hash": "00" * 32, "cpu_count": "2", "memory_size": 1}), "cpu_count"),
        (json.dumps({"os_image_hash": "00" * 32, "cpu_count": True, "memory_size": 1}), "cpu_count"),
        (json.dumps({"os_image_hash": "00" * 32, "cpu_count": 2**32, "memory_size": 1}), "cpu_count"),
        (json.dumps({"os_image_hash": "00" * 32, "cpu_count": 2, "memory_size": -1}), "memory_size"),
        (json.dumps({"os_image_hash": "00" * 32, "cpu_count": 2, "memory_size": 2.5}), "memory_size"),
        (json.dumps({str(i): i for i in range(65)}), "fields"),
    ],
)
def test_a_missing_or_malformed_vm_config_is_denied(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer, vm: Any, needle: str
) -> None:
    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1)
    reason = http_denied(kms, server, app, vm)
    assert needle in reason, reason


def test_a_vm_config_naming_another_image_is_denied(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1)
    other = SimulatedTdx(teecloud_home, os_image="another-image").vm_config()
    reason = http_denied(kms, server, app, json.dumps(other))
    assert "vm_config names OS image" in reason and other["os_image_hash"] in reason, reason
    assert os_image_hash_for(SIM_OS).hex() in reason


def test_the_client_sends_its_tees_vm_config(teecloud_home: Path, world: World, kms: Kms) -> None:
    """KmsClient puts the TEE's vm_config into GetAppKey and SignCert; a TEE without one sends none (and a
    KMS checking OS images refuses it)."""
    from teecloud.kms.client import KmsClient, UnsafeNoServerCheck, vm_config_json

    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1, cpu_count=4, memory_size=3 << 30)
    assert json.loads(vm_config_json(app.tee)) == app.tee.vm_config()
    assert vm_config_json(object()) == ""
    with KmsServer(kms.service) as server:
        client = KmsClient(server.url, server_check=UnsafeNoServerCheck())
        keys = client.get_app_keys(app.tee, app.app_id, app.instance_id)
        assert keys.os_image_hash == app.tee.os_image_hash
        _, csr = _csr()
        assert len(client.sign_cert(app.tee, csr, app_id=app.app_id)) == 3


def _csr() -> tuple[Any, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    # an empty subject: the KMS names the certificate after the attested app (SignCert's name allowlist)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


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
        kms.service.sign_cert(der, "unused", vm_config=vm_config(bad))
    assert err.value.step == "os_image" and "RTMR1" in err.value.reason
    assert denied_record(kms).step == "os_image"


# ------------------------------------------------------------------------------------------ configuration


def deny_with(kms: Kms, app: AppCvm, ref: Any) -> AccessDenied:
    kms.service.os_image_reference = ref
    _, der = client_cert(kms, app)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=vm_config(app))
    assert err.value.step == "os_image"
    rec = denied_record(kms)
    assert (rec.step, rec.reason) == ("os_image", err.value.reason)
    return err.value


def test_a_reference_with_rtmr0_compares_it(teecloud_home: Path, world: World, kms: Kms) -> None:
    """A deployment with one fixed VM shape may give that shape's rtmr0 whatever shape is stated; a CVM of
    another shape is then refused even when it states its true shape."""

    def fixed_shape(h: bytes, **_stated: Any) -> Mapping[str, bytes] | None:
        return reference_measurements(h, cpu_count=2, memory_size=2 * 1024**3)

    app_id = world.register(COMPOSE_V1)
    err = deny_with(
        kms, make_app(teecloud_home, app_id, COMPOSE_V1, cpu_count=4, memory_size=2 * 1024**3), fixed_shape
    )
    assert "RTMR0" in err.reason and "RTMR1" not in err.reason
    usual = make_app(teecloud_home, app_id, COMPOSE_V1)  # default shape: 2 CPUs, 2 GiB
    _, der = client_cert(kms, usual)
    assert kms.service.get_app_key(der, vm_config=vm_config(usual)).app_id == app_id.hex()


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
    # complete for the image, but no RTMR0 for a VM shape: the firmware configuration is unchecked
    err = deny_with(kms, app, lambda h: reference_measurements(h))  # takes no shape (old signature)
    assert "cpu_count=" in err.reason and "misconfigured" in err.reason
    err = deny_with(kms, app, lambda h, **shape: reference_measurements(h))  # ignores the shape
    assert "lack RTMR0" in err.reason and "2 CPUs" in err.reason
    err = deny_with(kms, app, lambda h, **shape: None if shape else reference_measurements(h))
    assert "no reference measurements for OS image" in err.reason and "2 CPUs" in err.reason


def test_a_failing_reference_function_fails_closed(teecloud_home: Path, world: World, kms: Kms) -> None:
    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1)

    def broken(h: bytes) -> Mapping[str, bytes] | None:
        raise OSError("reference store unreadable")

    kms.service.os_image_reference = broken
    _, der = client_cert(kms, app)
    with pytest.raises(OSError):
        kms.service.get_app_key(der, vm_config=vm_config(app))
    rec = denied_record(kms)
    assert rec.step == "internal"
