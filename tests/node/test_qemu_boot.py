"""A whole CVM on the qemu backend: `teecloud up --backend qemu`'s LocalCloud (chain, KMS, node) deploys an
app whose image was `docker save`d on the host; the VM (mode plain, TCG) boots the built image, and its guest
agent runs the guest half of boot (simulated TEE measuring into RTMR3, keys from the KMS over RA-TLS, env
decrypted, the data disk opened as LUKS2) then dockerd, `docker load` and Compose.

One VM for every assertion (TCG is slow): the app serves through the host's loopback forward what it wrote to
its volume (the decrypted secret and a random token), the data disk file on the host is LUKS2 and holds
neither, and after stop/start (a fresh VM, the same disk key from the KMS) the app reads the same data back.
Slow (minutes), under the e2e lock; needs the host's Docker only to build and save the tiny image.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.docker]

IMAGE = "teecloud-qboot-test:1"
SECRET = "qboot-secret-" + hashlib.sha256(b"teecloud qemu boot").hexdigest()[:20]
# the app: its note (the decrypted secret + a random token) written once to its volume, one line per boot
APP_SCRIPT = (
    "/bin/busybox --install -s /bin && mkdir -p /data/www && cd /data/www && "
    '{ [ -f note ] || { echo "$$SECRET" > note && cat /proc/sys/kernel/random/uuid >> note; }; } && '
    "echo boot >> boots && exec httpd -f -p 8080 -h /data/www"
)


def _docker_ok() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    )


def _tiny_image() -> str:
    """A one-file image (the host's static busybox) made with `docker import`: no registry, no build."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox").resolve()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("bin/busybox")
        data = busybox.read_bytes()
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    r = subprocess.run(
        ["docker", "import", "--change", 'CMD ["/bin/busybox", "sh"]', "-", IMAGE],
        input=buf.getvalue(),
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return IMAGE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def qcloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not _docker_ok():
        pytest.skip("no Docker engine reachable (the test's image is built and saved with it)")
    from teecloud.devstack import LocalCloud
    from teecloud.image.build import build_image

    _tiny_image()
    # TEECLOUD_GUEST_IMAGE: a built image directory to boot instead (else this tree's, built or cached)
    given = os.environ.get("TEECLOUD_GUEST_IMAGE")
    path = Path(given) if given else build_image().path
    home = tmp_path_factory.mktemp("qboot-home")
    cloud = LocalCloud(home, backend="qemu", qemu_image=path)
    cloud.start(check=False)
    try:
        yield cloud
    finally:
        try:
            for inst in cloud.node.store.all():
                cloud.node.remove(inst.instance_id)
        finally:
            cloud.stop()


def _get(url: str, timeout: float = 120.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url, timeout=10)
            if r.status_code == 200:
                return r
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return r
        time.sleep(1)


@pytest.mark.timeout(2400)
def test_a_qemu_cvm_boots_serves_and_keeps_its_data_encrypted(qcloud: Any, tmp_path: Path) -> None:
    from teecloud.cloud.deploy import Session, deploy
    from teecloud.node.runtime.qemu import QemuCvm

    port = _free_port()
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        "services:\n"
        "  web:\n"
        f"    image: {IMAGE}\n"
        f'    command: ["/bin/busybox", "sh", "-c", \'{APP_SCRIPT}\']\n'
        "    environment:\n"
        "      - SECRET\n"
        "    ports:\n"
        f'      - "{port}:8080"\n'
        "    volumes:\n"
        "      - appdata:/data\n"
        "volumes:\n"
        "  appdata: {}\n"
    )
    session = Session(qcloud.home)
    node = qcloud.node
    try:
        phases: list[str] = []
        t0 = time.monotonic()
        r = deploy(
            session,
            compose,
            name="qweb",
            env={"SECRET": SECRET, "DROPPED": "x"},
            allowed_envs=["SECRET"],
            progress=lambda phase, _d: phases.append(phase),
            timeout=1500,
        )
        assert r.status == "running", r.error
        iid = r.instance_id
        cvm = node._cvm(iid).booted
        assert isinstance(cvm, QemuCvm)
        boot_s = time.monotonic() - t0
        print(
            f"TCG deploy to app running: {boot_s:.1f} s; guest {cvm.guest_info.get('timings')}; "
            f"host {cvm.timings}"
        )
        # (1) the guest ran the boot phases itself, through the KMS (keys) and the LUKS disk (storage)
        assert cvm.guest_info["phase"] == "running"
        for phase in ("keys", "env", "storage", "agent", "starting", "healthy"):
            assert phase in cvm.guest_info["timings"], cvm.guest_info
        assert cvm.guest_info["dropped_env"] == ["DROPPED"]
        assert "simulated" in cvm.guest_info["tee"].lower()
        # deploy verified the attestation (quote over its nonce, compose hash); the guest computed report_data
        nonce = b"qboot-nonce"
        att = node.attestation(iid, nonce, public=False)
        assert att.report_data == hashlib.sha512(b"teecloud-attest:" + nonce).hexdigest()
        assert att.compose_hash == r.compose_hash
        # (2) the app serves, through the host's loopback forward, what it wrote to its encrypted volume
        note = _get(f"http://127.0.0.1:{port}/note").text
        assert note.splitlines()[0] == SECRET and len(note.splitlines()) == 2
        assert _get(f"http://127.0.0.1:{port}/boots").text.split() == ["boot"]
        # (3) the data disk on the host is LUKS2 ciphertext: neither the secret nor the token is in it
        hda = cvm.workdir / "hda.img"
        disk = hda.read_bytes()
        assert b"LUKS\xba\xbe" in disk  # the LUKS2 header the guest wrote
        assert SECRET.encode() not in disk
        assert note.splitlines()[1].encode() not in disk
        # the serial console (the CVM's log) shows the guest's phases
        log = b"".join(node.logs(iid, service=None, tail=5000, follow=False, public=False)).decode()
        assert "vm-agent: phase keys" in log and "vm-agent: app running" in log
        pid = cvm.pid()
        # (4) stop + start: a fresh VM; the KMS gives the same disk key, so the app reads its data back
        node.stop(iid)
        assert pid is not None and not Path(f"/proc/{pid}/cmdline").exists()
        t1 = time.monotonic()
        node.start(iid)
        node.wait_all(1500)
        status = node.status(iid)
        assert status.status == "running", status.error
        print(f"TCG restart to app running: {time.monotonic() - t1:.1f} s")
        assert _get(f"http://127.0.0.1:{port}/note").text == note
        assert _get(f"http://127.0.0.1:{port}/boots").text.split() == ["boot", "boot"]
        assert SECRET.encode() not in hda.read_bytes()
        # (5) remove: no QEMU left, the VM's directory (its ciphertext) gone
        cvm2 = node._cvm(iid).booted
        assert isinstance(cvm2, QemuCvm)
        pid2 = cvm2.pid()
        result = node.remove(iid)
        assert result.leftovers == []
        assert pid2 is not None and not Path(f"/proc/{pid2}/cmdline").exists()
        assert not cvm2.workdir.exists()
    finally:
        session.close()
