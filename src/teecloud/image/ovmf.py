"""What a firmware (OVMF / TDVF) logs for the `SecureBoot` variable in RTMR0, read from the firmware file.

TDVF measures the Secure Boot variables into RTMR0 as UEFI_VARIABLE_DATA (TCG PC Client PFP,
EV_EFI_VARIABLE_DRIVER_CONFIG), the variable's current data included. Two firmware builds differ there:

    "absent"   the firmware has no authenticated-variable support (edk2 built without SECURE_BOOT_ENABLE,
               AuthVariableLibNull): no `SecureBoot` variable exists and its event has no data. dstack's
               TDVF logs it so (a real TD's RTMR0; teecloud.image.tdx's model).
    "00"       edk2's SecurityPkg AuthVariableLib is linked in (SECURE_BOOT_ENABLE): at start it creates
               `SecureBoot` = one byte 0 when no platform key is enrolled. Debian 12's OVMF builds are all
               such (its OVMF.fd logs `SecureBoot` = 00 in a VM with a software TPM,
               tests/image/test_measure_acpi.py).

    secure_boot_variable(firmware) -> "absent" | "00"

How: AuthVariableLib keeps its certificate databases in the variables L"certdb" and L"certdbv"
(SecurityPkg/Library/AuthVariableLib/AuthServiceInternal.h); the UTF-16 name "certdbv" is in the firmware
exactly when that library is. OVMF keeps its DXE drivers in an LZMA-compressed firmware volume (a
GUID-defined section, EFI_SECTION_GUID_DEFINED with edk2's LZMA custom-decompress GUID; PI spec vol. 3,
section 2.1.5), so the volume is decompressed first (LZMA "alone" format, as edk2's LzmaCompress writes it).

A firmware whose variable store already holds a platform key (`PK`) would log SecureBoot = 01 and
non-empty PK/KEK/db/dbx events, which the model does not compute: refused (ImageFormatError).

A wrong answer here can only make the expected RTMR0 differ from what a TD quotes, i.e. the KMS refuses the
TD; it can never make another firmware's TD match (MRTD covers the firmware).
"""

from __future__ import annotations

import lzma
import struct
import uuid
from typing import Literal

from teecloud.image.errors import ImageFormatError

__all__ = ["SECURE_BOOT_VARIABLES", "SecureBootVariable", "secure_boot_variable"]

SecureBootVariable = Literal["absent", "00"]
SECURE_BOOT_VARIABLES: tuple[SecureBootVariable, ...] = ("absent", "00")

MAX_FIRMWARE = 64 * 1024 * 1024
MAX_DECOMPRESSED = 64 * 1024 * 1024  # OVMF's DXE volume is ~13 MB
MAX_SECTIONS = 8
_LZMA_GUID = uuid.UUID("ee4e5898-3914-4259-9d6e-dc7bd79403cf").bytes_le
_EFI_SECTION_GUID_DEFINED = 0x02
_AUTH_VARIABLE_MARKER = "certdbv\0".encode("utf-16-le")
# the variable store volume (gEfiSystemNvDataFvGuid) of a combined OVMF.fd and an enrolled PK's name in it
_NV_DATA_FV_GUID = uuid.UUID("fff12b8d-7696-4c8b-a985-2747075b4f50").bytes_le
_FVH = b"_FVH"
_PK_NAME = "PK\0".encode("utf-16-le")


def _decompressed_volumes(firmware: bytes) -> list[bytes]:
    """The contents of the firmware's LZMA GUID-defined sections (bounded in number and size)."""
    out: list[bytes] = []
    at = firmware.find(_LZMA_GUID)
    while at != -1 and len(out) < MAX_SECTIONS:
        start = at - 4  # EFI_COMMON_SECTION_HEADER: UINT8 Size[3]; UINT8 Type
        if start >= 0:
            size = int.from_bytes(firmware[start : start + 3], "little")
            kind = firmware[start + 3]
            if kind == _EFI_SECTION_GUID_DEFINED and at + 20 <= start + size <= len(firmware):
                (data_offset,) = struct.unpack_from("<H", firmware, at + 16)
                if 24 <= data_offset < size:
                    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
                    try:
                        data = decoder.decompress(
                            firmware[start + data_offset : start + size], max_length=MAX_DECOMPRESSED
                        )
                    except lzma.LZMAError:
                        data = b""  # the GUID's bytes in code or data, not a section: skipped
                    if data:
                        out.append(data)
        at = firmware.find(_LZMA_GUID, at + 1)
    return out


def _enrolled_platform_key(firmware: bytes) -> bool:
    """The firmware's own variable store (a combined OVMF.fd) holds a variable named PK."""
    at = firmware.find(_NV_DATA_FV_GUID)
    while at != -1:
        header = at - 16  # EFI_FIRMWARE_VOLUME_HEADER: ZeroVector[16], FileSystemGuid, FvLength, "_FVH"
        if header >= 0 and firmware[header + 40 : header + 44] == _FVH:
            (length,) = struct.unpack_from("<Q", firmware, header + 32)
            if _PK_NAME in firmware[header : header + min(length, len(firmware) - header)]:
                return True
        at = firmware.find(_NV_DATA_FV_GUID, at + 1)
    return False


def secure_boot_variable(firmware: bytes) -> SecureBootVariable:
    """What `firmware` logs for SecureBoot in RTMR0 (module docstring). Raises ImageFormatError for an
    oversized firmware or one with Secure Boot keys enrolled (not modelled)."""
    if not isinstance(firmware, bytes) or len(firmware) > MAX_FIRMWARE:
        raise ImageFormatError(f"a firmware is at most {MAX_FIRMWARE} bytes")
    if _enrolled_platform_key(firmware):
        raise ImageFormatError(
            "the firmware's variable store holds an enrolled platform key (PK): its Secure Boot events "
            "(SecureBoot = 01, PK, KEK, db, dbx with data) are not what teecloud's RTMR0 model computes"
        )
    volumes = [firmware, *_decompressed_volumes(firmware)]
    return "00" if any(_AUTH_VARIABLE_MARKER in v for v in volumes) else "absent"
