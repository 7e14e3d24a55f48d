from __future__ import annotations

import os

from teecloud.chain import BootInfo

OS_IMAGE = b"\x05" * 32
DEVICE = b"\x0d" * 32


def rand32() -> bytes:
    return os.urandom(32)


def boot_info(app_id: str, compose_hash: bytes, **kw: object) -> BootInfo:
    fields: dict[str, object] = {
        "app_id": bytes.fromhex(app_id[2:]),
        "compose_hash": compose_hash,
        "instance_id": b"\x00" * 20,
        "device_id": DEVICE,
        "mr_aggregated": b"\x0a" * 32,
        "mr_system": b"\x0b" * 32,
        "os_image_hash": OS_IMAGE,
        "tcb_status": "UpToDate",
        "advisory_ids": ("INTEL-SA-00837",),
    }
    fields.update(kw)
    return BootInfo(**fields)  # type: ignore[arg-type]
