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
    PinnedKmsNode,
    attest_report_data,
    find_data_disk,
    gateway_endpoints,
    key_provider_from_sys_config,
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
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        doc = httpx.get(f"{base}/info", timeout=5).json()
        assert doc["compose_hash"] == "00" * 32 and doc["phase"] == "measuring" and doc["error"] is None
        status.set(phase="failed", error="keys: refused")
        doc = httpx.get(f"{base}/info", timeout=5).json()
        assert (doc["phase"], doc["error"]) == ("failed", "keys: refused")
        assert httpx.get(f"{base}/containers", timeout=5).json() == []  # none before the boot is done
        for path in ("/GetQuote", "/info/x", "/info?report_data=00", "/", "/attest/x", "/containers/x"):
            assert httpx.get(base + path, timeout=5).status_code == 404, path
        assert httpx.post(f"{base}/info", content=b"x", timeout=5).status_code == 405
        assert httpx.post(f"{base}/attest?nonce=00", content=b"x", timeout=5).status_code == 405
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


def _group_doc(t: int = 2, n: int = 3) -> dict[str, object]:
    from teecloud.keys import threshold as th

    return {
        "epoch": 1,
        "t": t,
        "commitments": [c.hex() for c in th.deal(None, t, n).commitments],
        "signing_key": "",
        "nodes": {
            str(i): {
                "url": f"https://10.0.2.{99 + i}:443",
                "mr_aggregated": f"{i:02x}" * 32,
                "device_id": "dd" * 32,
            }
            for i in range(1, n + 1)
        },
    }


def _provider(doc: dict[str, object]) -> object:
    return key_provider_from_sys_config(doc, collateral_for=lambda _q, _n: b"", dev_root_der=None)


def test_the_guests_kms_is_the_shared_configs_one_pinned_kms_or_its_threshold_group() -> None:
    from teecloud.kms.client import KmsClient
    from teecloud.kms.threshold_client import ThresholdKeyProvider

    # one KMS: its guest-side URL (a guest forward), pinned to the root key the node verified on chain
    single = _provider({"kms_urls": ["https://10.0.2.100:443"], "kms_ca_pubkey": "ab" * 8})
    assert isinstance(single, KmsClient) and single.url == "https://10.0.2.100:443"
    # t of n: the group as the chain records it, one verifying client per node at its guest-side URL
    doc = _group_doc()
    provider = _provider({"kms_urls": ["ignored"], "kms_group": doc})
    assert isinstance(provider, ThresholdKeyProvider)
    assert (provider.group.epoch, provider.group.t) == (1, 2)
    assert dict(provider.group.nodes) == {i: f"https://10.0.2.{99 + i}:443" for i in (1, 2, 3)}
    assert provider.info()["id"] == doc["commitments"][0]  # type: ignore[index]
    assert {i: c.url for i, c in provider._clients.items()} == dict(provider.group.nodes)
    assert provider.group.ca_root_cert == ""  # no group root CA: self-signed app CAs


