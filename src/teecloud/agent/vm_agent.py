"""The guest agent inside a qemu-backend VM (`teecloud image build` installs teecloud and its runtime
dependencies as wheels in the rootfs; the guest's init runs `python3 -m teecloud.agent.vm_agent`).

Boot, in the guest (the SAME guest half as the docker backend's: teecloud.agent.guest.boot_guest):
(1)-(5) measuring, keys, env, storage, agent
        the TEE: the guest TEE factory (teecloud.tee.guest.guest_tee) for the mode the host states in
        `.sys-config.json` (`tee_mode`): tdx → TdxPlatform (configfs-tsm quotes, RTMR3 through the
        tdx_guest sysfs registers), sev-snp → SevSnpPlatform (configfs-tsm), plain → the SIMULATED TDX
        (teecloud.tee.simulated; its state from the host share, `simulated-tee/`: simulated quotes verify
        only where a development root is trusted). A mode whose device is absent fails the boot, never
        falls back to the simulated TEE. RTMR3 measured in dstack's order with `os-image-hash` (KMS mode);
        keys from the KMS of `.sys-config.json` over mutual RA-TLS (`key_provider_from_sys_config`), the
        KMS's certificate checked against its quote (plain: the development root; tdx / sev-snp: Intel's
        root with the collateral of `pccs_url`): one KMS (`kms_urls[0]`, and the KMS root key
        `kms_ca_pubkey` the node verified on chain, KmsAuth.isKmsAllowed), or t of n threshold nodes
        (`kms_group`: the group's epoch, t, commitments and signing key as the chain records them, each
        node's URL and the measurement and device of the certificate the node checked on chain; the same
        ThresholdKeyProvider as the docker backend's). The URLs are guest-side addresses (10.0.2.100+):
        QEMU's restricted user network forwards each to one host loopback port and nothing else. Env
        decrypted (only `allowed_envs`), into tmpfs; the data disk opened as LUKS2 with the disk key
        (LuksVolume, ext4 inside, mounted at /data); /var/run/dstack.sock and tappd.sock served to the
        app's containers; the GPU gate (guest_gpu_gate: NVML on a passed-through GPU, in mode plain the
        labelled simulated GPU) runs when the compose requires GPU attestation. With `gateway_urls`, the
        registration key and certificate are made at the key request (RegisteringAtBoot: RTMR3 is then the
        boot grammar's value)
(6) starting   dockerd with its data root on the encrypted disk; `docker load` of the read-only app-images
               disk (the host's `docker save` of the compose's images, if attached); Compose up, the
               decrypted env given to Compose's process only (interpolation, `environment: [NAME]`)
(7) healthy    every service running
(8) gateway    with `gateway_urls` (+ `gateway_ca_pem`): teecloud.gateway.client.Registrar registers the CVM
               with every gateway over mutual RA-TLS now and re-registers periodically (what docker CVMs'
               registrations run, teecloud.gateway.client.register); each route's backend is the host's
               loopback forward of the published port (`127.0.0.1:H`, where QEMU's hostfwd enters the guest)

What the host may ask (the loopback-forwarded port 8090; never a quote over bytes the host chose):
    GET /info   {"guest", "compose_hash", "tee", "phase", "error", "timings", "dropped_env", "key_provider",
                "gateway"}: the compose
                hash is sha256 of app-compose.json as the guest read it from the read-only host share
                (dstack's compose hash); `phase` is the boot's (BOOT_PHASES, then "running" or "failed")
    GET /containers  the app's containers (dstack's ListContainers; `docker inspect` in the guest), [] before
                the boot is done
    GET /attest?nonce=<hex, at most 64 bytes>
                the node API's attestation (teecloud.node.api.attest_report_data, computed HERE): a quote
                over sha512("teecloud-attest:" ‖ nonce), never over bytes the host chose; 409 before the
                boot is done
    POST /node-vouch  the launching node's signed statement of this CVM's endpoints (teecloud.node.vouch;
                a JSON body of at most MAX_VOUCH_BODY bytes, parsed strictly as the gateway's NodeVouch, for
                this instance, not older than the one held): kept and sent with each gateway registration.
                The guest trusts nothing in it (the gateway checks the signature and NodeRegistry); the node
                posts a fresh one before the last expires. 204, 400 for a bad statement, 409 before boot.
Any other method or path is a 404/405. Requests are bounded by http.server (64 KiB request line, 100
headers) and a per-connection timeout; answers are small and fixed in shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from teecloud._docker_inspect import container_states

__all__ = [
    "AGENT_PORT",
    "GUEST_NAME",
    "GuestStatus",
    "attest_document",
    "attest_report_data",
    "find_data_disk",
    "gateway_endpoints",
    "key_provider_from_sys_config",
    "make_handler",
    "read_info",
]

GUEST_NAME = "teecloud-guest"
AGENT_PORT = 8090
GUEST_ADDRESS = "10.0.2.10"
MAX_CA_ROOT_PEM = 8192  # the group root CA certificate (PEM) a threshold guest is given
MAX_KMS_NODES = 16
MAX_APP_COMPOSE = 512 * 1024
MAX_SHARED_FILE = 1024 * 1024
SHARE = Path("/dstack/.host-shared")
RUN = Path("/run/teecloud")
DATA = Path("/data")
APP_IMAGES_SERIAL = "tc-images"
# the node API's attestation domain (teecloud.node.api.ATTEST_DOMAIN; a test checks they are the same: the
# agent layer cannot import the node's)
ATTEST_DOMAIN = b"teecloud-attest:"
MAX_ATTEST_NONCE = 64
# NVIDIA device identity roots the guest's GPU gate trusts for a passed-through GPU: PEM files in the
# measured rootfs (none in the default image: `image build` does not add NVIDIA's root yet)
GPU_ROOTS = Path("/opt/teecloud/gpu-roots")
MAX_GPU_ROOTS = 16
DOCKERD_TIMEOUT_S = 300.0
HEALTHY_TIMEOUT_S = 300.0


def read_info(shared: Path) -> dict[str, str]:
    """The host-facing identity, read once at start from the host share: the compose hash and the TEE of
    the mode the host states (plain: labelled simulated; an unreadable mode is reported, and the boot then
    fails at measuring with the reason)."""
    from teecloud.tee import TeeError
    from teecloud.tee.guest import guest_mode, tee_label
    from teecloud.tee.sysconfig import read_sys_config

    raw = (shared / "app-compose.json").read_bytes()[: MAX_APP_COMPOSE + 1]
    if len(raw) > MAX_APP_COMPOSE:
        raise ValueError(f"app-compose.json is larger than {MAX_APP_COMPOSE} bytes")
    try:
        tee = tee_label(guest_mode(read_sys_config(shared / ".sys-config.json")))
    except TeeError as exc:
        tee = f"none ({str(exc)[:200]})"
    return {"guest": GUEST_NAME, "compose_hash": hashlib.sha256(raw).hexdigest(), "tee": tee}


def attest_report_data(nonce: bytes) -> bytes:
    """The report_data of the node API's attestation for `nonce` (as teecloud.node.api's; in the guest)."""
    if len(nonce) > MAX_ATTEST_NONCE:
        raise ValueError(f"the nonce is at most {MAX_ATTEST_NONCE} bytes")
    return hashlib.sha512(ATTEST_DOMAIN + bytes(nonce)).digest()


Attest = Callable[[bytes], dict[str, str]]


def attest_document(
    get_quote: Callable[[bytes], Mapping[str, Any]], identity: Mapping[str, str], report_data: bytes
) -> dict[str, str]:
    """`/attest`'s answer: a quote over `report_data` (the agent's own attest_report_data of the host's
    nonce) through `get_quote` (the guest API's GetQuote, i.e. the guest TEE), with the CVM's identity."""
    q = get_quote(report_data)
    return {
        **identity,
        "quote": q["quote"],
        "event_log": q["event_log"],
        "report_data": q["report_data"],
        "vm_config": q["vm_config"],
    }


MAX_VOUCH_BODY = 16 * 1024
VOUCH_WAIT_S = 60.0


class GuestStatus:
    """What `GET /info` reports: the identity, then the boot's phase, error and timings (thread-safe); and,
    once booted, how to attest (`attest(report_data)`); the node's newest vouch statement (`node_vouch`)."""

    def __init__(self, info: Mapping[str, str]) -> None:
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {**info, "phase": "measuring", "error": None, "timings": {}}
        self.attest: Attest | None = None
        self.containers: Callable[[], list[dict[str, Any]]] | None = None
        # (app_id hex, instance_id hex) once booted: the instance a node statement must be for
        self.identity: tuple[str, str] | None = None
        self._vouch: Any = None  # teecloud.gateway.api.NodeVouch
        self._vouched = threading.Event()

    def take_vouch(self, body: bytes) -> tuple[int, str]:
        """POST /node-vouch: (HTTP status, reason). Parsed strictly; kept only if for this instance and not
        older than the statement held."""
        from pydantic import ValidationError

        from teecloud.gateway import api as gateway_api

        if self.identity is None:
            return 409, "the CVM has not finished booting"
        try:
            vouch = gateway_api.NodeVouch.model_validate_json(body)
        except ValidationError as exc:
            return 400, f"not a node statement: {exc.error_count()} error(s)"
        if (vouch.app_id, vouch.instance_id) != self.identity:
            return 400, "the statement is for another instance"
        with self._lock:
            if self._vouch is not None and vouch.issued_at < self._vouch.issued_at:
                return 400, "older than the statement held"
            self._vouch = vouch
        self._vouched.set()
        return 204, ""

    def node_vouch(self) -> Any:
        """The newest statement the node posted (None: none yet)."""
        with self._lock:
            return self._vouch

    def wait_vouch(self, timeout: float) -> bool:
        return self._vouched.wait(timeout)

    def list_containers(self) -> list[dict[str, Any]]:
        """The app's containers once booted ([] before, or when Docker does not answer)."""
        fn = self.containers
        if fn is None:
            return []
        try:
            return fn()
        except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired):
            return []

    def set(self, **fields: Any) -> None:
        with self._lock:
            self._doc.update(fields)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            copy: dict[str, Any] = json.loads(json.dumps(self._doc))  # a deep copy
            return copy


