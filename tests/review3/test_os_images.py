"""Third review, area 1: the KMS's OS-image step for real images (kms.os_images, image.measurement,
image.tdx, kms.authz). Each test is an attacker's exact steps against the real code and asserts the SAFE
behaviour: a test that fails is an open finding (docs/threat-model.md, "Third review"). Open findings are
marked xfail(strict=True): the suite stays green while they are open, and the fix turns them into an
XPASS failure, the signal to drop the marker."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import cbor2
import pytest

from teecloud.image.errors import ImageFormatError
from teecloud.image.measurement import MEASUREMENT_FILE, TdxImageMeasurement, bind, encode, parse
from teecloud.image.tdx import sha384
from teecloud.kms.errors import AccessDenied
from teecloud.kms.os_images import SHA256SUM_FILE, MeasuredOsImages
from tests.kms.conftest import Kms, World, client_cert
from tests.kms.test_os_image_measured import DSTACK_WITNESS, _measurement, allow, publish, real_app


def _m(tag: bytes = b"a") -> TdxImageMeasurement:
    return TdxImageMeasurement(
        cmdline_sha384=sha384(b"cmdline " + tag),
        kernel_authenticode=sha384(b"kernel " + tag),
        initrd_sha384=sha384(b"initrd " + tag),
        mrtd_single_pass=sha384(b"mrtd1 " + tag),
        mrtd_two_pass=sha384(b"mrtd2 " + tag),
        td_hob_witness=DSTACK_WITNESS,
    )


def _doc(m: TdxImageMeasurement) -> dict[str, Any]:
    return cbor2.loads(encode(m))


# --- the measurement file's CBOR: one value, one encoding -------------------------------------------------


def _noncanonical_variants(m: TdxImageMeasurement) -> dict[str, bytes]:
    good = encode(m)
    doc = _doc(m)
    assert good[0] == 0xA7  # a map of 7 pairs
    return {
        # a duplicate key (last wins in cbor2): the kernel hash stated twice, the second another kernel's
        "duplicate-key": b"\xa8"
        + good[1:]
        + cbor2.dumps("kernel_authenticode")
        + cbor2.dumps(sha384(b"kernel b")),
        # the version as a tagged bignum (tag 2) and as a float
        "bignum-version": cbor2.dumps({**doc, "version": cbor2.CBORTag(2, b"\x01")}),
        "float-version": cbor2.dumps({**doc, "version": 1.0}),
        "bool-version": cbor2.dumps({**doc, "version": True}, canonical=True),
        # a self-described CBOR tag (55799) around the document
        "tagged-document": cbor2.dumps(cbor2.CBORTag(55799, doc), canonical=True),
        # keys unsorted, and a non-shortest length for one byte string
        "unsorted-keys": cbor2.dumps(dict(reversed(list(doc.items())))),
        "long-length": good.replace(
            b"\x58\x30" + m.kernel_authenticode, b"\x59\x00\x30" + m.kernel_authenticode
        ),
        # indefinite-length byte string (chunks) for the kernel hash
        "indefinite-bytes": good.replace(
            b"\x58\x30" + m.kernel_authenticode,
            b"\x5f\x58\x18" + m.kernel_authenticode[:24] + b"\x58\x18" + m.kernel_authenticode[24:] + b"\xff",
        ),
        "trailing-byte": good + b"\x00",
        "text-for-bytes": cbor2.dumps({**doc, "cmdline_sha384": m.cmdline_sha384.hex()}, canonical=True),
        "extra-key": cbor2.dumps({**doc, "acpi": b""}, canonical=True),
    }


@pytest.mark.parametrize("variant", sorted(_noncanonical_variants(_m())))
def test_a_measurement_file_in_another_encoding_is_refused(variant: str) -> None:
    data = _noncanonical_variants(_m())[variant]
    assert data != encode(_m())
    with pytest.raises(ImageFormatError):
        parse(data)


def test_generated_mutations_of_a_measurement_files_structure_never_parse() -> None:
    """Every single-byte change of a good file outside the digests' and witness's own bytes (map headers,
    keys, lengths, the version, the variant) is refused: the structure has exactly one encoding. (A change
    inside a digest is another value, which the sha256 binding refuses: the test above.)"""
    m = _m()
    good = encode(m)
    payload: set[int] = set()
    for value in (*(getattr(m, f) for f in m.__dataclass_fields__),):
        if not isinstance(value, bytes):  # ints and strings (version, variant, secure_boot) are structure
            continue
        at = good.index(value)
        payload.update(range(at, at + len(value)))
    for at in sorted(set(range(len(good))) - payload):
        for xor in (0x01, 0x02, 0x20, 0x40, 0x80, 0xFF):
            data = bytearray(good)
            data[at] ^= xor
            with pytest.raises(ImageFormatError):
                parse(bytes(data))


# --- os_image_hash <-> measurement file: the binding ------------------------------------------------------


def _sums(measurement: bytes, *, name: str = MEASUREMENT_FILE, extra: str = "", sep: str = "\n") -> bytes:
    return (
        f"{hashlib.sha256(b'the kernel').hexdigest()}  bzImage{sep}"
        f"{hashlib.sha256(measurement).hexdigest()}  {name}\n{extra}"
    ).encode()


def test_another_images_measurement_file_is_refused(tmp_path: Path) -> None:
    """Image A is allowed on chain; the attacker copies image B's measurement file (its own kernel) into
    A's directory, and also tries B's sha256sum.txt."""
    a, b = encode(_m(b"a")), encode(_m(b"b"))
    ha = publish(tmp_path, a)
    hb = publish(tmp_path, b)
    ref = MeasuredOsImages(tmp_path)
    (tmp_path / ha.hex() / MEASUREMENT_FILE).write_bytes(b)
    with pytest.raises(AccessDenied, match="not the one OS image"):
        ref(ha)
    (tmp_path / ha.hex() / MEASUREMENT_FILE).write_bytes(a)
    (tmp_path / ha.hex() / SHA256SUM_FILE).write_bytes((tmp_path / hb.hex() / SHA256SUM_FILE).read_bytes())
    with pytest.raises(AccessDenied, match="its sha256 differs"):
        ref(ha)


def test_a_symlinked_image_directory_gives_nothing_of_the_other_image(tmp_path: Path) -> None:
    """The directory of allowed image A is a symlink to image B's files (a download cache gone wrong, or an
    attacker with write access to DIR): the hash chain still names A, so B's registers never count for A."""
    hb = publish(tmp_path / "real", encode(_m(b"b")))
    ha = hashlib.sha256(_sums(encode(_m(b"a")))).digest()
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "real" / hb.hex(), tmp_path / "dir" / ha.hex())
    os.symlink(tmp_path / "real" / hb.hex(), tmp_path / "dir" / hb.hex().upper())
    ref = MeasuredOsImages(tmp_path / "dir")
    with pytest.raises(AccessDenied, match="its sha256 differs"):
        ref(ha)
    assert ref(hb) is None  # only the lowercase hex name is looked up; an upper-case alias is not an image