def _broken(change: str) -> dict[str, object]:
    doc = _group_doc()
    nodes = doc["nodes"]
    assert isinstance(nodes, dict)
    if change == "t above n":
        doc["t"] = 4
    elif change == "a node without its measurement":
        del nodes["2"]["mr_aggregated"]
    elif change == "a short device id":
        nodes["2"]["device_id"] = "dd"
    elif change == "an http URL":
        nodes["1"]["url"] = "http://10.0.2.100:443"
    elif change == "a named share index":
        nodes["x"] = nodes.pop("1")
    elif change == "commitments not hex":
        doc["commitments"] = ["zz", "zz"]
    elif change == "a string epoch":
        doc["epoch"] = "1"
    elif change == "no nodes":
        doc["nodes"] = {}
    elif change == "a root CA that is not a string":
        doc["ca_root_cert"] = ["-----BEGIN CERTIFICATE-----"]
    elif change == "an oversized root CA":
        doc["ca_root_cert"] = "A" * 9000
    elif change == "a root CA that does not verify":
        doc["ca_root_cert"] = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    return {"kms_group": doc}


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({}, "names no KMS"),
        ({"kms_urls": ["https://10.0.2.100:443"]}, "no KMS root key"),
        ({"kms_urls": ["ftp://x"], "kms_ca_pubkey": "ab"}, "bad KMS URL"),
        ({"kms_urls": ["https://10.0.2.100:443"], "kms_ca_pubkey": "zz"}, "kms_ca_pubkey is not hex"),
        ({"kms_group": []}, "not an object"),
        (_broken("t above n"), "kms_group"),
        (_broken("a node without its measurement"), "mr_aggregated is not 32 bytes"),
        (_broken("a short device id"), "device_id is not 32 bytes"),
        (_broken("an http URL"), "bad KMS URL"),
        (_broken("a named share index"), "maps a share index"),
        (_broken("commitments not hex"), "kms_group"),
        (_broken("a string epoch"), "integers"),
        (_broken("no nodes"), "1..16 nodes"),
        (_broken("a root CA that is not a string"), "ca_root_cert is a PEM certificate"),
        (_broken("an oversized root CA"), "ca_root_cert is a PEM certificate"),
        (_broken("a root CA that does not verify"), "root CA certificate does not verify"),
    ],
)
def test_a_malformed_kms_config_is_refused_with_a_reason(doc: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        _provider(doc)


def test_a_pinned_kms_node_is_allowed_only_with_its_pinned_measurement_and_device() -> None:
    from teecloud.chain.api import BootInfo

    def boot_info(mr: bytes, device: bytes, tcb: str = "UpToDate") -> BootInfo:
        z = bytes(32)
        return BootInfo(bytes(20), z, bytes(20), device, mr, z, z, tcb)

    pin = PinnedKmsNode(2, b"\x02" * 32, b"\xdd" * 32)
    assert pin.is_kms_allowed(boot_info(b"\x02" * 32, b"\xdd" * 32))[0] is True
    assert pin.is_kms_allowed(boot_info(b"\x01" * 32, b"\xdd" * 32)) == (
        False,
        "not the measurement pinned for KMS node 2",
    )  # node 1's measurement does not stand in for node 2
    assert pin.is_kms_allowed(boot_info(b"\x02" * 32, b"\xee" * 32))[0] is False
    assert pin.is_kms_allowed(boot_info(b"\x02" * 32, b"\xdd" * 32, "OutOfDate"))[0] is False
    assert pin.is_app_allowed(boot_info(b"\x02" * 32, b"\xdd" * 32))[0] is False


def test_the_gateway_routes_each_app_port_to_the_hosts_loopback_forward() -> None:
    containers = [
        {
            "ports": [
                {"container_port": 8080, "protocol": "tcp", "host_ip": "0.0.0.0", "host_port": 18080},
                {"container_port": 8080, "protocol": "tcp", "host_ip": "::", "host_port": 18080},
                {"container_port": 53, "protocol": "udp", "host_ip": "0.0.0.0", "host_port": 1053},
                {"container_port": 9000, "protocol": "tcp", "host_ip": None, "host_port": 0},
            ]
        },
        {"ports": [{"container_port": 443, "protocol": "tcp", "host_ip": "0.0.0.0", "host_port": 18443}]},
        {"ports": []},
    ]
    assert gateway_endpoints(containers) == [
        {"port": 443, "host": "127.0.0.1", "host_port": 18443},
        {"port": 8080, "host": "127.0.0.1", "host_port": 18080},
    ]
    from teecloud.gateway.api import Endpoint

    assert [Endpoint(**e).host_port for e in gateway_endpoints(containers)] == [18443, 18080]


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


def test_a_threshold_guest_is_given_the_group_root_ca() -> None:
    """The group root CA (the app CA is signed under it by t nodes) reaches the guest's provider."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "teecloud KMS Root CA")])
    now = dt.datetime.now(dt.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = root.public_bytes(serialization.Encoding.PEM).decode()
    doc = _group_doc()
    doc["ca_root_cert"] = pem
    provider = _provider({"kms_group": doc})
    assert provider.group.ca_root_cert == pem  # type: ignore[attr-defined]
