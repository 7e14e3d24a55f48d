"""A whole CVM on the qemu backend: `teecloud up --backend qemu`'s LocalCloud (chain, KMS, node, gateway)
deploys an app whose image was `docker save`d on the host; the VM (mode plain, TCG) boots the built image,
and its guest agent runs the guest half of boot (simulated TEE measuring into RTMR3, keys from the KMS over
RA-TLS, env decrypted, the data disk opened as LUKS2) then dockerd, `docker load` and Compose, then registers
with the gateway.

One VM for every assertion of the first test (TCG is slow): the app serves through the host's loopback
forward, and through the gateway over HTTPS (curl with the dev CA, at the URL deploy printed), what it wrote
to its volume (the decrypted secret and a random token); the guest re-registers before its route expires;
a new node object (a node restart, the VM left running) re-attaches the VM and its statements keep the route;
the app cannot reach a host loopback port that is not forwarded to it (restricted user network) and the host
listener there sees no connection; the data disk file on the host is LUKS2 and holds neither value; after
stop/start (a fresh VM, the same disk key from the KMS) the app reads the same data back.

The second test boots one more VM on `teecloud up --backend qemu --kms-nodes 3 --threshold 2` and deploys
with an env: the app's env key is made by the nodes' ceremony on the deploy's first request, the deploy
encrypts to it, and the guest decrypts its env from t proved partials (no extra VM: the same boot); the
guest's keys come from t of the n KMS node processes, each reached through its own guest forward, and the
app is reachable through the gateway and serves the secret it was given.
Slow (minutes each), under the e2e lock; needs the host's Docker only to build and save the tiny image.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.docker]

IMAGE = "teecloud-qboot-test:1"
SECRET = "qboot-secret-" + hashlib.sha256(b"teecloud qemu boot").hexdigest()[:20]
BANNER = b"host-loopback-service-the-guest-must-not-reach"
# the app: its note (the decrypted secret + a random token) written once to its volume, one line per boot;
# in the background, a probe of a host loopback port that is not forwarded to the guest ({probe})
APP_SCRIPT = (
    "/bin/busybox --install -s /bin && mkdir -p /data/www && cd /data/www && "
    '{{ [ -f note ] || {{ echo "$$SECRET" > note && cat /proc/sys/kernel/random/uuid >> note; }}; }} && '
    "echo boot >> boots && "
    "{{ ( nc -w 5 10.0.2.2 {probe} </dev/null > probe.out 2>&1; "
    'echo "rc=$$?" >> probe.out; mv probe.out probe ) & }} && '
    "exec httpd -f -p 8080 -h /data/www"
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


def _cloud(tmp_path_factory: pytest.TempPathFactory, **kw: Any) -> Iterator[Any]:
    if not _docker_ok():
        pytest.skip("no Docker engine reachable (the test's image is built and saved with it)")
    from teecloud.devstack import LocalCloud
    from teecloud.image.build import build_image

    _tiny_image()
    # TEECLOUD_GUEST_IMAGE: a built image directory to boot instead (else this tree's, built or cached)
    given = os.environ.get("TEECLOUD_GUEST_IMAGE")
    path = Path(given) if given else build_image().path
    home = tmp_path_factory.mktemp("qboot-home")
    cloud = LocalCloud(home, backend="qemu", qemu_image=path, **kw)
    cloud.start(check=False)
    try:
        yield cloud
    finally:
        try:
            for inst in cloud.node.store.all():
                cloud.node.remove(inst.instance_id)
        finally:
            cloud.stop()


@pytest.fixture
def qcloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from _cloud(tmp_path_factory)


@pytest.fixture
def qcloud_threshold(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from _cloud(tmp_path_factory, kms_nodes=3, kms_threshold=2)


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


class _HostService:
    """A host loopback service (a banner to every connection) that no guest forward names; counts accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(BANNER + b"\n")


