"""The KMS's OS-image step for SEV-SNP evidence (teecloud.kms.os_images.MeasuredOsImages.snp_launch), as
dstack's verify_sev_launch does it: vm_config names the image and the launch shape (sev_snp_measurement:
vcpus, vcpu_type, guest_features), the image's measurement.snp.cbor is bound to that os_image_hash through
sha256sum.txt (from the directory, or carried in vm_config), and the MEASUREMENT recomputed from it must be
the signed one. The honest case is a real SNP launch: dstack's live CVM whose report (tests/kms/data,
verified here) signed MEASUREMENT 7f51e17f… for the image material of tests/image/test_measure_snp_file.py;
the debug-policy case is a real report verified here (google/go-sev-guest's, DEBUG set). Every
deviation is refused at step os_image.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import json
from pathlib import Path

import pytest

from teecloud.attestation.models import VerifiedEvidence
from teecloud.attestation.policy import Policy
from teecloud.attestation.verifier import TrustAnchors, verify
from teecloud.image.snp import SNP_MEASUREMENT_FILE, SnpImageMeasurement, encode_snp
from teecloud.kms.errors import AccessDenied
from teecloud.kms.os_images import SHA256SUM_FILE, MeasuredOsImages
from tests.image.test_measure_snp_file import REAL, REAL_MEASUREMENT


def sums_of(measurement: bytes) -> bytes:
    return (
        f"{hashlib.sha256(b'the kernel').hexdigest()}  bzImage\n"
        f"{hashlib.sha256(measurement).hexdigest()}  {SNP_MEASUREMENT_FILE}\n"
    ).encode()


def publish(directory: Path, measurement: bytes) -> bytes:
    sums = sums_of(measurement)
    os_image_hash = hashlib.sha256(sums).digest()
    image_dir = directory / os_image_hash.hex()
    image_dir.mkdir(parents=True, exist_ok=True)
    (image_dir / SHA256SUM_FILE).write_bytes(sums)
    (image_dir / SNP_MEASUREMENT_FILE).write_bytes(measurement)
    return os_image_hash


def snp_evidence(measurement: bytes = REAL_MEASUREMENT, *, debug: bool = False) -> VerifiedEvidence:
    return VerifiedEvidence(
        tee="snp",
        tcb_status="OutOfDate",
        advisory_ids=(),
        measurements={"measurement": measurement, "host_data": b"\0" * 32, "report_data": b"\0" * 64},
        report_data=b"\0" * 64,
        debug=debug,
    )


def vm_config(os_image_hash: bytes, *, cpu_count: int = 2, **shape: object) -> str:
    doc = {"vcpus": 2, "vcpu_type": "EPYC-v4", "guest_features": 1, **shape}
    return json.dumps(
        {
            "os_image_hash": os_image_hash.hex(),
            "cpu_count": cpu_count,
            "memory_size": 4 << 30,
            "sev_snp_measurement": json.dumps(doc),
        }
    )


@pytest.fixture
def images(tmp_path: Path) -> MeasuredOsImages:
    return MeasuredOsImages(tmp_path)


DATA = Path(__file__).parent / "data"
SNP_PIN = calendar.timegm((2026, 7, 1, 0, 0, 0))


def verified(vectors: Path, report: Path, vcek: Path, policy: Policy | None = None) -> VerifiedEvidence:
    ark_ask = (vectors / "snp" / "go-sev-guest_ask_ark_milan.pem").read_bytes()
    res = verify(
        report.read_bytes(),
        cert_chain=[vcek.read_bytes()],
        anchors=TrustAnchors.from_certificates([ark_ask]),
        now=SNP_PIN,
        policy=policy or Policy(),
    )
    assert res.is_valid and res.evidence is not None, res.reason
    return res.evidence


def test_a_real_report_of_the_image_passes(vectors: Path, images: MeasuredOsImages) -> None:
    """dstack's real SNP report (tests/kms/data), verified here end to end (VCEK, Milan ASK/ARK)."""
    evidence = verified(vectors, DATA / "dstack_sev_snp_report.bin", DATA / "dstack_sev_snp_vcek.pem")
    assert evidence.measurements["measurement"] == REAL_MEASUREMENT and not evidence.debug
    image = publish(images.directory, encode_snp(REAL))
    assert images.snp_launch(evidence, vm_config(image)).os_image_hash == image
    with pytest.raises(AccessDenied, match="MEASUREMENT is not OS image"):
        images.snp_launch(evidence, vm_config(image, cpu_count=1, vcpus=1))


def test_a_real_launch_of_the_image_passes(images: MeasuredOsImages) -> None:
    image = publish(images.directory, encode_snp(REAL))
    launch = images.snp_launch(snp_evidence(), vm_config(image))
    assert launch.os_image_hash == image and launch.expected == REAL_MEASUREMENT
    assert (launch.shape.vcpus, launch.shape.vcpu_type, launch.shape.guest_features) == (2, "EPYC-v4", 1)


def test_the_files_may_come_in_vm_config_as_dstack_sends_them(images: MeasuredOsImages) -> None:
    data = encode_snp(REAL)
    image = hashlib.sha256(sums_of(data)).digest()
    b64 = {
        "checksum_file": base64.b64encode(sums_of(data)).decode(),
        "measurement": base64.b64encode(data).decode(),
    }
    assert (
        images.snp_launch(snp_evidence(), vm_config(image, **b64)).os_image_hash == image
    )  # empty directory
    other = hashlib.sha256(b"another image's sha256sum.txt").digest()
    with pytest.raises(AccessDenied, match=r"sha256sum\.txt is not OS image") as err:
        images.snp_launch(snp_evidence(), vm_config(other, **b64))
    assert err.value.step == "os_image"
    forged = {**b64, "measurement": base64.b64encode(encode_snp(_mutated("cmdline"))).decode()}
    with pytest.raises(AccessDenied, match="is not the one OS image"):
        images.snp_launch(snp_evidence(), vm_config(image, **forged))


