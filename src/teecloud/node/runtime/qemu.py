"""The `qemu` CvmBackend: one VM per CVM, launched with the command line of qemu_cmdline.py (tdx, sev-snp, or
plain under TCG), as dstack-vmm runs them.

Per CVM, in `<home>/node/vms/<instance>/` (dstack-vmm's VmWorkDir layout):
    shared/      the host-shared files dstack passes (app-compose.json, .instance-info, .sys-config.json,
                 .encrypted-env, .user-config), read-only to the guest (9p, or a vvfat disk labelled
                 DSTACKSHR where the guest kernel has no 9p)
    hda.img      the data disk (qcow2; the guest opens it as LUKS2 with the KMS disk key: the host sees only
                 ciphertext)
    serial.log   the serial console: the boot log `logs` serves
    qmp.sock     QEMU's monitor (stop)
    qemu.pid     the QEMU process: its pid, start time, executable and uid (a JSON record, written at launch;
                 a node restart re-attaches to, and `down` powers off, only the process that matches it all
                 and whose command line names this directory: review 11, R11-3)

    app-images.tar  `docker save` of the compose's images (from the host's Docker), attached read-only: the
                 guest `docker load`s it (the VM pulls nothing)

The guest's network is QEMU's user network with `restrict=on`: it reaches neither the host nor the outside
(no DNS, no registry), only the host services the backend forwards to it (`guest_services`): each KMS node
at 10.0.2.100+k:443, each gateway registration listener at 10.0.2.120+k:443 and the PCCS (tdx / sev-snp)
at 10.0.2.124:443, each a `guestfwd` to one host loopback port; `.sys-config.json` names those guest-side
URLs (`kms_urls`, `kms_group`, `gateway_urls`, `pccs_url`), as dstack passes its KMS and gateway URLs.
Published app ports come in by hostfwd.

The guest's agent (teecloud.agent.vm_agent) boots the CVM inside the VM (measure, keys from the KMS over
RA-TLS, env, LUKS, compose) and answers the host on a loopback-forwarded port with `GET /info` only: its
identity and the boot's phase, which the backend follows until `running` (or `failed`, with the guest's
reason, a BootFailed at that phase). The host never sends the guest bytes to quote, and holds none of the
app's keys: nothing in this backend releases a key. The guest picks its TEE from the mode written into
.sys-config.json (`tee_mode`; teecloud.tee.guest). Mode plain's guest uses the simulated TEE (its state
from the node's `simulated-tee/`, shared with the VM: plain mode protects nothing from the host), and pins
the KMS root key the node verified on chain (`kms_ca_pubkey` in .sys-config.json).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from teecloud._fs import atomic_write
from teecloud._proc import kill
from teecloud._procid import MAX_RECORD, ProcessIdentity, RecordError, process_identity
from teecloud.appcompose import AppComposeError, gpu_attestation_required
from teecloud.node.errors import (
    BootFailed,
    ComposeRejected,
    InstanceStateError,
    KeysDenied,
    RuntimeFailed,
    RuntimeUnavailable,
)
from teecloud.node.instance import Instance, node_home
from teecloud.node.runtime.base import BOOT_PHASES, ContainerState, CvmAttestation, Progress, ResourceLimits
from teecloud.node.runtime.qemu_cmdline import (
    MIN_MEMORY_MB as MIN_VM_MEMORY_MB,
)
from teecloud.node.runtime.qemu_cmdline import (
    MODES,
    GuestForward,
    GuestImage,
    Mode,
    PortForward,
    QemuVmConfig,
    UnsafeVmConfig,
    VmShape,
    check_passthrough,
    mrconfigid_v1,
    qemu_argv,
)

__all__ = [
    "QemuBackend",
    "QemuBackendConfig",
    "QemuCvm",
    "SerialLog",
    "check_passthrough_devices",
    "guest_services",
    "power_off",
    "power_off_left_vms",
    "read_vm_record",
    "record_vm",
    "tee_host_missing",
    "vm_pid",
]

log = logging.getLogger("teecloud.node.runtime.qemu")

AGENT_GUEST_PORT = 8090
MAX_AGENT_RESPONSE = 1024 * 1024
MAX_LOG_LINE = 64 * 1024
STOP_GRACE_S = 5.0
# the node's statement of a guest's endpoints (teecloud.node.vouch) is posted again this often: a third of
# its 120 s lifetime, so a guest always holds one that is valid for its next registration rounds
VOUCH_RENEW_S = 40.0
# a round that failed (the guest's Docker slow to answer under load) is retried this soon: the guest's first
# registration round waits at most 60 s for a statement
VOUCH_RETRY_S = 5.0
VouchFn = Callable[[str, list[tuple[int, str, int]]], dict[str, Any]]
# the fixed guest-side addresses of the host services a guest reaches (guest_services)
GUEST_SERVICE_PORT = 443
KMS_GUEST_ADDRESSES = tuple(f"10.0.2.{100 + k}" for k in range(16))
GATEWAY_GUEST_ADDRESSES = tuple(f"10.0.2.{120 + k}" for k in range(4))
PCCS_GUEST_ADDRESSES = ("10.0.2.124",)
# the host-shared files, by their dstack names (dstack_types::shared_filenames)
SHARED_FILES = ("app-compose.json", ".instance-info", ".sys-config.json", ".encrypted-env", ".user-config")


@dataclass(frozen=True)
class QemuBackendConfig:
    image: GuestImage
    mode: Mode = "plain"
    accel: Literal["kvm", "tcg"] = "kvm"
    host_share: Literal["9p", "vvfat"] = "9p"
    qemu: str = "qemu-system-x86_64"
    qemu_img: str = "qemu-img"
    disk_gb: int = 20
    default_memory_mb: int = 2048
    agent_timeout_s: float = 180.0
    # the host's Docker CLI, to `docker save` the app's images for the guest (None: no images disk)
    docker: str | None = "docker"
    # mode plain: the node's simulated TEE state directory (`<home>/simulated-tee`), shared with the guest
    simulated_tee: Path | None = None
    # the KMS root key (hex DER SPKI) the guest pins: the node's KMS client verified it on chain
    kms_ca_pubkey: Callable[[], str] | None = None
    # the KMS URLs (host loopback) a guest booting now reaches, instead of those the instance's
    # .sys-config.json recorded at deploy (a restarted cloud's KMS may listen elsewhere; None: the recorded)
    kms_urls: Callable[[], list[str]] | None = None
    # threshold KMS: the group as the chain records it, {"epoch", "t", "commitments": [hex], "signing_key":
    # hex, "nodes": {index: {"url" (the host's), "mr_aggregated", "device_id"}}} (replaces kms_ca_pubkey)
    kms_group: Callable[[], dict[str, Any]] | None = None
    # the gateways the guest registers with: (registration URLs on the host's loopback, their CA's PEM), or
    # None (no gateway: nothing forwarded, no registration)
    gateway: Callable[[], tuple[list[str], str] | None] | None = None
    # the node vouches for its guests' forwarded ports: vouch(instance_id hex, [(app port, "127.0.0.1", host
    # port)]) -> the signed statement (teecloud.node.vouch.NodeVoucher.vouch), posted to the guest agent
    # after boot and renewed every VOUCH_RENEW_S (None: no statement; a gateway requiring one refuses)
    vouch: VouchFn | None = None
    # GPUs (and NVSwitch bridges) this node passes through, host PCI addresses (modes tdx and sev-snp;
    # dstack-vmm's attach mode "all"): a CVM whose measured compose requires GPU attestation
    # (`"gpu_attestation": "required"`) gets all of them, others none; one running CVM at a time holds them
    gpus: tuple[str, ...] = ()
    gpu_bridges: tuple[str, ...] = ()
    pci_hole64_size: int = 0
    hotplug_off: bool = False
    sysfs: Path = Path("/sys")  # where the GPU and TEE host checks read (tests: a fake tree)
    dev: Path = Path("/dev")

    def __post_init__(self) -> None:
        """Refuse what no launch could use, before any VM: an unknown mode, tdx / sev-snp under TCG, GPUs in
        mode plain, a PCI address not in sysfs's form, a device given twice (QemuVmConfig checks again)."""
        if self.mode not in MODES:
            raise UnsafeVmConfig(f"unknown mode {self.mode!r} (one of: {', '.join(MODES)})")
        if self.accel not in ("kvm", "tcg"):
            raise UnsafeVmConfig(f"accel must be kvm or tcg, got {self.accel!r}")
        if self.mode != "plain" and self.accel != "kvm":
            raise UnsafeVmConfig(
                f"mode {self.mode} needs KVM on a {self.mode} host; TCG runs mode plain only"
            )
        check_passthrough(self.mode, self.gpus, self.gpu_bridges)