def _via_gateway(gateway: dict[str, Any], app_id: str, path: str) -> subprocess.CompletedProcess[str]:
    host = f"{app_id}-8080.{gateway['base_domain']}"
    public = gateway["public_port"]
    return subprocess.run(
        [
            *("curl", "-sS", "--max-time", "20", "--cacert", str(gateway["ca_file"])),
            *("--resolve", f"{host}:{public}:127.0.0.1", f"https://{host}:{public}{path}"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(2400)
def test_a_qemu_cvm_boots_serves_and_keeps_its_data_encrypted(qcloud: Any, tmp_path: Path) -> None:
    from teecloud.cloud.deploy import Session, deploy
    from teecloud.node.runtime.qemu import QemuBackend, QemuCvm
    from teecloud.node.service import Node
    from teecloud.tee.simulated import SimulatedTdx

    gateway = qcloud.endpoints.gateway
    assert gateway, "the local cloud started no gateway (HAProxy missing? scripts/setup.sh installs it)"
    host_service = _HostService()
    port = _free_port()
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        "services:\n"
        "  web:\n"
        f"    image: {IMAGE}\n"
        f'    command: ["/bin/busybox", "sh", "-c", \'{APP_SCRIPT.format(probe=host_service.port)}\']\n'
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
        # the guest's keys came from the KMS whose root key the node pinned (measured in key-provider)
        assert cvm.guest_info["key_provider"]["name"] == "kms"
        assert cvm.guest_info["key_provider"]["id"] == qcloud.key_provider.info()["id"]
        # deploy verified the attestation (quote over its nonce, compose hash); the guest computed report_data
        nonce = b"qboot-nonce"
        att = node.attestation(iid, nonce, public=False)
        assert att.report_data == hashlib.sha512(b"teecloud-attest:" + nonce).hexdigest()
        assert att.compose_hash == r.compose_hash
        # (2) the app serves, through the host's loopback forward, what it wrote to its encrypted volume
        note = _get(f"http://127.0.0.1:{port}/note").text
        assert note.splitlines()[0] == SECRET and len(note.splitlines()) == 2
        assert _get(f"http://127.0.0.1:{port}/boots").text.split() == ["boot"]
        # (2b) and through the gateway: deploy printed the https URL, curl with the dev CA reaches the app
        assert r.gateway_urls == [
            f"https://{r.app_id}-8080.{gateway['base_domain']}:{gateway['public_port']}/"
        ]
        via = _via_gateway(gateway, r.app_id, "/note")
        assert via.returncode == 0 and via.stdout == note, via.stderr
        # ... on a route the launching node vouched for: the gateway requires the node's signed statement
        # (NodeRegistry), which the node posted to the guest (QemuBackendConfig.vouch) and the guest sent
        vouching = qcloud.gateway.service.vouching
        assert vouching is not None and vouching.newest(iid) is not None
        assert cvm.vouch_renewer is not None and cvm.vouch_renewer.posted >= 1
        # (2c) restricted network: the app's probe of a host loopback port not forwarded to it got nothing
        probe = _get(f"http://127.0.0.1:{port}/probe", timeout=60).text
        assert "rc=" in probe and "rc=0" not in probe, probe
        assert BANNER.decode() not in probe and host_service.accepted == 0, probe
        # (3) the data disk on the host is LUKS2 ciphertext: neither the secret nor the token is in it
        hda = cvm.workdir / "hda.img"
        disk = hda.read_bytes()
        assert b"LUKS\xba\xbe" in disk  # the LUKS2 header the guest wrote
        assert SECRET.encode() not in disk
        assert note.splitlines()[1].encode() not in disk
        # the serial console (the CVM's log) shows the guest's phases
        log = b"".join(node.logs(iid, service=None, tail=5000, follow=False, public=False)).decode()
        assert "vm-agent: phase keys" in log and "vm-agent: app running" in log
        # (3b) the guest re-registers before its route expires (the registrar's period is a third of the TTL)
        # and (3c) the node process restarts and the VM runs on: the old process's renewal ends with it; a new
        # node (a new backend: no renewal of the old one's) re-attaches the VM and vouches for it afresh, the
        # guest sends the new statement at its next round and the gateway keeps the route. Both are seen on
        # the same registration round (each waited for a round of its own: 30 s more under TCG)
        reg = [x for x in qcloud.gateway.registry.registrations() if x.instance_id == iid]
        assert len(reg) == 1 and reg[0].app_id == r.app_id
        reg_waited = time.monotonic()  # the re-registration is due within 60 s of here
        old_renewer = cvm.vouch_renewer
        old_renewer.stop()
        posted = old_renewer.posted
        time.sleep(1.1)
        restarted_at = int(time.time())  # statements issued from now on come from the new node
        node2 = Node(
            key_provider=qcloud.key_provider,
            tee_factory=lambda: SimulatedTdx(qcloud.home),
            backend=QemuBackend(node.backend.config, home=qcloud.home),
            home=qcloud.home,
            node_id=node.node_id,
            launcher=node.launcher,
        )
        try:
            assert node2.reattach() == [iid]
            adopted = node2._cvm(iid).booted
            assert isinstance(adopted, QemuCvm) and adopted.pid() == cvm.pid()
            assert adopted.agent_port == cvm.agent_port and node2.status(iid).status == "running"
            renewer = adopted.vouch_renewer
            assert renewer is not None and renewer is not old_renewer and renewer.posted == 1
            assert node2.reattach() == []  # adopted once: no second renewal
            reregistered: float | None = None  # seconds after reg_waited
            deadline = time.monotonic() + 90  # a registration round every 30 s
            while reregistered is None or (vouching.newest(iid) or 0) < restarted_at:
                assert time.monotonic() < deadline, (
                    "the guest did not re-register with the gateway"
                    if reregistered is None
                    else "the gateway took no statement from the new node"
                )
                if reregistered is None:
                    again = [x for x in qcloud.gateway.registry.registrations() if x.instance_id == iid]
                    if again and again[0].expires_at > reg[0].expires_at + 1:
                        reregistered = time.monotonic() - reg_waited
                time.sleep(1)
            if reregistered > 60:
                pytest.fail(
                    f"the guest re-registered with the gateway only after {reregistered:.0f} s (> 60 s)"
                )
            assert old_renewer.posted == posted
            kept = [x for x in qcloud.gateway.registry.registrations() if x.instance_id == iid]
            assert kept and kept[0].expires_at > time.time()
            via = _via_gateway(gateway, r.app_id, "/note")
            assert via.returncode == 0 and via.stdout == note, via.stderr
        finally:
            # the first node object keeps the VM for the steps below; the second one's renewal ends here
            # (closing it would power the VM off)
            adopted_cvm = node2._cvm(iid).booted
            if isinstance(adopted_cvm, QemuCvm) and adopted_cvm.vouch_renewer is not None:
                adopted_cvm.vouch_renewer.stop()
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
        # the new VM registers once its node statement is posted (asynchronous: a round that failed under
        # load is retried after 5 s), so the route comes back within the guest's first rounds
        deadline = time.monotonic() + 120
        via = _via_gateway(gateway, r.app_id, "/boots")
        while via.stdout.split() != ["boot", "boot"] and time.monotonic() < deadline:
            time.sleep(2)
            via = _via_gateway(gateway, r.app_id, "/boots")
        assert via.returncode == 0 and via.stdout.split() == ["boot", "boot"], (via.stdout, via.stderr)
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


@pytest.mark.timeout(2400)
def test_a_qemu_cvm_gets_its_keys_from_t_of_n_kms_nodes(qcloud_threshold: Any, tmp_path: Path) -> None:
    from teecloud.cloud.deploy import Session, deploy
    from teecloud.kms.threshold_client import ThresholdKeyProvider
    from teecloud.node.runtime.qemu import QemuCvm

    cloud = qcloud_threshold
    gateway = cloud.endpoints.gateway
    assert gateway, "the local cloud started no gateway (HAProxy missing? scripts/setup.sh installs it)"
    port = _free_port()
    compose = tmp_path / "docker-compose.yml"
    # the app serves its env secret (decrypted in the guest from t partials) beside a fixed marker
    script = (
        "/bin/busybox --install -s /bin && mkdir /w && echo threshold > /w/k && "
        'echo "$$SECRET" > /w/secret && exec httpd -f -p 8080 -h /w'
    )
    compose.write_text(
        "services:\n"
        "  web:\n"
        f"    image: {IMAGE}\n"
        f'    command: ["/bin/busybox", "sh", "-c", \'{script}\']\n'
        "    environment:\n"
        "      - SECRET\n"
        "    ports:\n"
        f'      - "{port}:8080"\n'
    )
    session = Session(cloud.home)
    try:
        t0 = time.monotonic()
        r = deploy(
            session,
            compose,
            name="qthr",
            env={"SECRET": SECRET, "DROPPED": "x"},
            allowed_envs=["SECRET"],
            timeout=1500,
        )
        assert r.status == "running", r.error
        print(f"TCG deploy to app running (threshold KMS): {time.monotonic() - t0:.1f} s")
        cvm = cloud.node._cvm(r.instance_id).booted
        assert isinstance(cvm, QemuCvm)
        # the guest's provider is the threshold group's (its key measured in key-provider): the keys came
        # from t of the n nodes, each reached at its own guest forward (10.0.2.100-102)
        provider = cloud.key_provider
        assert isinstance(provider, ThresholdKeyProvider) and len(provider.group.nodes) == 3
        assert cvm.guest_info["key_provider"] == {
            "name": "kms-threshold",
            "id": provider.group.group_public_key.hex(),
            "epoch": str(provider.group.epoch),
        }
        shared = (cvm.workdir / "shared" / ".sys-config.json").read_text()
        assert all(f"https://10.0.2.{100 + k}:443" in shared for k in range(3))
        # env through the threshold guest: it ran the env phase, kept SECRET (only allowed_envs), and the
        # host's copy of the env is ciphertext
        assert "env" in cvm.guest_info["timings"] and cvm.guest_info["dropped_env"] == ["DROPPED"]
        assert _get(f"http://127.0.0.1:{port}/secret").text == SECRET + "\n"
        encrypted_env = (cvm.workdir / "shared" / ".encrypted-env").read_bytes()
        assert encrypted_env and SECRET.encode() not in encrypted_env
        # deploy printed the https URL; curl through the gateway with the dev CA reaches the app
        assert r.gateway_urls == [
            f"https://{r.app_id}-8080.{gateway['base_domain']}:{gateway['public_port']}/"
        ]
        via = _via_gateway(gateway, r.app_id, "/k")
        assert via.returncode == 0 and via.stdout == "threshold\n", via.stderr
        assert cloud.node.remove(r.instance_id).leftovers == []
    finally:
        session.close()