@pytest.mark.parametrize(
    ("cpu_count", "shape"),
    [(1, {"vcpus": 1}), (4, {"vcpus": 4}), (2, {"vcpu_type": "EPYC-Milan"}), (2, {"guest_features": 3})],
)
def test_another_launch_shape_is_refused(images: MeasuredOsImages, cpu_count: int, shape: dict) -> None:
    image = publish(images.directory, encode_snp(REAL))
    with pytest.raises(AccessDenied, match="MEASUREMENT is not OS image") as err:
        images.snp_launch(snp_evidence(), vm_config(image, cpu_count=cpu_count, **shape))
    assert err.value.step == "os_image"


def test_a_shape_that_contradicts_vm_config_is_refused(images: MeasuredOsImages) -> None:
    image = publish(images.directory, encode_snp(REAL))
    with pytest.raises(AccessDenied, match="4 CPUs but sev_snp_measurement 2 vCPUs"):
        images.snp_launch(snp_evidence(), vm_config(image, cpu_count=4))


def _mutated(field: str) -> SnpImageMeasurement:
    value = getattr(REAL, field)
    if isinstance(value, str):
        other: object = value + " x"
    elif isinstance(value, bytes):
        other = bytes([value[-1] ^ 0x80]) + value[1:]
    elif isinstance(value, int):
        other = value ^ 0x10
    else:
        other = tuple(reversed(value))
    return SnpImageMeasurement(**{**REAL.__dict__, field: other})


@pytest.mark.parametrize("field", sorted(REAL.__dict__))
def test_another_image_is_refused(images: MeasuredOsImages, field: str) -> None:
    """Generated: each field of the measurement file altered gives another image (another hash, published
    and allowed as such), whose reference the real launch does not match."""
    publish(images.directory, encode_snp(REAL))
    image = publish(images.directory, encode_snp(_mutated(field)))
    with pytest.raises(AccessDenied, match="MEASUREMENT is not OS image") as err:
        images.snp_launch(snp_evidence(), vm_config(image))
    assert err.value.step == "os_image"


def test_an_unknown_or_unbound_image_is_refused(images: MeasuredOsImages) -> None:
    with pytest.raises(AccessDenied, match="no SEV-SNP reference measurements"):
        images.snp_launch(snp_evidence(), vm_config(b"\1" * 32))
    image = publish(images.directory, encode_snp(REAL))
    (images.directory / image.hex() / SNP_MEASUREMENT_FILE).write_bytes(encode_snp(_mutated("kernel_sha256")))
    with pytest.raises(AccessDenied, match="is not the one OS image"):
        images.snp_launch(snp_evidence(), vm_config(image))
    (images.directory / image.hex() / SNP_MEASUREMENT_FILE).write_bytes(b"\xff" * 10)
    (images.directory / image.hex() / SHA256SUM_FILE).write_bytes(sums_of(b"\xff" * 10))
    with pytest.raises(AccessDenied, match=r"sha256sum\.txt is not OS image"):
        images.snp_launch(snp_evidence(), vm_config(image))


BARE = {"os_image_hash": "00" * 32, "cpu_count": 2, "memory_size": 1}


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ("", "no vm_config"),
        ("{", "not JSON"),
        (
            json.dumps({"os_image_hash": "00" * 32, "cpu_count": 2, "memory_size": 1}),
            "no sev_snp_measurement",
        ),
        (
            json.dumps(
                {"os_image_hash": "00" * 32, "cpu_count": 2, "memory_size": 1, "sev_snp_measurement": 5}
            ),
            "must be an object",
        ),
    ],
)
def test_a_malformed_vm_config_is_refused(images: MeasuredOsImages, config: str, reason: str) -> None:
    with pytest.raises(AccessDenied, match=reason) as err:
        images.snp_launch(snp_evidence(), config)
    assert err.value.step == "os_image"


def test_a_debug_policy_is_refused(vectors: Path, images: MeasuredOsImages) -> None:
    """A real report (google/go-sev-guest's, guest policy 0xb0000: DEBUG set), verified here with a policy
    that lets debug evidence through, is refused by the OS-image step before anything else."""
    snp = vectors / "snp"
    evidence = verified(
        vectors,
        snp / "go-sev-guest_attestation.bin",
        snp / "go-sev-guest_vcek.testcer",
        Policy(reject_debug=False),
    )
    assert evidence.debug
    image = publish(images.directory, encode_snp(REAL))
    with pytest.raises(AccessDenied, match="allows debugging"):
        images.snp_launch(evidence, vm_config(image))
    with pytest.raises(AccessDenied, match="allows debugging"):
        images.snp_launch(snp_evidence(debug=True), vm_config(image))


def test_other_evidence_is_refused(images: MeasuredOsImages) -> None:
    image = publish(images.directory, encode_snp(REAL))
    tdx = VerifiedEvidence(
        tee="tdx", tcb_status="UpToDate", advisory_ids=(), measurements={}, report_data=b"", debug=False
    )
    with pytest.raises(AccessDenied, match="no SEV-SNP launch measurement"):
        images.snp_launch(tdx, vm_config(image))
    with pytest.raises(AccessDenied, match="48-byte MEASUREMENT"):
        images.snp_launch(snp_evidence(b"\0" * 32), vm_config(image))
