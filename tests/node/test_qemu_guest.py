"""The guest agent's host-facing parts (fast) and the built guest image's verity check (slow, a real VM under
TCG: a rootfs with one changed byte does not boot). The whole boot of a CVM in the guest (KMS keys, LUKS2,
Compose, the app serving) is tests/node/test_qemu_boot.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import threading
from http.server import HTTPServer
from pathlib import Path

import httpx
import pytest

from teecloud.agent.boot import normalize_app_compose
from teecloud.agent.vm_agent import (
    GUEST_NAME,
    MAX_APP_COMPOSE,
    GuestStatus,
    attest_report_data,
    find_data_disk,
    guest_kms_url,
    make_handler,
    read_info,
)
from teecloud.image.build import build_image, guest_image_fields
from teecloud.node.api import CreateCvmRequest
from teecloud.node.runtime.qemu import QemuBackend, QemuBackendConfig
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


def test_the_vm_agent_answers_info_attest_over_a_nonce_and_nothing_else() -> None:
    status = GuestStatus({"guest": GUEST_NAME, "compose_hash": "00" * 32, "tee": "none"})
    server = HTTPServer(("127.0.0.1", 0), make_handler(status.snapshot, lambda: status.attest))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        doc = httpx.get(f"{base}/info", timeout=5).json()
        assert doc["compose_hash"] == "00" * 32 and doc["phase"] == "measuring" and doc["error"] is None
        status.set(phase="failed", error="keys: refused")
        doc = httpx.get(f"{base}/info", timeout=5).json()
        assert (doc["phase"], doc["error"]) == ("failed", "keys: refused")
        for path in ("/GetQuote", "/info/x", "/info?report_data=00", "/", "/attest/x"):
            assert httpx.get(base + path, timeout=5).status_code == 404, path
        assert httpx.post(f"{base}/info", content=b"x", timeout=5).status_code == 501
        assert httpx.post(f"{base}/attest?nonce=00", content=b"x", timeout=5).status_code == 501
        # /attest: before the boot is done there is nothing to quote
        assert httpx.get(f"{base}/attest?nonce=00", timeout=5).status_code == 409
        quoted: list[bytes] = []
        status.attest = lambda rd: quoted.append(rd) or {"report_data": rd.hex()}
        nonce = bytes(range(64))
        r = httpx.get(f"{base}/attest", params={"nonce": nonce.hex()}, timeout=5)
        # the guest binds the nonce under the node API's prefix itself: the host never picks report_data
        assert r.status_code == 200 and quoted == [attest_report_data(nonce)]
        assert r.json()["report_data"] == attest_report_data(nonce).hex()
        for query in (
            "report_data=" + "00" * 64,  # the host may not name report_data
            "nonce=00&report_data=00",
            "nonce=00&nonce=01",
            "nonce=" + "00" * 65,  # above the node API's bound
            "nonce=zz",
            "",
        ):
            assert httpx.get(f"{base}/attest?{query}", timeout=5).status_code == 400, query
        assert len(quoted) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_the_guests_attestation_domain_is_the_node_apis() -> None:
    from teecloud.agent import vm_agent
    from teecloud.node import api

    assert (vm_agent.ATTEST_DOMAIN, vm_agent.MAX_ATTEST_NONCE) == (api.ATTEST_DOMAIN, api.MAX_ATTEST_NONCE)
    for nonce in (b"", b"n", bytes(64)):
        assert vm_agent.attest_report_data(nonce) == api.attest_report_data(nonce)


def test_the_guest_reaches_the_hosts_loopback_kms_through_qemus_host_address() -> None:
    assert guest_kms_url("https://127.0.0.1:8443") == "https://10.0.2.2:8443"
    assert guest_kms_url("https://localhost:8443/x") == "https://10.0.2.2:8443/x"
    assert guest_kms_url("https://kms.example:443") == "https://kms.example:443"
    for bad in ("ftp://127.0.0.1:1", "https://", "127.0.0.1:8443"):
        with pytest.raises(ValueError):
            guest_kms_url(bad)


def test_the_data_disk_is_the_one_disk_that_is_neither_rootfs_nor_mounted(tmp_path: Path) -> None:
    rootfs, data, other = tmp_path / "vda", tmp_path / "vdb", tmp_path / "vdc"
    rootfs.write_bytes(b"hsqs" + bytes(100))
    data.write_bytes(bytes(4096))
    assert find_data_disk([rootfs, data], set()) == data
    other.write_bytes(bytes(4096))
    with pytest.raises(RuntimeError, match="expected one data disk"):
        find_data_disk([rootfs, data, other], set())  # never guesses between two candidates
    # the host share: a mounted disk, or (vvfat) a disk whose partition is mounted
    assert find_data_disk([rootfs, data, other], {str(other) + "1"}) == data
    assert find_data_disk([rootfs, data, other], {str(other)}) == data
    with pytest.raises(RuntimeError):
        find_data_disk([rootfs, data, other], {str(other) + "x1"})


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    built = build_image()  # a cache hit after the first build on this machine
    return GuestImage(**guest_image_fields(built.path))  # type: ignore[arg-type]


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
            image=image,
            mode="plain",
            accel="tcg",
            host_share="vvfat",
            disk_gb=1,
            agent_timeout_s=600,
            docker=None,  # no app images: the VM stops long before
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