# The host side of each confidential mode, as QEMU and KVM need it: the KVM device, the kvm module's TEE
# parameter (the kernel shows it as Y or 1 once the firmware and BIOS have the TEE on), and for SEV-SNP the
# PSP's device that QEMU's sev-snp-guest opens (`sev-device=/dev/sev`, qemu_cmdline.qemu_argv).
_TEE_HOST_PARAMETER = {
    "tdx": ("kvm_intel", "tdx", "kvm_intel tdx=1"),
    "sev-snp": ("kvm_amd", "sev_snp", "kvm_amd sev_snp=1"),
}


def tee_host_missing(mode: str, *, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> list[str]:
    """What this host lacks to launch a VM in `mode` (tdx or sev-snp; nothing for plain), each item naming
    the missing device or kernel parameter and how it is turned on; an empty list when nothing is missing.
    The guest's /dev/tdx_guest and /dev/sev-guest are the guest kernel's, never looked for here."""
    if mode not in _TEE_HOST_PARAMETER:
        return []
    missing = []
    if not os.access(dev / "kvm", os.R_OK | os.W_OK):
        missing.append(f"{dev / 'kvm'} (KVM, readable and writable by this user)")
    module, name, how = _TEE_HOST_PARAMETER[mode]
    parameter = sysfs / "module" / module / "parameters" / name
    try:
        value = parameter.read_text(errors="replace")[:16].strip()
    except OSError:
        value = ""
    if value not in ("Y", "1"):
        shown = f"is {value!r}" if value else "is absent"
        missing.append(f"{parameter} {shown} (a {mode} host kernel loaded with `{how}`)")
    if mode == "sev-snp" and not os.access(dev / "sev", os.R_OK | os.W_OK):
        missing.append(f"{dev / 'sev'} (the AMD PSP's device QEMU opens for SEV-SNP)")
    return missing


def check_passthrough_devices(
    addresses: Sequence[str], *, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")
) -> None:
    """Each device can be given to a VM safely, as QEMU's vfio-pci over iommufd takes it; else
    RuntimeUnavailable naming the device and the fix:
    (1) the host kernel has iommufd (/dev/iommu);
    (2) the device exists and is bound to vfio-pci (no host driver keeps using it);
    (3) it has an IOMMU group and is alone in it (any other device of the group could DMA into the memory
        the IOMMU maps for this one: the group is the unit of isolation);
    (4) it has a VFIO device node (vfio-dev/vfioN: CONFIG_VFIO_DEVICE_CDEV), which iommufd needs."""
    if not addresses:
        return
    # (1)
    if not (dev / "iommu").exists():
        raise RuntimeUnavailable(
            f"{dev / 'iommu'} is absent: GPU passthrough needs the host kernel's iommufd (Linux >= 6.2 with "
            "CONFIG_IOMMUFD) and the IOMMU on (intel_iommu=on / amd_iommu=on)"
        )
    for address in addresses:
        device = sysfs / "bus" / "pci" / "devices" / address
        if not device.is_dir():
            raise RuntimeUnavailable(f"no PCI device {address} on this host ({device})")
        # (2)
        driver = (
            os.path.basename(os.readlink(device / "driver")) if (device / "driver").is_symlink() else None
        )
        if driver != "vfio-pci":
            raise RuntimeUnavailable(
                f"PCI device {address} is bound to {driver or 'no driver'}, not vfio-pci: bind it first "
                f"(e.g. `driverctl set-override {address} vfio-pci`)"
            )
        # (3)
        group_link = device / "iommu_group"
        if not group_link.is_symlink():
            raise RuntimeUnavailable(
                f"PCI device {address} has no IOMMU group: the IOMMU is off (intel_iommu=on / amd_iommu=on)"
            )
        group = os.path.basename(os.readlink(group_link))
        members = sorted(p.name for p in (group_link / "devices").iterdir())
        if members != [address]:
            others = [m for m in members if m != address]
            raise RuntimeUnavailable(
                f"PCI device {address} is not alone in IOMMU group {group} (also: "
                f"{', '.join(others)[:300]}): those devices could reach the memory mapped for it; refused "
                "(put it in its own group: another slot, or ACS on the bridge above it)"
            )
        # (4)
        if not any((device / "vfio-dev").glob("vfio*")):
            raise RuntimeUnavailable(
                f"PCI device {address} has no VFIO device node (vfio-dev/vfioN): QEMU's iommufd backend "
                "needs CONFIG_VFIO_DEVICE_CDEV (Linux >= 6.6)"
            )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _host_loopback_port(url: object, what: str) -> tuple[str, int, str]:
    """(scheme, port, path) of a service URL on this host's loopback: the only services a guest reaches."""
    text = str(url)[:200]
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        port = parts.port if parts is not None else None
    except ValueError:
        parts = port = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise BootFailed("keys", f"{what} {text!r} is not an http(s) URL")
    if parts.hostname not in ("127.0.0.1", "localhost") or port is None:
        raise BootFailed(
            "keys",
            f"{what} {text!r}: the qemu backend forwards host loopback services (127.0.0.1:port) only",
        )
    return parts.scheme, port, parts.path


def guest_services(
    sys_config: dict[str, Any],
    *,
    kms_ca_pubkey: str | None = None,
    kms_group: dict[str, Any] | None = None,
    gateway: tuple[list[str], str] | None = None,
) -> tuple[dict[str, Any], tuple[GuestForward, ...]]:
    """The guest's .sys-config.json and the guestfwd rules that make its URLs reachable: every KMS URL
    (`kms_urls`, or `kms_group`'s nodes by share index), gateway registration URL and the PCCS URL, each on
    this host's loopback, becomes a fixed guest-side address (KMS_GUEST_ADDRESSES, GATEWAY_GUEST_ADDRESSES,
    PCCS_GUEST_ADDRESSES, port 443) forwarded to that one port. Pure; a URL off loopback is a BootFailed at
    `keys`."""
    doc = {k: v for k, v in sys_config.items() if k not in ("kms_ca_pubkey", "kms_group", "gateway_ca_pem")}
    forwards: list[GuestForward] = []

    def forward(url: object, addresses: tuple[str, ...], k: int, what: str) -> str:
        if k >= len(addresses):
            raise BootFailed("keys", f"at most {len(addresses)} {what}s are forwarded to a guest")
        scheme, port, path = _host_loopback_port(url, what)
        forwards.append(GuestForward(addresses[k], GUEST_SERVICE_PORT, port))
        return f"{scheme}://{addresses[k]}:{GUEST_SERVICE_PORT}{path}"

    if kms_group is not None:
        nodes = kms_group["nodes"]
        guest_nodes = {}
        for k, index in enumerate(sorted(nodes, key=int)):
            node = nodes[index]
            guest_nodes[str(index)] = {**node, "url": forward(node["url"], KMS_GUEST_ADDRESSES, k, "KMS URL")}
        doc["kms_group"] = {**kms_group, "nodes": guest_nodes}
        doc["kms_urls"] = [n["url"] for n in guest_nodes.values()]
    else:
        urls = sys_config.get("kms_urls") or []
        doc["kms_urls"] = [forward(u, KMS_GUEST_ADDRESSES, k, "KMS URL") for k, u in enumerate(urls)]
        if kms_ca_pubkey is not None:
            doc["kms_ca_pubkey"] = kms_ca_pubkey
    if sys_config.get("pccs_url"):  # tdx / sev-snp: the collateral the guest verifies the KMS with
        doc["pccs_url"] = forward(sys_config["pccs_url"], PCCS_GUEST_ADDRESSES, 0, "PCCS URL")
    if gateway is not None:
        urls, ca_pem = gateway
        doc["gateway_urls"] = [
            forward(u, GATEWAY_GUEST_ADDRESSES, k, "gateway URL") for k, u in enumerate(urls)
        ]
        doc["gateway_ca_pem"] = ca_pem
    else:
        doc["gateway_urls"] = []
    return doc, tuple(forwards)


def _write_shared(
    inst: Instance,
    shared: Path,
    *,
    kms_ca_pubkey: str | None = None,
    simulated_tee: Path | None = None,
    sys_config: dict[str, Any] | None = None,
    tee_mode: Mode | None = None,
) -> None:
    """Copy the instance's host-shared files into the VM's share (owner-only; atomic each): .sys-config.json
    as `sys_config` gives it (guest_services), else with the KMS root key and the guest's TEE mode
    (`tee_mode`, teecloud.tee.guest) added; in mode plain the simulated TEE's state."""
    shared.mkdir(parents=True, exist_ok=True, mode=0o700)
    sources = {
        "app-compose.json": inst.app_compose_path,
        ".instance-info": inst.info_path,
        ".sys-config.json": inst.sys_config_path,
        ".encrypted-env": inst.encrypted_env_path,
        ".user-config": inst.user_config_path,
    }
    for name in SHARED_FILES:
        src = sources[name]
        if src.is_file():
            data = src.read_bytes()
            if name == ".sys-config.json" and sys_config is not None:
                data = json.dumps(sys_config, sort_keys=True).encode()
            elif name == ".sys-config.json" and (kms_ca_pubkey is not None or tee_mode is not None):
                doc = json.loads(data)
                if kms_ca_pubkey is not None:
                    doc["kms_ca_pubkey"] = kms_ca_pubkey
                if tee_mode is not None:
                    doc["tee_mode"] = tee_mode
                data = json.dumps(doc, sort_keys=True).encode()
            atomic_write(shared / name, data, mode=0o644)
        else:
            with contextlib.suppress(FileNotFoundError):
                (shared / name).unlink()
    shutil.rmtree(shared / "simulated-tee", ignore_errors=True)
    if simulated_tee is not None:
        from teecloud.tee.simulated import SEALING_SECRET_FILE

        # what quoting needs (the simulated PKI, attestation key, collateral); never the sealing secret of
        # this installation's simulated KMS
        shutil.copytree(
            simulated_tee, shared / "simulated-tee", ignore=shutil.ignore_patterns(SEALING_SECRET_FILE)
        )


def _save_images(docker: str, refs: list[str], out: Path) -> None:
    """`docker save` of the app's images into `out` (atomic), the guest's read-only images disk."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        r = subprocess.run(
            [docker, "save", "-o", str(tmp), *refs], capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BootFailed("starting", f"docker save of the app's images: {exc}") from None
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BootFailed("starting", f"docker save of the app's images failed: {r.stderr.strip()[:500]}")
    os.replace(tmp, out)


class SerialLog:
    """The VM's serial console as a LogSource: the last `tail` lines, then (follow) new lines as they come."""

    def __init__(self, path: Path, *, tail: int, follow: bool, alive: Callable[[], bool]) -> None:
        self.path, self.follow, self.alive = path, follow, alive
        self._closed = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._it = self._read(tail)

    def _read(self, tail: int) -> Iterator[bytes]:
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return
        with f:
            lines = f.read().splitlines(keepends=True)
            for line in lines[-tail:] if tail else []:
                yield line[:MAX_LOG_LINE]
            while self.follow and not self._closed.is_set():
                line = f.readline(MAX_LOG_LINE)
                if line:
                    yield line
                elif not self.alive():
                    return
                else:
                    self._closed.wait(0.2)

    def __iter__(self) -> SerialLog:
        return self

    def __next__(self) -> bytes:
        if self._closed.is_set():
            raise StopIteration
        return next(self._it)

    def on_close(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for cb in self._callbacks:
            cb()


class QemuCvm:
    """A VM of the qemu backend (a handle from `attach` re-reads the pid file)."""

    def __init__(self, inst: Instance, workdir: Path, *, agent_port: int | None, booted: bool) -> None:
        self.inst = inst
        self.instance_id = inst.instance_id
        self.workdir = workdir
        self.agent_port = agent_port
        self._booted = booted
        self.timings: dict[str, float] = {}
        self.dropped_env: list[str] = []
        self.guest_info: dict[str, Any] = {}
        self.vouch_renewer: VouchRenewer | None = None

    # -- the QEMU process
    @property
    def pid_file(self) -> Path:
        return self.workdir / "qemu.pid"

    def pid(self) -> int | None:
        """The VM's QEMU pid, if it runs and is this VM's (its command line names this work directory)."""
        return vm_pid(self.workdir)

    def running(self) -> bool:
        return self.pid() is not None

    @property
    def booted(self) -> bool:
        return self._booted and self.running()

    @property
    def public_tcbinfo(self) -> bool:
        try:
            return bool(self.inst.app_compose().get("public_tcbinfo"))
        except (OSError, ValueError):
            return False

    # -- what the host may ask the guest: info, logs, attestation over a nonce, shutdown
    def _agent(self, path: str, params: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self.agent_port is None or not self.running():
            raise InstanceStateError(f"CVM {self.instance_id} is not running")
        try:
            with httpx.Client(timeout=10.0) as c:
                return _bounded_get(c, f"http://127.0.0.1:{self.agent_port}{path}", params)
        except httpx.HTTPError as exc:
            raise RuntimeFailed(f"the guest agent of CVM {self.instance_id} did not answer: {exc}") from exc

    def containers(self) -> list[ContainerState]:
        # the guest's ListContainers (dstack GuestApi); an image without it lists none
        if not self.booted:
            return []
        try:
            status, body = self._agent("/containers")
            if status != 200:
                return []
            forwarded = set(_published_ports(self.inst))
            states = [ContainerState(**c) for c in json.loads(body)[:256]]
        except (InstanceStateError, RuntimeFailed, ValueError, TypeError):
            return []
        for st in states:
            # as the host sees them: a guest port the host forwards from its loopback, once per port
            ports = {
                (int(p["container_port"]), str(p["protocol"]), int(p["host_port"]))
                for p in st.ports
                if isinstance(p, dict) and p.get("host_port") in forwarded
            }
            st.ports = [
                {"container_port": c, "protocol": proto, "host_ip": "127.0.0.1", "host_port": h}
                for c, proto, h in sorted(ports)
            ]
        return states

    def logs(self, *, service: str | None = None, tail: int = 200, follow: bool = False) -> SerialLog:
        # the serial console is the VM's log (the app's containers log inside the guest)
        return SerialLog(self.workdir / "serial.log", tail=tail, follow=follow, alive=self.running)

    def stats(self) -> list[dict[str, Any]]:
        pid = self.pid()
        return [{"vm": "qemu", "pid": pid, "running": pid is not None}]

    def attestation(self, nonce: bytes) -> CvmAttestation:
        """The guest's quote over the node API's report_data for `nonce`, computed *in the guest*: the host
        sends only the nonce (never report_data)."""
        if not self.booted:
            raise InstanceStateError(f"CVM {self.instance_id} is not running: no attestation")
        status, body = self._agent("/attest", {"nonce": nonce.hex()})
        if status == 404:
            raise InstanceStateError("this guest image's agent serves no attestation (GET /attest)")
        try:
            doc = json.loads(body)
            return CvmAttestation(**{k: str(doc[k]) for k in CvmAttestation.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeFailed(f"the guest agent's attestation is malformed: {exc}") from None

    def post_vouch(self, statement: dict[str, Any]) -> None:
        """Hand the guest its node's signed statement (POST /node-vouch); RuntimeFailed if not taken."""
        if self.agent_port is None or not self.running():
            raise InstanceStateError(f"CVM {self.instance_id} is not running")
        try:
            with httpx.Client(timeout=10.0) as c:
                r = c.post(f"http://127.0.0.1:{self.agent_port}/node-vouch", json=statement)
        except httpx.HTTPError as exc:
            raise RuntimeFailed(f"the guest agent of CVM {self.instance_id} did not answer: {exc}") from exc
        if r.status_code != 204:
            raise RuntimeFailed(
                f"the guest of CVM {self.instance_id} refused the node statement: {r.text[:200]}"
            )

    def stop(self) -> None:
        """Power off: QMP `system_powerdown`, then `quit`, then SIGKILL, each after a grace period."""
        self._booted = False
        if self.vouch_renewer is not None:
            self.vouch_renewer.stop()
        power_off(self.workdir, f"CVM {self.instance_id}")

    def remove(self) -> list[str]:
        leftovers: list[str] = []
        try:
            self.stop()
        except RuntimeFailed as exc:
            leftovers.append(str(exc))
        # hda.img holds only LUKS ciphertext (the key never left the guest and the KMS): deleting it ends it
        try:
            shutil.rmtree(self.workdir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            leftovers.append(f"cannot delete the VM directory {self.workdir}: {exc}")
        return leftovers


PID_FORMAT = "teecloud-qemu-pid-v1"
_warned: set[tuple[str, bytes]] = set()  # pid records already warned about (vm_pid runs at every status)


def record_vm(workdir: Path, pid: int) -> bool:
    """Record the VM's QEMU `pid` in `workdir/qemu.pid` with its start time, executable and uid (one atomic
    write); False (and no record) when the process is already gone."""
    ident = process_identity(pid)
    if ident is None:
        (workdir / "qemu.pid").unlink(missing_ok=True)
        return False
    atomic_write(workdir / "qemu.pid", ident.to_json(PID_FORMAT))
    return True


def _warn_once(path: Path, data: bytes, message: str) -> None:
    if (str(path), data) not in _warned:
        if len(_warned) >= 4096:
            _warned.clear()
        _warned.add((str(path), data))
        log.warning("%s", message)


def read_vm_record(workdir: Path) -> ProcessIdentity | None:
    """The record of `workdir/qemu.pid` (None when there is none). A record that is not one `record_vm`
    writes, or an old one (a bare pid: written before review 11), names no VM: it is never adopted nor
    signalled, with a warning (the VM is booted anew; an old VM still running is the operator's to stop)."""
    path = workdir / "qemu.pid"
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECORD + 1)
    except OSError:
        return None
    try:
        return ProcessIdentity.from_json(data, PID_FORMAT)
    except RecordError as exc:
        text = data.strip()
        if text.isdigit() and len(text) < 10:
            why = (
                f"{path} is an old record (pid {int(text)} only, no start time, executable or uid): that "
                f"process is not adopted nor signalled and the VM boots anew; if pid {int(text)} is still "
                "this VM's QEMU, stop it by hand (kill) before the next boot"
            )
        else:
            why = (
                f"{path} is not a QEMU pid record ({exc}): the process it names is not adopted nor signalled"
            )
        _warn_once(path, data, why)
        return None


def _running_vm(workdir: Path) -> ProcessIdentity | None:
    """The record of the QEMU running the VM of `workdir`, only while the process it names is that very
    process (same start time and executable), runs as this node's user, and its command line names
    `workdir`: a reused pid, another user's process, or a record rewritten by a writer of the data
    directory naming another process is never taken for the VM (review 11, R11-3)."""
    rec = read_vm_record(workdir)
    if rec is None or not rec.matches(os.geteuid()):
        return None
    try:
        cmdline = Path(f"/proc/{rec.pid}/cmdline").read_bytes()
    except OSError:
        return None
    return rec if str(workdir).encode() in cmdline else None


def vm_pid(workdir: Path) -> int | None:
    """The pid of the QEMU running the VM of `workdir` (`_running_vm`), or None."""
    rec = _running_vm(workdir)
    return rec.pid if rec is not None else None


def power_off(workdir: Path, what: str) -> bool:
    """Power off the VM of `workdir` if it runs: QMP `system_powerdown`, then `quit`, then SIGKILL, each
    after STOP_GRACE_S. True if a VM was running; RuntimeFailed if it would not stop. The process is held
    by a pidfd opened before its identity is checked again, so every wait and the SIGKILL reach that
    process, never a later holder of its pid."""
    rec = _running_vm(workdir)
    if rec is None:
        return False
    try:
        pidfd = os.pidfd_open(rec.pid)
    except ProcessLookupError:
        return False
    except OSError as exc:  # no pidfd_open (Linux < 5.3): never a signal by a bare pid
        raise RuntimeFailed(f"cannot hold QEMU pid {rec.pid} of {what}: {exc.strerror or exc}") from None
    try:
        if not rec.matches(os.geteuid()):  # the pid was reused between the check and the open
            return False
        for command in ("system_powerdown", "quit"):
            with contextlib.suppress(OSError, ValueError):
                _qmp(workdir / "qmp.sock", command)
            if _wait_gone(rec.pid, pidfd, STOP_GRACE_S):
                break
        else:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            if not _wait_gone(rec.pid, pidfd, STOP_GRACE_S):
                raise RuntimeFailed(f"QEMU pid {rec.pid} of {what} did not stop")
    finally:
        os.close(pidfd)
    with contextlib.suppress(FileNotFoundError):
        (workdir / "qemu.pid").unlink()
    return True


def power_off_left_vms(home: Path | None = None) -> list[str]:
    """Power off every VM of this data directory's node still running (left by a `teecloud up` that was
    killed or detached with `teecloud down --keep-vms`): their work directories' names (instance id
    prefixes). A VM that would not stop raises RuntimeFailed after the others were tried."""
    root = node_home(home) / "vms"
    stopped: list[str] = []
    failed: list[str] = []
    for work in sorted(root.iterdir()) if root.is_dir() else []:
        if not work.is_dir():
            continue
        try:
            if power_off(work, f"VM {work.name}"):
                stopped.append(work.name)
        except RuntimeFailed as exc:
            failed.append(str(exc))
    if failed:
        raise RuntimeFailed("; ".join(failed))
    return stopped


def vouch_endpoints(containers: Sequence[ContainerState]) -> list[tuple[int, str, int]]:
    """What the node vouches for: each app port's host loopback forward, (app port, "127.0.0.1", host port),
    from the guest's containers as `QemuCvm.containers` reports them (only ports the host forwards), one per
    app port (the guest registers the same: teecloud.agent.vm_agent.gateway_endpoints)."""
    seen: dict[int, tuple[int, str, int]] = {}
    for st in containers:
        for p in st.ports:
            if p.get("protocol") == "tcp" and p.get("host_port") and int(p["container_port"]) not in seen:
                seen[int(p["container_port"])] = (int(p["container_port"]), "127.0.0.1", int(p["host_port"]))
    return [seen[k] for k in sorted(seen)]


class VouchRenewer:
    """Posts the node's fresh statement of a booted guest's forwarded ports now, then every `interval_s`
    until stopped or the VM is gone. A round that fails is logged and retried after VOUCH_RETRY_S."""

    def __init__(self, cvm: QemuCvm, vouch: VouchFn, *, interval_s: float = VOUCH_RENEW_S) -> None:
        self.cvm = cvm
        self.vouch = vouch
        self.interval_s = interval_s
        self.posted = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def post_once(self) -> bool:
        try:
            endpoints = vouch_endpoints(self.cvm.containers())
            if not endpoints:
                raise ValueError("the guest publishes no forwarded TCP port")
            self.cvm.post_vouch(self.vouch(self.cvm.instance_id, endpoints))
        except (InstanceStateError, RuntimeFailed, ValueError, OSError) as exc:
            self.last_error = str(exc)[:500]
            log.warning("CVM %s: node statement not posted: %s", self.cvm.instance_id, self.last_error)
            return False
        self.posted += 1
        self.last_error = None
        return True

    @property
    def active(self) -> bool:
        """Not stopped, and its thread (once started) still runs: it ends when the VM is gone."""
        return not self._stop.is_set() and (self._thread is None or self._thread.is_alive())

    def start(self) -> VouchRenewer:
        self.post_once()
        self._thread = threading.Thread(
            target=self._run, name=f"vouch-{self.cvm.instance_id[:8]}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._next_wait()) and self.cvm.running():
            try:
                self.post_once()
            except Exception as exc:  # the signer's own failure: logged, the renewal goes on
                self.last_error = f"{type(exc).__name__}: {str(exc)[:500]}"
                log.warning("CVM %s: node statement not posted: %s", self.cvm.instance_id, self.last_error)

    def _next_wait(self) -> float:
        return self.interval_s if self.last_error is None else min(self.interval_s, VOUCH_RETRY_S)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)


def _agent_port_of(pid: int) -> int | None:
    """The host loopback port QEMU `pid` forwards to the guest agent (its `hostfwd=tcp:127.0.0.1:P-:8090`,
    as launch wrote it), read from its command line; None if there is none."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    suffix = f"-:{AGENT_GUEST_PORT}".encode()
    for arg in argv:
        for part in arg.split(b","):
            if part.startswith(b"hostfwd=tcp:127.0.0.1:") and part.endswith(suffix):
                digits = part[len(b"hostfwd=tcp:127.0.0.1:") : -len(suffix)]
                if digits.isdigit() and 1 <= int(digits) <= 65535:
                    return int(digits)
    return None


def _guest_forwards_of(pid: int) -> set[tuple[str, int]] | None:
    """The (guest address, host port) of each `guestfwd` QEMU `pid` runs (as qemu_argv writes them: a relay
    to one host loopback port, GUESTFWD_RELAY), read from its command line; None if unreadable."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return guest_forwards_in(argv)


def guest_forwards_in(argv: Sequence[bytes]) -> set[tuple[str, int]]:
    """The (guest address, host port) of each `guestfwd` rule in a QEMU command line (qemu_argv's form)."""
    found: set[tuple[str, int]] = set()
    for arg in argv:
        for part in arg.split(b","):
            if not part.startswith(b"guestfwd=tcp:"):
                continue
            guest, _, relay = part[len(b"guestfwd=tcp:") :].partition(b"-cmd:")
            address = guest.rsplit(b":", 1)[0].decode("ascii", "replace")
            port = relay.rsplit(b":", 1)[-1]
            if port.isdigit() and 1 <= int(port) <= 65535:
                found.add((address, int(port)))
    return found


def _bounded_get(client: httpx.Client, url: str, params: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET `url`, reading at most MAX_AGENT_RESPONSE bytes: a guest cannot make the node buffer more."""
    with client.stream("GET", url, params=params) as r:
        body = bytearray()
        for chunk in r.iter_bytes():
            body += chunk
            if len(body) > MAX_AGENT_RESPONSE:
                raise RuntimeFailed(f"the guest agent's answer exceeds {MAX_AGENT_RESPONSE} bytes")
        return r.status_code, bytes(body)


def _qmp(sock_path: Path, command: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3.0)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        f.readline()  # the greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            f.readline()


def _wait_gone(pid: int, pidfd: int, timeout: float) -> bool:
    """Wait until the process of `pidfd` exits (its pidfd turns readable: pidfd_open(2)); a child of this
    process (a VM it launched) is reaped."""
    ready, _, _ = select.select([pidfd], [], [], timeout)
    if not ready:
        return False
    with contextlib.suppress(ChildProcessError):  # not our child (a re-attached VM): nothing to reap
        os.waitpid(pid, os.WNOHANG)
    return True


def _tail(path: Path, n: int = 20) -> str:
    try:
        return b"\n".join(path.read_bytes().splitlines()[-n:]).decode("utf-8", "replace")
    except OSError:
        return "(no serial log)"


class QemuBackend:
    """The `qemu` CvmBackend (see the module docstring)."""

    kind = "qemu"

    def __init__(self, config: QemuBackendConfig, *, home: Path | None = None) -> None:
        self.config = config
        self.root = node_home(home) / "vms"
        # the node-statement renewal of each booted VM, by instance id (`_renew`)
        self._renewers: dict[str, VouchRenewer] = {}
        self._renewers_lock = threading.Lock()
        self._stale_logged: set[tuple[str, int]] = set()  # VMs `attach` refused to adopt, logged once

    def check(self) -> None:
        if shutil.which("socat") is None:
            raise RuntimeUnavailable(
                "socat not found (Debian: apt-get install socat): it relays the guest's forwarded services"
            )
        for tool in (self.config.qemu, self.config.qemu_img):
            if shutil.which(tool) is None:
                raise RuntimeUnavailable(
                    f"{tool} not found (Debian: apt-get install qemu-system-x86 qemu-utils)"
                )
        if self.config.accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise RuntimeUnavailable("/dev/kvm is not available: use mode plain with accel tcg on this host")
        missing = tee_host_missing(self.config.mode, sysfs=self.config.sysfs, dev=self.config.dev)
        if missing:
            raise RuntimeUnavailable(
                f"mode {self.config.mode} needs a {self.config.mode} host; missing: " + "; ".join(missing)
            )
        check_passthrough_devices(
            (*self.config.gpus, *self.config.gpu_bridges), sysfs=self.config.sysfs, dev=self.config.dev
        )

    def check_images(self, refs: Sequence[str]) -> None:
        """Every image is in the host's Docker (the guest gets them through `docker save`)."""
        if self.config.docker is None or not refs:
            return
        missing = []
        for ref in refs:
            r = subprocess.run(
                [self.config.docker, "image", "inspect", "--format", "{{.Id}}", ref],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if r.returncode != 0:
                missing.append(ref)
        if missing:
            raise ComposeRejected(f"images not present on this node (docker save): {', '.join(missing)}")

    def describe(self) -> str:
        gpus = f", {len(self.config.gpus)} GPU(s)" if self.config.gpus else ""
        return f"qemu ({self.config.mode}, {self.config.accel}{gpus})"

    def workdir(self, inst: Instance) -> Path:
        return self.root / inst.instance_id[:16]  # short: the QMP socket path must fit sun_path

    def _gpus_for(self, inst: Instance) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The GPUs and bridges a CVM gets: the node's when its compose (measured: part of the compose hash)
        requires GPU attestation, else none."""
        if not self.config.gpus:
            return (), ()
        try:
            wanted = gpu_attestation_required(inst.app_compose())
        except AppComposeError as exc:
            raise ComposeRejected(str(exc)) from None
        return (self.config.gpus, self.config.gpu_bridges) if wanted else ((), ())

    def _check_gpus_free(self, inst: Instance, devices: Sequence[str]) -> None:
        """No other running VM of this node holds one of `devices` (read from the running QEMUs' command
        lines, so it holds across node restarts)."""
        if not devices or not self.root.is_dir():
            return
        mine = self.workdir(inst)
        for work in sorted(self.root.iterdir()):
            if work == mine or not work.is_dir():
                continue
            pid = QemuCvm(inst, work, agent_port=None, booted=False).pid()
            if pid is None:
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            held = [d for d in devices if any(a.startswith(f"vfio-pci,host={d},".encode()) for a in argv)]
            if held:
                raise InstanceStateError(
                    f"GPU {', '.join(held)} is held by the running VM {work.name}: one CVM at a time gets "
                    "this node's GPUs (stop that CVM first)"
                )

    def _vm_config(
        self,
        inst: Instance,
        limits: ResourceLimits,
        agent_port: int,
        guest_forwards: tuple[GuestForward, ...] = (),
    ) -> QemuVmConfig:
        cpus = max(1, round(limits.cpus)) if limits.cpus else 1
        # a VM needs its kernel's share: the deployment's memory, at least the smallest VM shape
        shape = VmShape(
            vcpus=cpus,
            memory_mb=max(MIN_VM_MEMORY_MB, limits.memory_mb or self.config.default_memory_mb),
            disk_gb=self.config.disk_gb,
        )
        ports: tuple[PortForward, ...] = (PortForward(host_port=agent_port, guest_port=AGENT_GUEST_PORT),)
        ports += tuple(PortForward(host_port=p, guest_port=p) for p in _published_ports(inst))
        # tdx: the app's identity in MRCONFIGID (dstack MrConfig V1), never on the measured command line
        mrconfigid = mrconfigid_v1(inst.compose_hash()) if self.config.mode == "tdx" else b""
        gpus, bridges = self._gpus_for(inst)
        return QemuVmConfig(
            mode=self.config.mode,
            image=self.config.image,
            shape=shape,
            workdir=self.workdir(inst),
            accel=self.config.accel,
            ports=ports,
            guest_forwards=guest_forwards,
            host_share=self.config.host_share,
            mrconfigid=mrconfigid,
            app_images=self.workdir(inst) / "app-images.tar" if self.config.docker is not None else None,
            gpus=gpus,
            gpu_bridges=bridges,
            pci_hole64_size=self.config.pci_hole64_size if gpus else 0,
            hotplug_off=self.config.hotplug_off and bool(gpus),
        )

    def launch(
        self, instance: Instance, limits: ResourceLimits, *, progress: Progress = lambda _p: None
    ) -> QemuCvm:
        t0 = time.perf_counter()
        progress("measuring")  # the guest measures itself; the host starts the VM
        agent_port = _free_port()
        sys_config, forwards = self._guest_sys_config(instance)
        cfg = self._vm_config(instance, limits, agent_port, forwards)
        # the passed-through GPUs, checked at every launch (a device may have been rebound since the start)
        check_passthrough_devices((*cfg.gpus, *cfg.gpu_bridges), sysfs=self.config.sysfs, dev=self.config.dev)
        self._check_gpus_free(instance, (*cfg.gpus, *cfg.gpu_bridges))
        work = cfg.workdir
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        cvm = QemuCvm(instance, work, agent_port=agent_port, booted=False)
        if cvm.running():
            # a VM left by an earlier node process (VMs outlive it): a boot is a fresh VM, as on docker
            log.warning(
                "CVM %s: powering off the VM a former node process left running", instance.instance_id
            )
            self._end_renewal(instance.instance_id)
            cvm.stop()
        sim = self.config.simulated_tee if self.config.mode == "plain" else None
        _write_shared(instance, cfg.shared_dir, simulated_tee=sim, sys_config=sys_config)
        if cfg.app_images is not None and self.config.docker is not None:
            _save_images(self.config.docker, _image_refs(instance), cfg.app_images)
        if not cfg.hda.exists():
            try:
                out = subprocess.run(
                    [
                        self.config.qemu_img,
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        str(cfg.hda),
                        f"{cfg.shape.disk_gb}G",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
            except OSError as exc:
                raise RuntimeUnavailable(
                    f"cannot run {self.config.qemu_img}: {exc.strerror or exc}"
                ) from None
            if out.returncode != 0:
                raise BootFailed("storage", f"qemu-img create failed: {out.stderr.strip()[:500]}")
        argv = qemu_argv(cfg, qemu=self.config.qemu)
        with (work / "qemu.log").open("wb") as qlog:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=qlog,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:  # no QEMU binary: the host's problem, named (not a traceback)
                raise RuntimeUnavailable(f"cannot start {self.config.qemu}: {exc.strerror or exc}") from None
        # its pid with its start time, executable and uid: what attach and power_off check (R11-3)
        if not record_vm(work, proc.pid) and proc.poll() is None:
            kill(proc)
            raise RuntimeFailed(f"cannot read the identity of QEMU pid {proc.pid} in /proc: stopped")
        deadline = time.monotonic() + self.config.agent_timeout_s
        try:
            info = self._wait_agent(cvm, proc, self.config.agent_timeout_s)
            agent_ready = time.perf_counter() - t0
            # the guest read the compose from the share itself: the hash it reports is the one it measured
            if info.get("compose_hash") != instance.compose_hash().hex():
                raise BootFailed("measuring", "the guest reports another compose hash than this instance's")
            info = self._follow_boot(cvm, proc, info, deadline, progress)
        except BaseException:
            with contextlib.suppress(RuntimeFailed):
                cvm.stop()
            raise
        cvm.guest_info = info
        cvm._booted = True
        cvm.timings = {"agent-ready": agent_ready, "app-running": time.perf_counter() - t0}
        cvm.dropped_env = [str(n) for n in info.get("dropped_env") or []][:256]
        self._renew(cvm)  # the guest waits for the statement before its first registration round
        return cvm

    def _guest_sys_config(self, inst: Instance) -> tuple[dict[str, Any], tuple[GuestForward, ...]]:
        """The instance's .sys-config.json as the guest gets it, and the guest forwards it needs."""
        try:
            doc = json.loads(inst.sys_config_path.read_bytes()) if inst.sys_config_path.is_file() else {}
        except ValueError as exc:
            raise BootFailed("keys", f"the instance's .sys-config.json is not JSON: {exc}") from None
        group = self.config.kms_group() if self.config.kms_group is not None else None
        ca = self.config.kms_ca_pubkey() if self.config.kms_ca_pubkey is not None and group is None else None
        gateway = self.config.gateway() if self.config.gateway is not None else None
        # the guest's TEE mode (teecloud.tee.guest reads it)
        doc = {**(doc if isinstance(doc, dict) else {}), "tee_mode": self.config.mode}
        if self.config.kms_urls is not None and group is None:
            doc["kms_urls"] = list(self.config.kms_urls())
        if self.config.vouch is not None and gateway is not None:
            doc["node_vouch"] = True  # the node posts its statement after boot: the guest waits for it
        return guest_services(doc, kms_ca_pubkey=ca, kms_group=group, gateway=gateway)

    def _follow_boot(
        self,
        cvm: QemuCvm,
        proc: subprocess.Popen[bytes],
        info: dict[str, Any],
        deadline: float,
        progress: Progress,
    ) -> dict[str, Any]:
        """Follow the guest's boot phases (GET /info) until `running`; `failed` is a BootFailed at the phase
        the guest names (KeysDenied at `keys`)."""
        reported = ""
        with httpx.Client(timeout=5.0) as client:
            while True:
                phase = str(info.get("phase", ""))
                if phase != reported and phase in BOOT_PHASES:
                    progress(phase)
                    reported = phase
                if phase == "running":
                    return info
                if phase == "failed":
                    error = str(info.get("error") or "no reason given")[:4000]
                    at = error.split(":", 1)[0]
                    if at == "keys":
                        raise KeysDenied(f"the guest: {error}")
                    raise BootFailed(at if at in BOOT_PHASES else "agent", f"the guest: {error}")
                if proc.poll() is not None:
                    raise BootFailed(reported or "agent", "QEMU exited: " + _tail(cvm.workdir / "serial.log"))
                if time.monotonic() > deadline:
                    raise BootFailed(
                        reported or "agent",
                        f"the guest did not finish booting within {self.config.agent_timeout_s:.0f} s; "
                        "serial log:\n" + _tail(cvm.workdir / "serial.log"),
                    )
                time.sleep(0.5)
                with contextlib.suppress(httpx.HTTPError, RuntimeFailed, ValueError):
                    status, body = _bounded_get(client, f"http://127.0.0.1:{cvm.agent_port}/info")
                    doc = json.loads(body) if status == 200 else None
                    if isinstance(doc, dict):
                        info = doc

    def _wait_agent(self, cvm: QemuCvm, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{cvm.agent_port}/info"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    qlog = _tail(cvm.workdir / "qemu.log", 5)
                    raise BootFailed(
                        "agent",
                        f"QEMU exited with code {proc.returncode}: {qlog}\nserial log:\n"
                        + _tail(cvm.workdir / "serial.log"),
                    )
                with contextlib.suppress(httpx.HTTPError, RuntimeFailed, ValueError):
                    status, body = _bounded_get(client, url)
                    doc = json.loads(body) if status == 200 else None
                    if isinstance(doc, dict):
                        return doc
                time.sleep(0.25)
        raise BootFailed(
            "agent",
            f"no guest agent answered within {timeout:.0f} s; serial log:\n"
            + _tail(cvm.workdir / "serial.log"),
        )

    def attach(self, instance: Instance) -> QemuCvm:
        """A handle on the instance's VM, which this process may not have launched (VMs outlive the node
        process). A VM that runs, whose QEMU forwards the agent's port and whose guest reports `running`
        with this instance's compose hash, is re-attached: its handle is booted (containers, attestation)
        and, with a vouch signer, carries the node's statements from now on (`_renew`: one renewal per
        VM, whichever handle started it). Else a handle that can list, log, stop and remove."""
        cvm = QemuCvm(instance, self.workdir(instance), agent_port=None, booted=False)
        pid = cvm.pid()
        port = _agent_port_of(pid) if pid is not None else None
        if pid is None or port is None:
            return cvm
        cvm.agent_port = port
        try:
            with httpx.Client(timeout=5.0) as client:
                status, body = _bounded_get(client, f"http://127.0.0.1:{port}/info")
            info = json.loads(body) if status == 200 else None
        except (httpx.HTTPError, RuntimeFailed, ValueError):
            info = None
        if (
            not isinstance(info, dict)
            or info.get("phase") != "running"
            or info.get("compose_hash") != instance.compose_hash().hex()
        ):
            return cvm  # not (yet) booted, or not this instance's guest: nothing to vouch for
        stale = self._stale_gateway_forwards(pid)
        if stale:
            if (instance.instance_id, pid) not in self._stale_logged:  # once per VM, not per status call
                self._stale_logged.add((instance.instance_id, pid))
                log.warning("CVM %s: not re-attached: %s", instance.instance_id, stale)
            return cvm  # a guest registering with no gateway of this node: booted afresh (resume)
        cvm.guest_info = info
        cvm._booted = True
        cvm.dropped_env = [str(n) for n in info.get("dropped_env") or []][:256]
        self._renew(cvm)
        return cvm

    def _stale_gateway_forwards(self, pid: int) -> str:
        """Why the running VM `pid` cannot be adopted as it is ("" if it can): a booted guest keeps using
        one host service, the gateway registration listeners its forwards name (it reaches the KMS during
        its boot only), so those forwards must name the ports the node's gateways listen on now."""
        gateway = self.config.gateway() if self.config.gateway is not None else None
        try:
            _, wanted = guest_services({}, gateway=gateway)
        except BootFailed as exc:
            return str(exc)
        running = _guest_forwards_of(pid)
        if running is None:
            return "its QEMU command line is unreadable"
        want = {(f.guest_address, f.host_port) for f in wanted}
        have = {f for f in running if f[0] in GATEWAY_GUEST_ADDRESSES}
        if want == have:
            return ""
        ports = ", ".join(str(p) for _, p in sorted(have)) or "none"
        now = ", ".join(str(p) for _, p in sorted(want)) or "none (no gateway runs)"
        return f"its guest registers with gateway port(s) {ports} on 127.0.0.1, the gateway listens on {now}"

    def release(self) -> None:
        """End this process's statement renewals and leave the VMs running (the node process stops without
        powering them off: `teecloud down --keep-vms`); a later node re-attaches them (`attach`)."""
        with self._renewers_lock:
            renewers, self._renewers = list(self._renewers.values()), {}
        for renewer in renewers:
            renewer.stop()

    def _renew(self, cvm: QemuCvm) -> None:
        """Start the node's statements for a booted VM (with a vouch signer), or hand `cvm` the renewal
        that already runs for that VM: never two renewals for one CVM. A renewal for an earlier VM of the
        instance (another agent port) is stopped first."""
        if self.config.vouch is None:
            return
        with self._renewers_lock:
            current = self._renewers.get(cvm.instance_id)
            if current is not None and current.active and current.cvm.agent_port == cvm.agent_port:
                cvm.vouch_renewer = current
                return
            if current is not None:
                current.stop()
            renewer = self._renewers[cvm.instance_id] = VouchRenewer(cvm, self.config.vouch)
            cvm.vouch_renewer = renewer
        renewer.start()  # its first post goes to the guest at once (outside the lock: an HTTP call)

    def _end_renewal(self, instance_id: str) -> None:
        with self._renewers_lock:
            renewer = self._renewers.pop(instance_id, None)
        if renewer is not None:
            renewer.stop()


def _image_refs(inst: Instance) -> list[str]:
    import yaml

    from teecloud.node.compose import image_refs

    text = inst.app_compose().get("docker_compose_file") or ""
    doc = yaml.safe_load(text) if isinstance(text, str) else None
    return image_refs(doc) if isinstance(doc, dict) else []


def _published_ports(inst: Instance) -> list[int]:
    """The host ports the app publishes (compose `ports:` short "H:C" / "IP:H:C" or long `published`): in
    the VM, Docker publishes them on the guest's port H, which the host forwards from loopback."""
    import yaml

    try:
        text = inst.app_compose().get("docker_compose_file") or ""
        doc = yaml.safe_load(text) if isinstance(text, str) else None
    except (OSError, ValueError, yaml.YAMLError):
        return []
    ports: set[int] = set()
    services = doc.get("services") if isinstance(doc, dict) else None
    for svc in (services or {}).values():
        for p in (svc or {}).get("ports") or [] if isinstance(svc, dict) else []:
            value: Any = p.get("published") if isinstance(p, dict) else str(p).split("/")[0].split(":")
            if isinstance(value, list):
                value = value[-2] if len(value) >= 2 else None
            with contextlib.suppress(TypeError, ValueError):
                port = int(value)
                if 1 <= port <= 65535:
                    ports.add(port)
    return sorted(ports)[:64]