@pytest.mark.parametrize(
    "case",
    ["duplicate-entry", "upper-case-name", "dot-slash-name", "binary-mode-star", "trailing-space"],
)
def test_sha256sum_entries_that_could_name_the_file_twice_or_otherwise_are_refused(case: str) -> None:
    real, forged = encode(_m(b"a")), encode(_m(b"evil"))
    sums = {
        "duplicate-entry": _sums(real, extra=f"{hashlib.sha256(forged).hexdigest()}  {MEASUREMENT_FILE}\n"),
        "upper-case-name": _sums(forged, name=MEASUREMENT_FILE.upper()),
        "dot-slash-name": _sums(forged, name="./" + MEASUREMENT_FILE),
        "binary-mode-star": _sums(forged, name="*" + MEASUREMENT_FILE).replace(b"  *", b" *"),
        "trailing-space": _sums(forged, name=MEASUREMENT_FILE + " "),
    }[case]
    with pytest.raises(ImageFormatError):
        bind(hashlib.sha256(sums).digest(), sums, forged)


@pytest.mark.parametrize("sep", ["\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r"])
def test_sha256sum_lines_are_split_as_sha256sum_splits_them(sep: str) -> None:
    """FINDING R3-1. coreutils `sha256sum -c` splits sha256sum.txt at '\\n' only. bind() splits with
    str.splitlines(), which also breaks at \\r, \\v, \\f and \\x1c-\\x1e. A publisher can therefore hide a
    measurement.tdx.cbor entry inside what `sha256sum -c` (the approver's check of the image before it is
    allowed on chain) reads as one odd file name of another line (it reports that name unreadable and never
    checks a measurement file), while the KMS reads it as an entry. Safe: such a file is refused."""
    forged = encode(_m(b"evil"))
    sums = _sums(forged, sep=sep)
    assert sums.count(b"\n") == 1  # one line for sha256sum(1)
    with pytest.raises(ImageFormatError):
        bind(hashlib.sha256(sums).digest(), sums, forged)


# --- the stated vm_config ----------------------------------------------------------------------------------


