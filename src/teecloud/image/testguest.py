"""TEST GUEST — not the teecloud guest agent. A minimal guest for booting the qemu backend's VM path under
TCG here: Debian's kernel with an initramfs of busybox, the kernel's virtio modules and an /init that

    1. loads virtio (PCI, block, net) and vfat, finds the read-only host-shared disk (label DSTACKSHR) and
       reads app-compose.json from it (as dstack-util's setup reads the host share);
    2. configures eth0 (QEMU user network: 10.0.2.10/24, the address dstack-vmm's dhcpstart gives and the
       port forwards reach);
    3. serves the agent's host-facing `GET /info` on guest port AGENT_PORT ({"compose_hash", "guest",
       "phase": "running"}, the compose hash computed in the guest from the shared file) and, standing in
       for the app's containers, `index.html` on each port the compose publishes (where Docker would
       publish it in the guest);
    4. prints its progress on the serial console, the VM's boot log.

It measures nothing, fetches no keys, opens no LUKS volume and runs no container: those are the real guest
image's (teecloud.agent.vm_agent). Its `/info` says `"guest": "teecloud-testguest"`, so nothing can
mistake it for a CVM.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from teecloud.image.errors import ImageFormatError
from teecloud.image.initramfs import Entry, build_initramfs

__all__ = ["AGENT_PORT", "GUEST_NAME", "MODULES", "build_test_guest_initramfs", "module_load_order"]

AGENT_PORT = 8090
GUEST_NAME = "teecloud-testguest"
# what the guest needs from the kernel's modules (with their dependencies, resolved from each .modinfo)
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "vfat", "nls_cp437", "nls_ascii")

_INIT = """#!/bin/busybox sh
# {name}: NOT the teecloud guest agent (see teecloud.image.testguest)
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "{name}: loading modules"
for m in {modules}; do insmod /lib/modules/$m.ko || echo "{name}: insmod $m failed"; done
i=0; dev=""
while [ -z "$dev" ] && [ $i -lt 50 ]; do
  dev=$(findfs LABEL=DSTACKSHR 2>/dev/null); i=$((i+1)); sleep 0.1
done
[ -n "$dev" ] || {{ echo "{name}: no host-shared disk (label DSTACKSHR)"; sleep 1; poweroff -f; }}
mkdir -p /host-shared && mount -t vfat -o ro "$dev" /host-shared
h=$(sha256sum /host-shared/app-compose.json | cut -d' ' -f1)
echo "{name}: app-compose.json sha256 $h"
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.10/24 dev eth0; ip route add default via 10.0.2.2
mkdir -p /agent /app
echo "{{\\"guest\\": \\"{name}\\", \\"compose_hash\\": \\"$h\\", \\"phase\\": \\"running\\"}}" > /agent/info
echo "hello from {name}" > /app/index.html
httpd -p {port} -h /agent
# stands in for Docker publishing the app's ports in the guest: the compose's "H:C" and `published: H`
for p in $(grep -o '[0-9][0-9]*:[0-9][0-9]*' /host-shared/app-compose.json | cut -d: -f1) \
         $(grep -o 'published: [0-9][0-9]*' /host-shared/app-compose.json | cut -d' ' -f2); do
  httpd -p "$p" -h /app
done
echo "{name}: ready"
while true; do sleep 3600; done
"""


def _depends(ko: bytes) -> list[str]:
    m = re.search(rb"\x00depends=([^\x00]*)\x00", ko)
    return [d.decode() for d in m.group(1).split(b",") if d] if m else []


def module_load_order(modules_dir: Path, wanted: tuple[str, ...] = MODULES) -> list[Path]:
    """The .ko files of `wanted` and their dependencies (read from each module's `depends=` modinfo), each
    after the ones it needs."""
    index: dict[str, Path] = {}
    for p in modules_dir.rglob("*.ko"):
        index[p.stem.replace("-", "_")] = p
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, depth: int = 0) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if depth > 32 or name not in index:
            raise ImageFormatError(f"kernel module {name} not found under {modules_dir}")
        seen.add(name)
        for dep in _depends(index[name].read_bytes()):
            visit(dep, depth + 1)
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


def build_test_guest_initramfs(*, modules_dir: Path, busybox: Path = Path("/bin/busybox")) -> bytes:
    """The test guest's initramfs (reproducible: the same busybox and modules give the same bytes)."""
    if not busybox.is_file():
        raise ImageFormatError(f"{busybox} is missing (Debian package busybox-static)")
    kos = module_load_order(modules_dir)
    entries = {
        "bin/busybox": Entry.file(busybox.read_bytes(), 0o755),
        "init": Entry.file(
            _INIT.format(name=GUEST_NAME, port=AGENT_PORT, modules=" ".join(p.stem for p in kos)).encode(),
            0o755,
        ),
    }
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        entries[d] = Entry.directory()
    for p in kos:
        entries[f"lib/modules/{p.name}"] = Entry.file(p.read_bytes())
    return build_initramfs(entries, level=6)


def busybox_path() -> Path:
    found = shutil.which("busybox") or "/bin/busybox"
    return Path(os.path.realpath(found))