def make_handler(
    info: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    attest: Callable[[], Attest | None] = lambda: None,
    containers: Callable[[], list[dict[str, Any]]] = lambda: [],
    node_vouch: Callable[[bytes], tuple[int, str]] = lambda _b: (409, "not taken"),
) -> type[BaseHTTPRequestHandler]:
    current: Callable[[], Mapping[str, Any]] = info if callable(info) else (lambda: info)

    class Handler(BaseHTTPRequestHandler):
        timeout = 10
        server_version = "teecloud-vm-agent"

        def _json(self, code: int, doc: Mapping[str, Any] | list[Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # http.server's name
            parts = urlsplit(self.path)
            if self.path == "/info":
                self._json(200, current())
            elif self.path == "/containers":
                self._json(200, containers())
            elif parts.path == "/attest":
                self._attest(parts.query)
            else:
                self.send_error(404, "not found")

        def do_POST(self) -> None:  # http.server's name
            if self.path != "/node-vouch":
                known = urlsplit(self.path).path in ("/info", "/containers", "/attest")
                self.send_error(405 if known else 404, "method not allowed" if known else "not found")
                return
            try:
                length = int(self.headers.get("Content-Length") or "-1")
            except ValueError:
                length = -1
            if not 0 < length <= MAX_VOUCH_BODY:
                self.close_connection = True
                self._json(400 if length <= 0 else 413, {"error": f"a body of 1..{MAX_VOUCH_BODY} bytes"})
                return
            code, reason = node_vouch(self.rfile.read(length))
            if code == 204:
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._json(code, {"error": reason})

        def _attest(self, query: str) -> None:
            params = parse_qs(query, keep_blank_values=True, max_num_fields=4)
            values = params.get("nonce", [])
            if set(params) != {"nonce"} or len(values) != 1:
                self._json(400, {"error": "exactly one parameter: nonce (hex)"})
                return
            try:
                nonce = bytes.fromhex(values[0])
                report_data = attest_report_data(nonce)
            except ValueError as exc:
                self._json(400, {"error": f"bad nonce: {exc}"})
                return
            fn = attest()
            if fn is None:
                self._json(409, {"error": "the CVM has not finished booting"})
                return
            self._json(200, fn(report_data))

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write("vm-agent: " + (format % args) + "\n")

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            if str(code) != "200" or self.path not in ("/info", "/containers"):  # polled by the host
                super().log_request(code, size)

    return Handler


class PinnedKmsNode:
    """The chain answer a guest without a chain client can give about one threshold KMS node: allowed iff its
    certificate's quote shows the measurement and device pinned for that share index and TCB UpToDate. The
    node pins, in .sys-config.json, what the certificate its own client checked against
    KmsAuth.isKmsAllowed showed. Never an app authority."""

    def __init__(self, index: int, mr_aggregated: bytes, device_id: bytes) -> None:
        self.index, self.mr_aggregated, self.device_id = index, mr_aggregated, device_id

    def is_kms_allowed(self, boot_info: Any) -> tuple[bool, str]:
        if boot_info.tcb_status != "UpToDate":
            return False, "TCB status is not UpToDate"
        if bytes(boot_info.mr_aggregated) != self.mr_aggregated:
            return False, f"not the measurement pinned for KMS node {self.index}"
        if bytes(boot_info.device_id) != self.device_id:
            return False, f"not the device pinned for KMS node {self.index}"
        return True, f"KMS node {self.index} as pinned"

    def is_app_allowed(self, boot_info: Any) -> tuple[bool, str]:
        return False, "a guest's pinned KMS committee answers for KMS nodes only"


def _hex(doc: Mapping[str, Any], name: str, size: int | None = None) -> bytes:
    value = doc.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or (size is not None and len(raw) != size):
        want = f"{size} bytes of hex" if size is not None else "hex"
        raise ValueError(f".sys-config.json: {name} is not {want}")
    return raw


def _guest_url(url: object) -> str:
    if not isinstance(url, str) or len(url) > 512:
        raise ValueError(".sys-config.json: a KMS URL is not a string")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f".sys-config.json: bad KMS URL {url[:200]!r} (https://host:port)")
    return url


def key_provider_from_sys_config(
    sys_config: Mapping[str, Any],
    *,
    collateral_for: Callable[[bytes, int], bytes],
    dev_root_der: bytes | None,
) -> Any:
    """The guest's KeyProvider from the host-shared .sys-config.json: a KmsClient of `kms_urls[0]` pinned to
    `kms_ca_pubkey`, or, with `kms_group`, a ThresholdKeyProvider over its nodes (each node's certificate
    checked by its own client against the committee's record of that node). Raises ValueError naming what
    is missing or malformed."""
    from teecloud.kms.client import connect_kms

    group = sys_config.get("kms_group")
    if group is None:
        kms_urls = sys_config.get("kms_urls")
        ca_pubkey = sys_config.get("kms_ca_pubkey")
        if not isinstance(kms_urls, list) or not kms_urls:
            raise ValueError(".sys-config.json names no KMS (kms_urls)")
        if not isinstance(ca_pubkey, str):
            raise ValueError(".sys-config.json names no KMS root key (kms_ca_pubkey) and no kms_group")
        return connect_kms(
            _guest_url(kms_urls[0]),
            collateral_for=collateral_for,
            dev_root_der=dev_root_der,
            expected_ca_pubkey_der=_hex(sys_config, "kms_ca_pubkey"),
        )
    if not isinstance(group, dict):
        raise ValueError(".sys-config.json: kms_group is not an object")
    # threshold only (its ristretto255 needs pysodium and libsodium, in the image)
    from teecloud.errors import Error
    from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider

    nodes = group.get("nodes")
    commitments = group.get("commitments")
    epoch, t = group.get("epoch"), group.get("t")
    if not isinstance(nodes, dict) or not 1 <= len(nodes) <= MAX_KMS_NODES:
        raise ValueError(f".sys-config.json: kms_group.nodes is 1..{MAX_KMS_NODES} nodes by share index")
    if not isinstance(commitments, list) or not all(isinstance(c, str) for c in commitments):
        raise ValueError(".sys-config.json: kms_group.commitments is a list of hex strings")
    if type(epoch) is not int or type(t) is not int:
        raise ValueError(".sys-config.json: kms_group.epoch and .t are integers")
    clients = {}
    urls = {}
    for key, node in nodes.items():
        if not isinstance(key, str) or not key.isdigit() or not isinstance(node, dict):
            raise ValueError(
                ".sys-config.json: kms_group.nodes maps a share index to {url, mr_aggregated, ...}"
            )
        index = int(key)
        urls[index] = _guest_url(node.get("url"))
        pin = PinnedKmsNode(index, _hex(node, "mr_aggregated", 32), _hex(node, "device_id", 32))
        clients[index] = connect_kms(
            urls[index], collateral_for=collateral_for, dev_root_der=dev_root_der, chain=pin
        )
    try:
        signing_key = _hex(group, "signing_key") if group.get("signing_key") else b""
        ca_root_cert = group.get("ca_root_cert", "")
        if not isinstance(ca_root_cert, str) or len(ca_root_cert) > MAX_CA_ROOT_PEM:
            raise ValueError(f"ca_root_cert is a PEM certificate of at most {MAX_CA_ROOT_PEM} characters")
        parsed = ThresholdGroup(
            epoch,
            t,
            tuple(bytes.fromhex(c) for c in commitments),
            urls,
            signing_key=signing_key,
            ca_root_cert=ca_root_cert,
        )
    except (ValueError, Error) as exc:
        raise ValueError(f".sys-config.json: kms_group: {exc}") from None
    return ThresholdKeyProvider(parsed, clients)


def gateway_endpoints(containers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gateway Endpoints (teecloud.gateway.api) of the app's published TCP ports: the app port and the
    host's loopback forward of it (hostfwd 127.0.0.1:H enters the guest at port H, where Docker publishes
    it), one per app port."""
    seen: dict[int, dict[str, Any]] = {}
    for c in containers:
        for p in c.get("ports") or []:
            if p.get("protocol") == "tcp" and p.get("host_port") and p["container_port"] not in seen:
                seen[p["container_port"]] = {
                    "port": p["container_port"],
                    "host": "127.0.0.1",
                    "host_port": p["host_port"],
                }
    return [seen[k] for k in sorted(seen)]


def _serial(dev: Path) -> str:
    try:
        return (Path("/sys/block") / dev.name / "serial").read_text().strip()
    except OSError:
        return ""


def _mount_sources() -> set[str]:
    try:
        with open("/proc/mounts") as f:
            return {line.split()[0] for line in f if line.strip()}
    except OSError:
        return set()


def _in_use(dev: Path, mounted: set[str]) -> bool:
    """`dev` or one of its partitions (`/dev/vdc1`: vvfat's disk is partitioned) is mounted."""
    return any(m == str(dev) or (m.startswith(str(dev)) and m[len(str(dev)) :].isdigit()) for m in mounted)


def find_data_disk(devices: list[Path], mounted: set[str] | None = None) -> Path:
    """The VM's data disk among its virtio disks: not the verity rootfs (squashfs), not the app-images disk
    (its serial), not a mounted one or one with a mounted partition (the host share)."""
    mounted = _mount_sources() if mounted is None else mounted
    found = []
    for dev in devices:
        with contextlib.suppress(OSError):
            with dev.open("rb") as f:
                if f.read(4) == b"hsqs":
                    continue
        if _serial(dev) == APP_IMAGES_SERIAL or _in_use(dev, mounted):
            continue
        found.append(dev)
    if len(found) != 1:
        raise RuntimeError(f"expected one data disk, found {[str(d) for d in found]}")
    return found[0]


def _read_shared(name: str) -> bytes | None:
    try:
        with (SHARE / name).open("rb") as f:
            data = f.read(MAX_SHARED_FILE + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_SHARED_FILE:
        raise ValueError(f"{name} is larger than {MAX_SHARED_FILE} bytes")
    return data


def _json_shared(name: str) -> dict[str, Any]:
    raw = _read_shared(name)
    doc = json.loads(raw) if raw is not None else None
    if not isinstance(doc, dict):
        raise ValueError(f"{name} is missing or not a JSON object")
    return doc


def image_gpu_roots(directory: Path = GPU_ROOTS) -> tuple[bytes, ...]:
    """The DER certificates of the PEM files in `directory` (the image's trusted GPU device roots)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    roots: list[bytes] = []
    for path in sorted(directory.glob("*.pem"))[:MAX_GPU_ROOTS] if directory.is_dir() else []:
        for cert in x509.load_pem_x509_certificates(path.read_bytes()[:65536]):
            roots.append(cert.public_bytes(serialization.Encoding.DER))
    return tuple(roots[:MAX_GPU_ROOTS])


def guest_gpu_gate(mode: str, *, home: Path, pci_devices: Path | None = None) -> Any:
    """The guest's GPU gate (teecloud.agent.boot.GpuGate) for `mode`, or None without a GPU source: NVML
    over a passed-through NVIDIA GPU, trusting the image's roots (GPU_ROOTS); in mode plain without a GPU,
    a SIMULATED GPU of this boot, trusting its own development root only (labelled in every item)."""
    from teecloud.agent.boot import GpuGate
    from teecloud.tee.gpu import PCI_DEVICES, SimulatedGpu, guest_gpu_source

    source = guest_gpu_source(mode, pci_devices=pci_devices or PCI_DEVICES, home=home)
    if source is None:
        return None
    if isinstance(source, SimulatedGpu):
        return GpuGate(source, (source.root_der(),))
    return GpuGate(source, image_gpu_roots())


def _log(msg: str) -> None:
    print(f"vm-agent: {msg}", flush=True)


def _run(argv: list[str], what: str, *, env: Mapping[str, str] | None = None, timeout: float = 600) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, env=dict(env) if env else None, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
    return r.stdout


def _start_dockerd() -> None:
    root = DATA / "docker"
    root.mkdir(parents=True, exist_ok=True)
    log = (RUN / "dockerd.log").open("ab")
    subprocess.Popen(
        ["dockerd", f"--data-root={root}", "--host=unix:///var/run/docker.sock"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + DOCKERD_TIMEOUT_S
    while time.monotonic() < deadline:
        if subprocess.run(["docker", "version"], capture_output=True, timeout=60).returncode == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"dockerd did not answer within {DOCKERD_TIMEOUT_S:.0f} s")


def _app_images_disk(devices: list[Path]) -> Path | None:
    return next((d for d in devices if _serial(d) == APP_IMAGES_SERIAL), None)


def list_containers(project: str = "app") -> list[dict[str, Any]]:
    """The project's containers as the node's ContainerState fields (teecloud.node.runtime.base), from
    `docker inspect` in the guest; ports as Docker publishes them in the guest (the host keeps the ones it
    forwards)."""
    ids = _run(
        ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
        "docker ps",
        timeout=30,
    ).split()[:256]
    if not ids:
        return []
    return container_states(_run(["docker", "inspect", *ids], "docker inspect", timeout=30))


def _compose_ps(project: str, compose: list[str], env: Mapping[str, str]) -> list[str]:
    ids = _run([*compose, "-p", project, "ps", "-q"], "compose ps", env=env).split()
    states = []
    for cid in ids:
        states.append(_run(["docker", "inspect", "-f", "{{.State.Status}}", cid], "docker inspect").strip())
    return states


def boot_vm(status: GuestStatus) -> None:
    """(1)-(8) of the module docstring, reporting each phase through `status`."""
    from teecloud.agent.api import GetQuoteRequest
    from teecloud.agent.guest import GuestPaths, boot_guest
    from teecloud.agent.volume_luks import STORAGE_FS, LuksVolume
    from teecloud.tee.guest import GuestTeePaths, guest_mode, guest_tee
    from teecloud.tee.simulated import SimulatedTdx
    from teecloud.tee.sysconfig import read_sys_config

    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def progress(phase: str) -> None:
        timings[phase] = round(time.perf_counter() - t0, 2)
        status.set(phase=phase, timings=dict(timings))
        _log(f"phase {phase} at {timings[phase]} s")

    app_compose = _read_shared("app-compose.json") or b""
    info = _json_shared(".instance-info")
    sys_config = _json_shared(".sys-config.json")
    encrypted_env = _read_shared(".encrypted-env")
    # the TEE of the mode the host states (teecloud.tee.guest): tdx, sev-snp, or plain's simulated TDX;
    # a mode whose device is absent raises here, and the boot fails at measuring
    mode = guest_mode(read_sys_config(SHARE / ".sys-config.json"))
    tee = guest_tee(mode, GuestTeePaths(share=SHARE, run=RUN))
    _log(f"TEE: {mode} ({tee.kind})")
    if isinstance(tee, SimulatedTdx):
        # plain: the KMS's quote is simulated too, under this installation's development root
        sim = tee

        def collateral_for(quote: bytes, now: int) -> bytes:
            return sim.collateral()

        dev_root_der: bytes | None = sim.dev_root_der()
    else:
        # a real TEE: the KMS's quote under Intel's root, with the collateral of the host's PCCS
        from teecloud.collateral.pccs import PccsClient
        from teecloud.peer import PccsCollateral

        pccs_url = sys_config.get("pccs_url")
        if not isinstance(pccs_url, str) or not pccs_url:
            raise RuntimeError(f"mode {mode}: .sys-config.json names no PCCS (pccs_url) to verify the KMS")
        pccs = PccsCollateral(PccsClient(pccs_url, RUN / "pccs"))

        def collateral_for(quote: bytes, now: int) -> bytes:
            return pccs.collateral_for(quote, now=now)

        dev_root_der = None
    provider: Any = key_provider_from_sys_config(
        sys_config, collateral_for=collateral_for, dev_root_der=dev_root_der
    )
    gateway_urls = sys_config.get("gateway_urls") or []
    boots = None
    if gateway_urls:
        from teecloud.gateway.client import RegisteringAtBoot

        # the registration certificate's quote is taken at the key request, RTMR3 the boot grammar's
        provider = boots = RegisteringAtBoot(provider)
    devices = sorted(Path("/dev").glob("vd[a-z]"))
    volume = LuksVolume(find_data_disk(devices), DATA)
    env_file = RUN / "env" / "env.json"
    os_image = tee.os_image_hash
    guest = boot_guest(
        tee=tee,
        app_compose=app_compose,
        app_id=bytes.fromhex(info["app_id"]),
        instance_id=bytes.fromhex(info["instance_id"]),
        key_provider=provider,
        encrypted_env=encrypted_env,
        paths=GuestPaths(
            dstack_sock=Path("/var/run/dstack.sock"),
            tappd_sock=Path("/var/run/tappd.sock"),
            env_file=env_file,
            cipher_dir=Path("/nonexistent"),  # unused: the volume is the LUKS disk
            mount_point=DATA,
        ),
        render_env=lambda env: json.dumps(dict(env)).encode(),
        extra_events=[("os-image-hash", os_image)] if len(os_image) == 32 else [],
        progress=progress,
        volume=volume,
        storage_fs=STORAGE_FS,
        gpu=guest_gpu_gate(mode, home=RUN / "home"),
    )
    # the KMS the keys came from, as measured in `key-provider` (one KMS's root key, or the threshold group's)
    kp = provider.info()
    status.set(key_provider={k: str(kp.get(k, "")) for k in ("name", "id", "epoch")})
    if guest.dropped_env:
        _log(f"env vars not in allowed_envs dropped: {', '.join(guest.dropped_env)}")
    status.set(dropped_env=guest.dropped_env)
    # (6)
    progress("starting")
    _start_dockerd()
    images = _app_images_disk(devices)
    if images is not None:
        _run(["docker", "load", "-i", str(images)], "docker load of the app images")
    text = guest.state.app_compose.get("docker_compose_file")
    if not isinstance(text, str):
        raise RuntimeError("app-compose.json has no docker_compose_file")
    workdir = RUN / "app"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "docker-compose.yaml").write_text(text)
    env = {**os.environ, **json.loads(env_file.read_text() or "{}")}
    compose = ["docker-compose", "-f", str(workdir / "docker-compose.yaml")]
    _run([*compose, "-p", "app", "up", "-d", "--no-build"], "compose up", env=env)
    # (7)
    progress("healthy")
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while True:
        states = _compose_ps("app", compose, env)
        if states and all(s == "running" for s in states):
            break
        if time.monotonic() > deadline or any(s in ("exited", "dead") for s in states):
            raise RuntimeError(f"the app's containers are not running: {states}")
        time.sleep(1)
    state = guest.state
    service = guest.runner.service
    status.identity = (state.app_id.hex(), info["instance_id"].lower())

    identity = {
        "app_id": state.app_id.hex(),
        "compose_hash": state.compose_hash.hex(),
        "app_compose": state.app_compose_text,
    }

    def get_quote(report_data: bytes) -> dict[str, Any]:
        return service.get_quote(GetQuoteRequest(report_data=report_data.hex()))

    def attest(report_data: bytes) -> dict[str, str]:
        return attest_document(get_quote, identity, report_data)

    status.attest = attest
    status.containers = list_containers
    timings["running"] = round(time.perf_counter() - t0, 2)
    status.set(phase="running", timings=dict(timings))
    _log(f"app running ({timings['running']} s after the agent started)")
    # (8)
    if boots is not None and boots.key is not None and boots.cert_der is not None:
        try:
            # the app-compose.json bytes the guest measured: the gateway checks them against the certificate
            _register_with_gateways(status, sys_config, boots.key, boots.cert_der, app_compose.decode())
        except (RuntimeError, ValueError, OSError) as exc:  # the app runs on; it is just not routed
            _log(f"gateway registration not started: {exc}")
            status.set(gateway={"error": str(exc)[:500]})


def _register_with_gateways(
    status: GuestStatus, sys_config: Mapping[str, Any], key: Any, cert_der: bytes, app_compose: str
) -> None:
    """(8): the same Registrar a CVM runs anywhere (teecloud.gateway.client), started once, its first round
    now; `/info`'s `gateway` says how each gateway answered that round."""
    from teecloud.gateway import api as gateway_api
    from teecloud.gateway.client import Registrar

    urls = sys_config.get("gateway_urls")
    ca_pem = sys_config.get("gateway_ca_pem")
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls) or not isinstance(ca_pem, str):
        raise RuntimeError(".sys-config.json: gateway_urls is a list of URLs and gateway_ca_pem a PEM")
    endpoints = [gateway_api.Endpoint(**e) for e in gateway_endpoints(list_containers())]
    if not endpoints:
        status.set(gateway={"registered": [], "error": "the app publishes no TCP port"})
        return
    if sys_config.get("node_vouch") is True:
        # the node posts its statement once it sees the app running: the first round waits for it (a
        # registration without it would be refused by a gateway that requires it)
        if not status.wait_vouch(VOUCH_WAIT_S):
            _log(f"no node statement within {VOUCH_WAIT_S} s: registering without one until it comes")
    registrar = Registrar(
        urls[:8],
        key,
        cert_der,
        endpoints,
        ca_pem=ca_pem,
        app_compose=app_compose,
        node_vouch=status.node_vouch,
    ).start()
    answers = {u: str(a) if isinstance(a, Exception) else "registered" for u, a in registrar.last.items()}
    _log(f"gateway registration: {answers}")
    status.set(gateway=answers)


def main(argv: list[str]) -> int:
    shared = Path(argv[1]) if len(argv) > 1 else SHARE
    try:
        info = read_info(shared)
    except (OSError, ValueError) as exc:
        print(f"vm-agent: cannot read the host share {shared}: {exc}", file=sys.stderr)
        return 1
    status = GuestStatus(info)
    RUN.mkdir(parents=True, exist_ok=True, mode=0o700)
    # the address QEMU's user network forwards the host's loopback port to (the init configures it)
    server = ThreadingHTTPServer(
        (GUEST_ADDRESS, AGENT_PORT),
        make_handler(status.snapshot, lambda: status.attest, status.list_containers, status.take_vouch),
    )
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _log(f"compose hash {info['compose_hash']}; listening on port {AGENT_PORT}")
    try:
        boot_vm(status)
    except Exception as exc:  # any failure is the boot's: reported to the host (which powers the VM off)
        from teecloud.agent.errors import GuestBootFailed

        phase = exc.phase if isinstance(exc, GuestBootFailed) else status.snapshot().get("phase")
        _log(f"boot failed at {phase}: {exc}")
        status.set(phase="failed", error=f"{phase}: {type(exc).__name__}: {str(exc)[:2000]}")
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