def _vm(app: Any, **changes: Any) -> str:
    return json.dumps({**app.tee.vm_config(), **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {"memory_size": (2 << 30) + 4096},  # not the booted RAM (another TD HOB)
        {"memory_size": 2 << 30, "qemu_version": "8.2.2"},  # the other MRTD page order
        {"qemu_version": 9},  # not a string
        {"qemu_version": "10.0.0-rc1"},  # not a plain version
        {"memory_size": 1 << 47},  # above 64 TiB
        {"os_image_hash": "00" * 32},  # another image than the measured event
    ],
    ids=["other-memory", "qemu8", "int-version", "rc-version", "huge-memory", "other-image"],
)
def test_a_vm_config_stated_to_match_a_malicious_boot_gains_nothing(
    teecloud_home: Path,
    world: World,
    kms: Kms,
    real_boot: dict[str, Any],
    tmp_path: Path,
    changes: dict[str, Any],
) -> None:
    """The CVM booted the real image but with a host-altered kernel (RTMR1); whatever vm_config it states,
    the reference is computed from the image's file, so no statement makes the altered boot match."""
    directory = tmp_path / "os-images"
    h = publish(directory, encode(_measurement(real_boot)))
    allow(world, h)
    kms.service.os_image_reference = MeasuredOsImages(directory)
    events = list(real_boot["events"])
    at = next(k for k, (i, _, _) in enumerate(events) if i == 1)
    events[at] = (1, events[at][1], sha384(b"the host's kernel"))
    app = real_app(teecloud_home, world, real_boot, {"hash": h}, events=events)
    _, der = client_cert(kms, app)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=_vm(app, **changes))
    assert err.value.step == "os_image"


def test_a_qemu8_boot_of_the_measured_image_gets_its_keys(
    teecloud_home: Path, world: World, kms: Kms, real_boot: dict[str, Any], tmp_path: Path
) -> None:
    """FINDING R3-2 (availability, fails closed). The measurement file carries both MRTD candidates and the
    reference picks QEMU 8's two-pass MRTD when vm_config says qemu_version 8.x — but Authorizer.attest
    first compares every caller's MRTD with the *single-pass* candidate (the reference without a shape),
    so a genuine TD launched by QEMU 8 of an allowed image is refused at step os_image before its vm_config
    is read. Safe (and intended, os_images docstring): such a TD gets its keys."""
    directory = tmp_path / "os-images"
    m = _measurement(real_boot)
    two_pass = sha384(b"QEMU 8's page order of this firmware")
    m = TdxImageMeasurement(**{**m.__dict__, "mrtd_two_pass": two_pass})
    h = publish(directory, encode(m))
    allow(world, h)
    kms.service.os_image_reference = MeasuredOsImages(directory)
    app = real_app(teecloud_home, world, {**real_boot, "mrtd": two_pass}, {"hash": h})
    _, der = client_cert(kms, app)
    keys = kms.service.get_app_key(der, vm_config=_vm(app, qemu_version="8.2.2"))
    assert keys.os_image_hash == h.hex()


# --- the directory's files themselves (anyone may fill DIR: os_images docstring) --------------------------


def test_unbounded_or_special_files_in_the_directory_are_refused(tmp_path: Path) -> None:
    """sha256sum.txt as a symlink to /dev/zero and the measurement file as a 1 GiB sparse file: read up to
    their bound, refused, nothing else read."""
    h = publish(tmp_path, encode(_m()))
    image_dir = tmp_path / h.hex()
    (image_dir / MEASUREMENT_FILE).unlink()
    with (image_dir / MEASUREMENT_FILE).open("wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(AccessDenied, match="larger than"):
        MeasuredOsImages(tmp_path)(h)
    (image_dir / SHA256SUM_FILE).unlink()
    os.symlink("/dev/zero", image_dir / SHA256SUM_FILE)
    with pytest.raises(AccessDenied, match=r"symbolic link|not a regular file"):  # not followed, not read
        MeasuredOsImages(tmp_path)(h)


def test_a_fifo_in_the_directory_does_not_hang_the_kms(tmp_path: Path) -> None:
    """FINDING R3-6 (availability). The directory "holds untrusted copies ... anyone may fill it" (a
    download cache). Whoever writes it replaces an allowed image's sha256sum.txt with a named pipe: `_read`
    opens it with a blocking open(), so every GetAppKey/SignCert/onboarding request naming that image
    blocks its worker thread for good (no writer ever comes), until the KMS's workers are exhausted. Safe:
    only regular files are opened (O_NONBLOCK + fstat S_ISREG, or a stat check first), others refused."""
    import threading

    h = publish(tmp_path, encode(_m()))
    sums = tmp_path / h.hex() / SHA256SUM_FILE
    sums.unlink()
    os.mkfifo(sums)
    outcome: list[object] = []

    def ask() -> None:
        try:
            outcome.append(MeasuredOsImages(tmp_path)(h))
        except AccessDenied as exc:
            outcome.append(exc)

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(3)
    hung = worker.is_alive()
    if hung:  # release the blocked open() so the test leaves no thread behind
        fd = os.open(sums, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(3)
    assert not hung, "the KMS's reference lookup blocked on a FIFO"
    assert len(outcome) == 1 and isinstance(outcome[0], AccessDenied)
