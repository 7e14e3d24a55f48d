"""The built guest image (`teecloud image build`) booted by the qemu backend in mode `plain` under TCG.

Slow (a real VM: OVMF, Debian's kernel, the initramfs opening the dm-verity rootfs, the teecloud init, the
guest agent in Debian's python3): a Node whose backend is qemu boots the image; the agent reads the
host-shared app-compose.json from the read-only config disk and answers `GET /info` with the compose hash it
computed; the serial console shows the verity rootfs being opened; any other request to the agent is a 404;
remove leaves no QEMU. The first run on a machine builds the image (cached afterwards).

Not covered (not built yet, docs/node.md): the boot sequence in the guest (RTMR3, KMS keys, env, LUKS2,
Compose), so no app container and no ciphertext check here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import threading
import time
from http.server import HTTPServer
from pathlib import Path

import httpx
import pytest

from teecloud.agent.boot import normalize_app_compose
from teecloud.agent.vm_agent import GUEST_NAME, MAX_APP_COMPOSE, make_handler, read_info
from teecloud.image.build import build_image, guest_image_fields
from teecloud.node.api import CreateCvmRequest
from teecloud.node.runtime.qemu import QemuBackend, QemuBackendConfig, QemuCvm
from teecloud.node.runtime.qemu_cmdline import GuestImage
from teecloud.node.service import Node
from teecloud.tee.simulated import SimulatedTdx
from tests.node.fakes import NoKeys


def test_the_vm_agent_hashes_the_shared_compose_and_bounds_it(tmp_path: Path) -> None:
    raw = b'{"name": "web"}'
    (tmp_path / "app-compose.json").write_bytes(raw)
    info = read_info(tmp_path)
    assert info["compose_hash"] == hashlib.sha256(raw).hexdigest() and info["guest"] == GUEST_NAME
    (tmp_path / "app-compose.json").write_bytes(b" " * (MAX_APP_COMPOSE + 1))
    with pytest.raises(ValueError, match="larger than"):
        read_info(tmp_path)
    (tmp_path / "app-compose.json").unlink()
    with pytest.raises(OSError):
        read_info(tmp_path)


def test_the_vm_agent_answers_info_and_nothing_else() -> None:
    info = {"guest": GUEST_NAME, "compose_hash": "00" * 32, "tee": "none"}
    server = HTTPServer(("127.0.0.1", 0), make_handler(info))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert httpx.get(f"{base}/info", timeout=5).json() == info
        for path in ("/attest?nonce=00", "/GetQuote", "/info/x", "/info?report_data=00", "/"):
            assert httpx.get(base + path, timeout=5).status_code == 404, path
        assert httpx.post(f"{base}/info", content=b"x", timeout=5).status_code == 501
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    built = build_image()  # a cache hit after the first build on this machine
    return GuestImage(**guest_image_fields(built.path))  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_built_image_boots_and_its_agent_answers(teecloud_home: Path, guest_image: GuestImage) -> None:
    backend = QemuBackend(
        QemuBackendConfig(
            image=guest_image, mode="plain", accel="tcg", host_share="vvfat", disk_gb=1, agent_timeout_s=900
        ),
        home=teecloud_home,
    )
    backend.check()
    node = Node(
        key_provider=NoKeys(),
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        backend=backend,
        home=teecloud_home,
        memory_mb=4096,
    )
    compose = normalize_app_compose(
        {
            "name": "web",
            "runner": "docker-compose",
            "docker_compose_file": "services:\n  web:\n    image: x\n",
        }
    )
    try:
        t0 = time.monotonic()
        st = node.create(CreateCvmRequest(name="web", app_compose=compose, app_id="11" * 20, memory_mb=1024))
        iid = st.instance_id
        node.wait_all(1000)
        status = node.status(iid)
        assert status.status == "running", status.error
        print(f"TCG boot to agent-ready: {time.monotonic() - t0:.1f} s ({status.timings})")
        inst = node.store.get(iid)
        cvm = node._cvm(iid).booted
        assert isinstance(cvm, QemuCvm)
        # (1) the agent of the image (not the test guest) read the share and hashed the compose itself
        assert cvm.guest_info["guest"] == GUEST_NAME
        assert cvm.guest_info["compose_hash"] == inst.compose_hash().hex()
        # (2) the host may ask /info and nothing else
        for path in ("/attest?nonce=00", "/GetQuote?report_data=00", "/info/x"):
            r = httpx.get(f"http://127.0.0.1:{cvm.agent_port}{path}", timeout=20)
            assert r.status_code == 404, path
        # (3) the serial console: the initramfs opened the verity rootfs named on the command line
        text = b"".join(node.logs(iid, service=None, tail=2000, follow=False, public=False)).decode()
        verity_root = guest_image.cmdline.split("teecloud.verity=")[1].split(":")[0]
        assert f"initramfs: verity rootfs {verity_root}" in text
        assert "teecloud-guest: ready" in text
        pid = cvm.pid()
        assert pid is not None
        result = node.remove(iid)
        assert result.leftovers == [] and not Path(f"/proc/{pid}/cmdline").exists()
    finally:
        node.close()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_tampered_rootfs_does_not_boot(
    teecloud_home: Path, guest_image: GuestImage, tmp_path: Path
) -> None:
    """The rootfs is covered by the measured command line (its verity root hash): one changed byte and the
    guest's dm-verity refuses it, the VM powers off and the CVM fails at `agent` with the console's reason."""
    assert guest_image.rootfs is not None
    tampered = tmp_path / "rootfs.img.verity"
    shutil.copyfile(guest_image.rootfs, tampered)
    with tampered.open("r+b") as f:
        f.seek(200)  # inside the squashfs's first block, past the superblock magic the initramfs looks for
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0x01]))
    image = dataclasses.replace(guest_image, rootfs=tampered)
    backend = QemuBackend(
        QemuBackendConfig(
            image=image, mode="plain", accel="tcg", host_share="vvfat", disk_gb=1, agent_timeout_s=600
        ),
        home=teecloud_home,
    )
    node = Node(
        key_provider=NoKeys(),
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        backend=backend,
        home=teecloud_home,
        memory_mb=4096,
    )
    compose = normalize_app_compose(
        {
            "name": "web",
            "runner": "docker-compose",
            "docker_compose_file": "services:\n  web:\n    image: x\n",
        }
    )
    try:
        st = node.create(CreateCvmRequest(name="bad", app_compose=compose, app_id="11" * 20, memory_mb=1024))
        node.wait_all(700)
        status = node.status(st.instance_id)
        assert status.status == "failed" and status.phase == "agent", status
        assert "QEMU exited" in (status.error or "")
        assert "initramfs: cannot mount the rootfs" in (status.error or "")
        assert "teecloud-guest: ready" not in (status.error or "")
    finally:
        node.close()
