"""The composition root of the local cloud behind `teecloud up` — the one place that builds the real
parts in one process: embedded chain (served over JSON-RPC), one KMS, one
worker node, all on 127.0.0.1, all state under data_home().

Start-up procedure (`LocalCloud.start`), every step idempotent so a restart loses nothing:
  (1) prerequisites: Docker engine + Compose, gocryptfs, FUSE (each missing item named with its install hint)
  (2) chain: open the embedded chain (state replayed from its journal), serve it on 127.0.0.1, deploy
      teecloud's contracts once
  (3) KMS: boot its simulated TEE (measured), unseal its root keys (generated on first start), publish on
      chain what it takes to trust it (OS image, KMS measurement and device, root public keys), listen;
      with kms_nodes > 1: one `teecloud kms up --threshold-node I` process per node (own data directory and
      sealed share; on the first start a dealerless DKG between processes), and a ThresholdKeyProvider
  (4) node: a KMS client that verifies the KMS's RA-TLS certificate (dev root, chain's isKmsAllowed),
      registration in NodeRegistry (once), the node API
  (4b) gateway: HAProxy and the dev CA; each CVM registered with its boot-time certificate (docs/gateway.md)
  (4c) CVMs: on qemu, each VM an earlier `up` left running booted is adopted without a reboot
      (`Node.reattach`); every other CVM that should run boots again (`Node.resume`)
  (5) endpoints.json records where everything listens (the CLI reads it)

Ports: the KMS and the gateway listen on the ports the previous start of this data directory used (recorded
in cloud/ports.json after each start), so that the guests of VMs that outlived it reach them where their
QEMU forwards point: a recorded port that is taken is logged and a new one used; a VM whose guest then
registers with no gateway of this start is not adopted but booted afresh (`QemuBackend.attach`).

With an external KMS (`kms_urls`, `teecloud up --kms-url URL --kms-chain RPC`), steps (2) and (3) start
nothing: (2') the chain is the KMS's (its contracts as its operator recorded them, `kms_contracts`, adopted
into this data directory; never deployed anew: a second KmsAuth would be one the KMS does not read);
(3') one URL is one KMS, checked now by its RA-TLS certificate (evidence, KmsAuth.isKmsAllowed) and its root
key; several URLs are a threshold group: the committee KmsGroup records as serving exactly those URLs (its
t, commitments, signing key: the chain's, never this side's say-so), each node checked as one KMS is, at
least t of them passing. The node, the gateway and the guests then use it as they use a KMS started here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from teecloud._fs import atomic_write, atomic_write_json, data_home
from teecloud._procid import process_start_time
from teecloud.cloud.endpoints import CloudEndpoints, endpoints_path, read_endpoints
from teecloud.node.errors import NodeError, RuntimeUnavailable

__all__ = ["CloudEndpoints", "LocalCloud", "check_prerequisites", "endpoints_path", "read_endpoints"]

log = logging.getLogger("teecloud.devstack")

GATEWAY_BASE_DOMAIN = "teecloud.localhost"  # curl and browsers resolve *.localhost to loopback


def check_prerequisites() -> list[str]:
    """Everything missing for `teecloud up`, each with how to fix it."""
    from teecloud.agent.storage import check_prerequisites as storage_prereqs
    from teecloud.node.runtime.docker import DockerRuntime

    missing: list[str] = []
    try:
        DockerRuntime().check()
    except RuntimeUnavailable as exc:
        missing.append(str(exc))
    missing.extend(storage_prereqs())
    import shutil

    if shutil.which("busybox") is None:
        missing.append("busybox is missing (passes env vars into containers): apt-get install busybox-static")
    return missing


def _dns_server(value: str, what: str = "gateway DNS server") -> tuple[str, int]:
    """`host:port` (IPv6 in brackets; port 53 if omitted) of a DNS server, as an IP literal."""
    from teecloud.gateway.acme import parse_dns_server
    from teecloud.gateway.errors import GatewayUsageError

    try:
        return parse_dns_server(value, what)
    except GatewayUsageError as exc:
        raise NodeError(str(exc)) from exc


# --- up reattach: the ports of the KMS and the gateway, kept across restarts of `teecloud up`
PORTS_FILE = "ports.json"  # <data dir>/cloud/ports.json
PORTS_VERSION = 1
MAX_PORTS_FILE = 4096  # bytes: the record is a handful of numbers
PORT_NAMES = ("kms", "gateway_public", "gateway_registration", "gateway_admin")
PORT_WAIT_S = 5.0  # a killed `up`'s HAProxy lets go of its port once it sees its parent gone


def ports_path(home: Path | None = None) -> Path:
    return (Path(home) if home is not None else data_home()) / "cloud" / PORTS_FILE


def read_ports(home: Path | None = None) -> dict[str, int]:
    """The ports the last start of this data directory listened on, by PORT_NAMES ({} if none recorded;
    0: that service did not run or is not this cloud's). A record that is not one `write_ports` writes is a
    NodeError naming the file and what is wrong."""
    path = ports_path(home)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PORTS_FILE + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise NodeError(f"the port record {path} is unreadable: {exc}") from exc
    if len(raw) > MAX_PORTS_FILE:
        raise NodeError(f"the port record {path} is larger than {MAX_PORTS_FILE} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise NodeError(f"the port record {path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != PORTS_VERSION:
        raise NodeError(f"the port record {path} is not a version {PORTS_VERSION} record")
    ports = {k: v for k, v in doc.items() if k != "version"}
    if set(ports) != set(PORT_NAMES):
        raise NodeError(f"the port record {path} names {sorted(ports)}, not {list(PORT_NAMES)}")
    for name, port in ports.items():
        if type(port) is not int or not 0 <= port <= 65535:
            raise NodeError(f"the port record {path}: {name} is not a port number ({str(port)[:20]!r})")
    return ports


def write_ports(ports: dict[str, int], home: Path | None = None) -> None:
    """Record the ports this start listens on (atomically: a crash leaves the old record or the new one)."""
    bad = [p for p in ports.values() if type(p) is not int or not 0 <= p <= 65535]
    if set(ports) != set(PORT_NAMES) or bad:
        raise ValueError(f"a port record has exactly {list(PORT_NAMES)}, each 0..65535")
    atomic_write_json(ports_path(home), {"version": PORTS_VERSION, **ports}, mode=0o644)


def recorded_ports(home: Path | None = None) -> dict[str, int]:
    """What `up` starts from: the record (read_ports), or {} with a warning when it is unusable."""
    try:
        return read_ports(home)
    except NodeError as exc:
        log.warning("%s: ignored (new ports; qemu CVMs left running are booted afresh)", exc)
        return {}


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind `port` now (as the servers bind: SO_REUSEADDR, so only a listening
    socket, not a closed connection's TIME_WAIT, holds it)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _url_port(url: str) -> int:
    from urllib.parse import urlsplit

    return int(urlsplit(url).port or 0)


def claim_port(recorded: int, what: str, *, wait_s: float = PORT_WAIT_S) -> int:
    """`recorded` if it is free (waiting up to `wait_s` for it), else 0 (a new port) with a warning that
    says so; 0 stays 0."""
    if not recorded:
        return 0
    deadline = time.monotonic() + wait_s
    while not port_free(recorded):
        if time.monotonic() >= deadline:
            log.warning(
                "the %s's recorded port %d (%s) is taken: it listens on a new port; qemu CVMs left running "
                "whose guests use it are booted afresh",
                what,
                recorded,
                PORTS_FILE,
            )
            return 0
        time.sleep(0.2)
    return recorded


# --- end up reattach

MAX_KMS_URLS = 16  # as many as a threshold group has nodes here (kms_nodes)
MAX_URL_CHARS = 2048


def external_kms_urls(urls: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`--kms-url` values, checked: at most MAX_KMS_URLS https URLs (RA-TLS) of a host and no path, query or
    credentials, each once; normalized without a trailing slash (as KmsGroup records node URLs)."""
    import httpx

    if len(urls) > MAX_KMS_URLS:
        raise NodeError(f"at most {MAX_KMS_URLS} --kms-url")
    out: list[str] = []
    for raw in urls:
        shown = repr(raw[:80])
        if len(raw) > MAX_URL_CHARS:
            raise NodeError(f"--kms-url {shown}...: longer than {MAX_URL_CHARS} characters")
        try:
            url = httpx.URL(raw)
        except (httpx.InvalidURL, ValueError) as exc:
            raise NodeError(f"--kms-url {shown}: not a URL ({exc})") from exc
        if url.scheme != "https" or not url.host:
            raise NodeError(f"--kms-url {shown}: an https://HOST[:PORT] URL (the KMS speaks RA-TLS)")
        if url.userinfo or url.query or url.fragment or url.path not in ("", "/"):
            raise NodeError(f"--kms-url {shown}: only https://HOST[:PORT] (no path, query or credentials)")
        norm = raw.rstrip("/")
        if norm in out:
            raise NodeError(f"--kms-url {shown} is given twice")
        out.append(norm)
    return tuple(out)


def _stop_process(proc: Any) -> None:
    """Stop a child this cloud started (by its handle): SIGTERM, then SIGKILL after 20 s."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class LocalCloud:
    def __init__(
        self,
        home: Path | None = None,
        *,
        chain_port: int = 0,
        kms_port: int = 0,
        node_port: int = 0,
        dev_time_travel: bool = False,
        kms_nodes: int = 1,
        kms_threshold: int = 1,
        gateway_dns: str | None = None,
        gateway_passthrough_port: int = 0,
        gpus: str = "none",
        gpu_roots: list[Path] | None = None,
        gpu_collateral: Path | None = None,
        kms_require_app_compose: bool = False,
        acme_directory: str | None = None,
        acme_dns: str = "127.0.0.1:53",
        acme_dns_server: str | None = None,
        acme_tsig_key_file: Path | None = None,
        acme_ca_file: Path | None = None,
        acme_email: str | None = None,
        backend: str = "docker",
        qemu_image: Path | None = None,
        qemu_accel: str = "tcg",
        qemu_mode: str = "plain",
        qemu_gpus: tuple[str, ...] = (),
        kms_urls: tuple[str, ...] = (),
        kms_chain: str | None = None,
        kms_contracts: Path | None = None,
    ):
        # "host:port" of the DNS server the gateway asks for custom domains' TXT records (None: no custom
        # domains); checked here so a typo fails before anything starts
        self.gateway_dns = _dns_server(gateway_dns) if gateway_dns else None
        if not 0 <= gateway_passthrough_port <= 65535:
            raise NodeError("--passthrough-port must be a port in 1..65535 (0: the public port)")
        self.gateway_passthrough_port = gateway_passthrough_port  # `s` names on their own port (0: public)
        # --- gateway ACME: the base domain's wildcard by ACME DNS-01 (docs/gateway.md, "Certificates"); the
        # challenge DNS server (dnslib) listens at acme_dns, the address the CA resolves the names with; the
        # options are parsed as `teecloud gateway up` parses them (AcmeSettings.parse)
        from teecloud.gateway.acme import AcmeSettings
        from teecloud.gateway.errors import GatewayUsageError

        try:
            self.acme = (
                AcmeSettings.parse(
                    acme_directory,
                    acme_dns,
                    acme_ca_file,
                    acme_email,
                    dns_server=acme_dns_server,
                    tsig_key_file=acme_tsig_key_file,
                )
                if acme_directory
                else None
            )
        except GatewayUsageError as exc:
            raise NodeError(str(exc)) from exc
        self.acme_directory = self.acme.directory_url if self.acme is not None else None
        # --- end gateway ACME
        self.home = Path(home) if home is not None else data_home()
        # --- qemu backend: the node's CVM backend (docker, or qemu: one VM per CVM, mode plain here)
        from teecloud.node.runtime import BACKENDS

        if backend not in BACKENDS:
            raise NodeError(f"unknown CVM backend {backend!r} (one of: {', '.join(BACKENDS)})")
        self.backend_kind = backend
        self.qemu_image = Path(qemu_image) if qemu_image is not None else None
        if qemu_accel not in ("kvm", "tcg"):
            raise NodeError(f"--qemu-accel is kvm or tcg, not {qemu_accel!r}")
        self.qemu_accel = qemu_accel
        # mode tdx / sev-snp and GPUs: QemuBackendConfig refuses what no launch could use; a tdx / sev-snp
        # guest verifies its KMS under the vendor's root, so it refuses this cloud's simulated KMS (fail
        # closed at key release); `teecloud up` refuses those modes before starting unless an external KMS
        # is given (kms_urls; docs/node.md)
        self.qemu_mode = qemu_mode
        self.qemu_gpus = tuple(qemu_gpus)
        # --- end qemu backend
        self.ports = (chain_port, kms_port, node_port)
        self.dev_time_travel = dev_time_travel  # serve evm_increaseTime/evm_mine on the chain's RPC
        if not 1 <= kms_threshold <= kms_nodes <= 16:
            raise NodeError("need 1 <= KMS threshold <= KMS nodes <= 16")
        self.kms_nodes, self.kms_threshold = kms_nodes, kms_threshold
        # --- external KMS: the KMS (one URL) or threshold group (several) this cloud uses instead of starting
        # one, on the chain it trusts (kms_chain: its JSON-RPC URL), whose contracts kms_contracts records
        self.kms_urls = external_kms_urls(kms_urls)
        if self.kms_urls:
            if not kms_chain:
                raise NodeError("an external KMS (--kms-url) needs the chain it trusts (--kms-chain RPC_URL)")
            if kms_nodes != 1 or kms_threshold != 1 or kms_port or chain_port or dev_time_travel:
                raise NodeError(
                    "with an external KMS (--kms-url) this cloud starts no KMS and no chain: --kms-nodes, "
                    "--threshold, --kms-port, --chain-port and --dev-time-travel do not apply"
                )
            if kms_require_app_compose:
                raise NodeError("--kms-require-app-compose is the external KMS's own setting (kms up)")
        elif kms_chain or kms_contracts is not None:
            raise NodeError("--kms-chain and --kms-contracts go with --kms-url (an external KMS)")
        self.kms_chain = kms_chain
        self.kms_contracts = Path(kms_contracts) if kms_contracts is not None else None
        # --- end external KMS
        from teecloud.node.gpus import parse_gpu_setting

        self.gpus = parse_gpu_setting(gpus)  # the node's GPUs (teecloud.node.gpus): none, simulated[:N], nvml
        self.gpu_roots = list(gpu_roots or [])  # with nvml: the trusted GPU device roots (PEM files)
        self.gpu_collateral = gpu_collateral  # offline NVIDIA collateral (OCSP answers, RIMs) for the gate
        # the KMS refuses a key request that does not send the CVM's measured app-compose (docs/ai.md)
        self.kms_require_app_compose = kms_require_app_compose
        self.kms_processes: dict[int, Any] = {}  # threshold mode: KMS node index -> its process
        # threshold mode: how the supervisor keeps presignature pools filled (kms.threshold_net.RefillPolicy;
        # None: PRESIGN_LOW / PRESIGN_BATCH) and the loop doing it while the cloud runs
        self.presign_policy: Any = None
        self.presign_refiller: Any = None
        self._stack = contextlib.ExitStack()
        self.endpoints: CloudEndpoints | None = None
        self.node: Any = None
        self.key_provider: Any = None
        self.chain: Any = None
        self.gateway: Any = None  # the GatewayServer (None without HAProxy)
        self.voucher: Any = None  # the node's NodeVoucher, once the gateway runs (qemu guests' statements)
        self.gateway_app_id = ""  # KmsAuth's gateway_app_id (teecloud.gateway.identity)
        self.gateway_boot: Any = None  # the gateway TEE's boot as that app (AgentState)
        self.timings: dict[str, float] = {}
        # --- up reattach: the ports of the last start (read_ports), the CVMs adopted without a reboot, and
        # whether stop leaves the qemu VMs running (`teecloud down --keep-vms`)
        self.recorded_ports: dict[str, int] = {}
        self.reattached: list[str] = []
        self.keep_vms = False
        # --- end up reattach

    def start(self, *, check: bool = True, resume: bool = True) -> CloudEndpoints:
        try:
            return self._start(check=check, resume=resume)
        except BaseException:
            self.stop()
            raise

    def _start(self, *, check: bool, resume: bool) -> CloudEndpoints:
        t = time.perf_counter()

        def mark(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            self.timings[name] = now - t
            t = now

        # (1)
        if check:
            missing = check_prerequisites()
            if missing:
                raise RuntimeUnavailable("missing prerequisites:\n  - " + "\n  - ".join(missing))
        mark("prerequisites")

        # ports: the last start's (unless given), where the guests of VMs it left running reach them
        self.recorded_ports = recorded_ports(self.home)
        # (2)
        from teecloud.chain.client import ChainClient, HttpTransport
        from teecloud.chain.embedded import DEV_KEYS, EmbeddedChain
        from teecloud.chain.rpcserver import ChainRpcServer

        if self.kms_urls:  # (2') the external KMS's chain
            chain, contracts = self._external_chain()
            rpc_url = str(self.kms_chain)
        else:
            embedded = EmbeddedChain(self.home / "chain")
            self._stack.callback(embedded.close)
            rpc = ChainRpcServer(embedded, port=self.ports[0], time_travel=self.dev_time_travel).start()
            self._stack.callback(rpc.stop)
            rpc_url = rpc.url
            chain = ChainClient(
                HttpTransport(rpc.url), DEV_KEYS[0], home=self.home, label=f"embedded via {rpc.url}"
            )
            contracts = chain.deploy()
        self.chain = chain
        mark("chain")

        # (3)
        from teecloud.kms.launcher import KmsLaunch, launch_kms
        from teecloud.peer import StaticCollateral
        from teecloud.tee.simulated import SimulatedTdx, simulated_os_image_reference

        kms_tee = SimulatedTdx(self.home)
        # --- gateway certificates: the gateway's app, recorded as KmsAuth's gateway_app_id (docs/gateway.md)
        from teecloud.chain.errors import ChainError
        from teecloud.gateway.identity import register_gateway_app

        try:
            self.gateway_app_id = register_gateway_app(chain)
        except ChainError as exc:
            if not self.kms_urls:
                raise
            # an external KMS's chain where this signer may not record it: the gateway gets no keys
            log.warning("no gateway app on the KMS's chain (the gateway will not start): %s", exc)

        def publish(keys: Any, identity: Any, _created: bool) -> str:
            self._publish_kms(chain, kms_tee, identity, keys)
            return ""

        threshold_provider: Any = None
        external: Any = None
        if self.kms_urls:  # (3') checked on its chain before use; nothing started here
            kms_url, kms_admin_url, external = self._external_kms(chain)
        elif self.kms_nodes > 1:
            kms_url, kms_admin_url, threshold_provider = self._start_threshold_kms(chain, rpc_url, kms_tee)
        else:
            running = launch_kms(
                KmsLaunch(
                    tee=kms_tee,
                    chain=chain,
                    collateral=StaticCollateral(kms_tee.collateral),
                    dev=True,
                    home=self.home,
                    os_image_reference=simulated_os_image_reference,
                    port=self.ports[1] or claim_port(self.recorded_ports.get("kms", 0), "KMS"),
                    kms_contract=str(contracts.get("KmsAuth", "")),
                    gateway_app_id=self.gateway_app_id,
                    on_keys=publish,
                    require_app_compose=self.kms_require_app_compose,
                )
            )
            if running.publish_error:
                raise NodeError(f"could not publish the KMS to KmsAuth: {running.publish_error}")
            self._stack.callback(running.server.stop)
            kms_url, kms_admin_url = running.server.url, running.server.admin_url
        mark("kms")

        # (4)
        from teecloud.gateway.client import RegisteringAtBoot
        from teecloud.kms.client import connect_kms
        from teecloud.node.gpus import gpu_gate_for
        from teecloud.node.registry import ensure_registered
        from teecloud.node.service import Node, NodeServer, load_or_create_token

        platform = SimulatedTdx(self.home)
        key_provider = (
            threshold_provider
            or external
            or connect_kms(
                kms_url,
                collateral_for=lambda _quote, _now: platform.collateral(),
                dev_root_der=platform.dev_root_der(),
                chain=chain,
            )
        )
        self.key_provider = key_provider  # the KMS side of every boot (one KMS, or the threshold client)
        node_id = ensure_registered(chain, platform, home=self.home)
        # Each CVM makes its gateway registration certificate at its boot key request (teecloud.gateway).
        boots = RegisteringAtBoot(key_provider)
        node = Node(
            backend=self._qemu_backend(key_provider, kms_url) if self.backend_kind == "qemu" else None,
            key_provider=boots,
            tee_factory=lambda: SimulatedTdx(self.home),
            home=self.home,
            kms_urls=[kms_url],
            node_id=node_id,
            launcher=str(chain.address).lower(),  # instance ids commit to it: the node vouches (gateway)
            gpu_gate=gpu_gate_for(
                self.gpus, self.home, nvidia_roots=self.gpu_roots, collateral_dir=self.gpu_collateral
            ),
        )
        self.node = node
        self._stack.callback(self._close_node)
        token = load_or_create_token(self.home)
        server = NodeServer(node, token=token, port=self.ports[2]).start()
        self._stack.callback(server.stop)
        mark("node")

        # (4b) --- gateway: HAProxy + dev CA (https://<app_id>-<port>.teecloud.localhost:<port>/), CVMs
        # registered over mutual RA-TLS with their boot-time certificates; skipped if HAProxy is missing
        gateway_info = self._start_gateway(chain, platform, boots, node)
        mark("gateway")

        # (4c) the ports of this start, then the CVMs: a VM left running booted, whose guest registers with
        # this gateway, is adopted (qemu: Node.reattach); every other CVM that should run boots (resume)
        write_ports(
            {
                "kms": _url_port(kms_url) if not self.kms_urls and self.kms_nodes == 1 else 0,
                "gateway_public": int(gateway_info.get("public_port", 0)),
                "gateway_registration": self.gateway.registration_port if self.gateway is not None else 0,
                "gateway_admin": self.gateway.admin_port if self.gateway is not None else 0,
            },
            self.home,
        )
        if resume:
            if self.backend_kind == "qemu":
                self.reattached = node.reattach()
                if self.reattached:
                    log.info("%d CVM(s) re-attached without a reboot", len(self.reattached))
            node.resume()
        mark("cvms")

        # (5)
        from teecloud.node.instance import node_home

        self.endpoints = CloudEndpoints(
            chain_rpc=rpc_url,
            kms=kms_url,
            kms_admin=kms_admin_url,
            node=server.url,
            pid=os.getpid(),
            pid_start_time=process_start_time(os.getpid()),
            node_token_file=str(node_home(self.home) / "admin-token"),
            contracts={k: v for k, v in contracts.items() if isinstance(v, str | int)},
            gateway=gateway_info,
        )
        atomic_write_json(endpoints_path(self.home), self.endpoints.__dict__, mode=0o644)
        self._stack.callback(lambda: endpoints_path(self.home).unlink(missing_ok=True))
        return self.endpoints

    def _close_node(self) -> None:
        """Stop the node: its CVMs are powered off, unless `keep_vms` (qemu only: a VM runs without this
        process; a docker CVM's guest half lives in it, so those stop either way): then only this process's
        statement renewals end, and the next start adopts the VMs."""
        if self.node is None:
            return
        if self.keep_vms and self.backend_kind == "qemu":
            self.node.backend.release()
            log.info("the node stops; its VMs run on (the next `teecloud up` re-attaches them)")
            return
        self.node.close()

    def _qemu_backend(self, key_provider: Any, kms_url: str | None = None) -> Any:
        """--backend qemu: one VM per CVM in qemu_mode (plain: TCG, or KVM with qemu_accel) with qemu_gpus,
        the image of `teecloud image build` (built, or found in its cache, now), the guest's simulated TEE
        sharing this installation's state; what the guest trusts and reaches: the KMS root key as this node's
        KMS client verified it on chain, or (threshold) the group and committee as the chain records them;
        the gateway's registration listener and CA once the gateway runs."""
        from teecloud.image.build import build_image, guest_image_fields
        from teecloud.kms.threshold_client import ThresholdKeyProvider
        from teecloud.node.runtime import make_backend
        from teecloud.node.runtime.qemu import QemuBackendConfig
        from teecloud.node.runtime.qemu_cmdline import GuestImage
        from teecloud.tee.simulated import SimulatedTdx

        path = self.qemu_image or build_image(log=lambda m: log.info("image build: %s", m)).path
        image = GuestImage(**guest_image_fields(path))  # type: ignore[arg-type]
        kvm = self.qemu_accel == "kvm"
        config = QemuBackendConfig(
            image=image,
            mode=self.qemu_mode,  # type: ignore[arg-type]  # QemuBackendConfig checks it
            accel="kvm" if kvm else "tcg",
            gpus=self.qemu_gpus,
            host_share="vvfat",  # the image's kernel (Debian's cloud kernel) has no 9p
            agent_timeout_s=180.0 if kvm else 900.0,
            simulated_tee=self.home / "simulated-tee",
            kms_ca_pubkey=lambda: str(key_provider.info()["id"]),
            # a guest booting now reaches the KMS where it listens now (not where it did at deploy)
            kms_urls=(lambda: [str(kms_url)])
            if kms_url and self.kms_nodes == 1 and not self.kms_urls
            else None,
            kms_group=(
                self._guest_kms_group(key_provider)
                if isinstance(key_provider, ThresholdKeyProvider)
                else None
            ),
            gateway=self._guest_gateway,
            vouch=self._guest_vouch,
        )
        return make_backend(
            "qemu",
            key_provider=key_provider,
            guest_tee_factory=lambda: SimulatedTdx(self.home),  # unused: each guest has its own TEE
            config=config,
            home=self.home,
        )

    def _external_chain(self) -> tuple[Any, dict[str, Any]]:
        """(2'): the external KMS's chain and teecloud's contracts on it: the entry for this chain in
        `kms_contracts` (a `chain/deployment.json` of the KMS's operator, or one entry of it) adopted into
        this data directory's deployment record, each address holding code; without it, the record this
        data directory already has for that chain (the same TEECLOUD_HOME as `teecloud chain up`). The
        signer is the dev key: a development chain (on any other chain the node's and deploy's
        transactions have no funded signer; not done)."""
        from teecloud.chain.client import ChainClient, HttpTransport
        from teecloud.chain.embedded import DEV_KEYS
        from teecloud.chain.errors import ChainError

        url = str(self.kms_chain)
        try:
            chain = ChainClient(
                HttpTransport(url), DEV_KEYS[0], home=self.home, label=f"the KMS's chain {url}"
            )
        except (ChainError, OSError, ValueError, KeyError, TypeError) as exc:
            raise NodeError(f"--kms-chain {url}: not a reachable JSON-RPC chain ({exc})") from exc
        if self.kms_contracts is not None:
            self._adopt_contracts(chain, self.kms_contracts)
        try:
            contracts = chain.deployment
        except ChainError as exc:
            raise NodeError(f"--kms-chain {url}: {exc}") from exc
        missing = [n for n in DEPLOYMENT_NAMES if not contracts.get(n)]
        if missing:
            raise NodeError(
                f"teecloud's contracts on {url} are not recorded in {self.home / 'chain' / 'deployment.json'}"
                f" (missing {', '.join(missing)}): pass --kms-contracts FILE, the KMS operator's "
                "chain/deployment.json"
            )
        return chain, contracts

    def _adopt_contracts(self, chain: Any, path: Path) -> None:
        """Record `path`'s addresses for `chain` in this data directory (ChainClient.deployment reads them),
        after checking each one is an address holding code on that chain."""
        from teecloud.chain.errors import ChainError

        try:
            if path.stat().st_size > 1 << 20:
                raise NodeError(f"--kms-contracts {path}: larger than 1 MiB")
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise NodeError(f"--kms-contracts {path}: unreadable ({exc})") from exc
        entry = data.get(chain.chain_key) if isinstance(data, dict) and "KmsAuth" not in data else data
        if not isinstance(entry, dict):
            raise NodeError(f"--kms-contracts {path} records no contracts for chain {chain.chain_key}")
        adopted: dict[str, Any] = {}
        for name in DEPLOYMENT_NAMES:
            addr = entry.get(name)
            if not isinstance(addr, str) or len(addr) != 42 or not addr.startswith("0x"):
                raise NodeError(f"--kms-contracts {path}: {name} is not a 0x-address")
            try:
                bytes.fromhex(addr[2:])
                has_code = bool(chain.code(addr))
            except (ValueError, ChainError) as exc:
                raise NodeError(f"--kms-contracts {path}: {name} {addr}: {exc}") from exc
            if not has_code:
                raise NodeError(f"--kms-contracts {path}: no contract at {name} {addr} on {chain.label}")
            adopted[name] = addr
        adopted["chain_id"] = chain.chain_id
        record = self.home / "chain" / "deployment.json"  # ChainClient's record (chain/client.py)
        try:
            current = json.loads(record.read_text()) if record.is_file() else {}
        except (OSError, ValueError) as exc:
            raise NodeError(f"{record} is unreadable: {exc}") from exc
        current = current if isinstance(current, dict) else {}
        current[chain.chain_key] = adopted
        atomic_write_json(record, current, mode=0o644)

    def _external_kms(self, chain: Any) -> tuple[str, str, Any]:
        """(3'): the external KMS as a key provider, checked on `chain` before use: one URL, a KmsClient whose
        RA-TLS certificate passes the evidence check and KmsAuth.isKmsAllowed now (and whose root key it
        reads); several, the threshold group KmsGroup records as serving exactly those URLs (the lowest such
        root epoch; newer ones it also serves there for the apps that opt in), with at least t nodes passing
        the same check. Returns (the first URL, "" (no admin API of it here), the provider)."""
        from teecloud.chain.errors import ChainError
        from teecloud.kms.client import connect_kms
        from teecloud.kms.errors import KmsError
        from teecloud.kms.rotation import serving_groups
        from teecloud.kms.threshold import GROUP_FILE, GroupRecord, nodes_dir, write_group
        from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider, group_from_chain
        from teecloud.tee.simulated import SimulatedTdx

        platform = SimulatedTdx(self.home)
        # this data directory's group record is what its clients (deploy's env key) trust: here the chain's
        # group of the external nodes, or none; a directory with its own KMS nodes keeps theirs
        own = nodes_dir(self.home)
        if own.is_dir() and any(p.is_dir() for p in own.iterdir()):
            raise NodeError(
                f"{own} holds this data directory's own KMS nodes: use another TEECLOUD_HOME for an "
                "external KMS"
            )

        def client(url: str) -> Any:
            return connect_kms(
                url,
                collateral_for=lambda _quote, _now: platform.collateral(),
                dev_root_der=platform.dev_root_der(),
                chain=chain,
            )

        try:
            committees = serving_groups(chain.kms_group)
        except (KmsError, ChainError) as exc:
            raise NodeError(f"KmsGroup on {chain.label}: {exc}") from exc
        if len(self.kms_urls) == 1:
            url = self.kms_urls[0]
            member = [e for e, c in committees.items() if url in {u.rstrip("/") for u in c.urls.values()}]
            if member:  # one share is no KMS: its answers are partials of a group's
                raise NodeError(
                    f"the KMS at {url} is a node of the threshold group of root epoch {member[0]} on chain: "
                    "give every node of the group (--kms-url per node)"
                )
            kms = client(url)
            try:
                kms.server_certificate()
                kms.info()
            except KmsError as exc:
                raise NodeError(f"the KMS at {url} did not pass its check on chain: {exc}") from exc
            (own / GROUP_FILE).unlink(missing_ok=True)
            return url, "", kms
        wanted = {u.rstrip("/") for u in self.kms_urls}
        try:
            served = {
                e: c
                for e, c in committees.items()
                if {u.rstrip("/") for u in c.urls.values()} == wanted and len(c.urls) == len(wanted)
            }
            if not served:
                raise NodeError(
                    f"KmsGroup on {chain.label} records no serving committee at exactly these "
                    f"{len(wanted)} URLs: {', '.join(sorted(wanted))}"
                )
            epoch = min(served)
            group = group_from_chain(chain.kms_group, epoch)
            provider = ThresholdKeyProvider(
                group,
                {i: client(u) for i, u in group.nodes.items()},
                epochs={
                    e: ThresholdGroup(c.epoch, c.t, c.commitments, c.urls)
                    for e, c in served.items()
                    if e != epoch and c.urls == group.nodes
                },
            )
        except KmsError as exc:
            raise NodeError(f"threshold KMS at {', '.join(self.kms_urls)}: {exc}") from exc
        failed = {}
        for i in sorted(group.nodes):
            try:
                provider.node_certificate(i)
            except KmsError as exc:
                failed[i] = str(exc)
        if len(group.nodes) - len(failed) < group.t:
            reasons = "; ".join(f"node {i}: {why}" for i, why in failed.items())
            raise NodeError(
                f"fewer than t={group.t} of the {len(group.nodes)} KMS nodes passed their check on chain: "
                + reasons
            )
        for i, why in failed.items():
            log.warning("KMS node %d did not pass its check on chain (t=%d still do): %s", i, group.t, why)
        record = GroupRecord(group.epoch, group.t, len(group.nodes), group.commitments, group.signing_key)
        write_group(record, self.home)
        return group.nodes[min(group.nodes)], "", provider

    def _guest_vouch(self, instance_id: str, endpoints: list[tuple[int, str, int]]) -> dict[str, Any]:
        """The node's signed statement of a qemu guest's forwarded ports (ValueError before the gateway
        runs: its voucher is made with it)."""
        if self.voucher is None:
            raise ValueError("no gateway runs: the node vouches for nothing")
        return dict(self.voucher.vouch(instance_id, endpoints))

    def _guest_gateway(self) -> tuple[list[str], str] | None:
        """The gateway a qemu guest registers with: its registration listener and CA (None before it runs)."""
        if self.gateway is None:
            return None
        return [str(self.gateway.registration_url)], str(self.gateway.ca.cert_pem)

    def _guest_kms_group(self, provider: Any) -> Any:
        """A threshold guest's KMS: the group the node's ThresholdKeyProvider trusts (epoch, t, commitments,
        signing key: the chain's committee record) and, per share index, the node's URL and the measurement
        and device its server certificate shows, that certificate being the one this node's client checked
        against KmsAuth.isKmsAllowed (read at each launch: a node that restarted has a new certificate)."""
        from teecloud.node.errors import BootFailed
        from teecloud.peer import PeerPolicy, PeerRejected, PeerVerifier, StaticCollateral
        from teecloud.tee.simulated import SimulatedTdx

        platform = SimulatedTdx(self.home)
        peers = PeerVerifier(
            PeerPolicy.dev(platform.dev_root_der(), max_cert_lifetime_s=366 * 24 * 3600),
            StaticCollateral(platform.collateral),
        )

        def doc() -> dict[str, Any]:
            from teecloud.kms.errors import KmsClientError

            group = provider.group
            nodes = {}
            for i, url in sorted(group.nodes.items()):
                try:
                    # the certificate the node's client pinned after its chain check (the guest has no chain)
                    boot_info = peers.verify_cert(provider.node_certificate(i)).boot_info
                except (KmsClientError, PeerRejected) as exc:
                    log.warning("KMS node %d is not pinned for the guest: %s", i, exc)
                    continue
                nodes[str(i)] = {
                    "url": url,
                    "mr_aggregated": boot_info.mr_aggregated.hex(),
                    "device_id": boot_info.device_id.hex(),
                }
            if len(nodes) < group.t:
                raise BootFailed("keys", f"fewer than t={group.t} KMS nodes show a valid certificate")
            return {
                "epoch": group.epoch,
                "t": group.t,
                "commitments": [c.hex() for c in group.commitments],
                "signing_key": group.signing_key.hex(),
                "ca_root_cert": group.ca_root_cert,  # "" without a group root CA (self-signed app CAs)
                "nodes": nodes,
            }

        return doc

    def _start_gateway(self, chain: Any, platform: Any, boots: Any, node: Any) -> dict[str, Any]:
        """The local gateway and the node's registrar (teecloud.gateway.local); {} without HAProxy."""
        import secrets

        from teecloud.gateway.customdomain import CustomDomains, DnslibResolver
        from teecloud.gateway.driver import find_haproxy
        from teecloud.gateway.errors import GatewayError
        from teecloud.gateway.local import NodeRegistrar
        from teecloud.gateway.routing import DataPlaneLimits
        from teecloud.gateway.server import GatewayServer
        from teecloud.gateway.vouch import ChainNodes
        from teecloud.node.vouch import NodeVoucher
        from teecloud.peer import ChainGate, PeerPolicy, PeerVerifier, StaticCollateral

        try:
            find_haproxy()
        except GatewayError as exc:
            if self.acme_directory is not None:  # asked for explicitly: not silently dropped
                raise NodeError(f"ACME needs the gateway: {exc}") from exc
            log.warning("no gateway: %s", exc)
            return {}
        token_file = self.home / "gateway" / "admin-token"
        if not token_file.exists():
            atomic_write(token_file, secrets.token_urlsafe(32).encode())
        peers = PeerVerifier(
            PeerPolicy.dev(platform.dev_root_der(), max_cert_lifetime_s=31 * 24 * 3600),
            StaticCollateral(platform.collateral),
        )
        # --- gateway certificates: its (simulated) TEE boots as the gateway app through the KMS; its TLS keys
        # are derived from the app keys the KMS released (teecloud.gateway.kmskeys) and it quotes them. A
        # gateway the KMS refuses (not allowed on chain) has no keys: it does not start (the cloud runs on)
        from teecloud.errors import Error
        from teecloud.gateway.certkeys import CERT_KEYS_PATH
        from teecloud.gateway.identity import boot_gateway
        from teecloud.gateway.kmskeys import GatewayKeys
        from teecloud.tee.simulated import SimulatedTdx

        gateway_tee: Any = SimulatedTdx(self.home)
        try:
            self.gateway_boot = boot_gateway(gateway_tee, self.gateway_app_id, self.key_provider)
        except (Error, ValueError, OSError) as exc:
            if self.acme_directory is not None:  # asked for explicitly: not silently dropped
                raise NodeError(f"the gateway got no keys from the KMS: {exc}") from exc
            log.warning("no gateway: its TEE did not boot as app %s: %s", self.gateway_app_id, exc)
            return {}
        keys = GatewayKeys.from_app_keys(
            self.gateway_boot.keys, app_id=bytes.fromhex(self.gateway_app_id.removeprefix("0x"))
        )
        acme = self._gateway_acme(keys)
        gateway = GatewayServer(
            self.home / "gateway",
            base_domain=GATEWAY_BASE_DOMAIN,
            peers=peers,
            chain=ChainGate(chain, block_number=chain.checked_head),
            admin_token=token_file.read_text().strip(),
            custom_domains=(
                CustomDomains(DnslibResolver(*self.gateway_dns), base_domain=GATEWAY_BASE_DOMAIN)
                if self.gateway_dns is not None
                else None
            ),
            tee=gateway_tee,
            acme=acme,
            keys=keys,
            # routes only to addresses the launching node vouches for (NodeRegistry): docker CVMs' statements
            # come with the node's registrar, qemu guests get theirs posted (QemuBackendConfig.vouch)
            nodes=ChainNodes(chain),
            limits=DataPlaneLimits(passthrough_port=self.gateway_passthrough_port),
            # the last start's ports: running guests register at the registration port their QEMU forwards
            public_port=claim_port(self.recorded_ports.get("gateway_public", 0), "gateway's public listener"),
            registration_port=claim_port(
                self.recorded_ports.get("gateway_registration", 0), "gateway's registration listener"
            ),
            admin_port=claim_port(self.recorded_ports.get("gateway_admin", 0), "gateway's admin listener"),
        ).start()
        self._stack.callback(gateway.stop)
        self.gateway = gateway

        def running() -> list[tuple[str, list[tuple[int, str, int]]]]:
            out = []
            for st in node.list_cvms():
                if st.status != "running":
                    continue
                ports = [
                    (int(p["container_port"]), str(p.get("host_ip") or "127.0.0.1"), int(p["host_port"]))
                    for c in st.containers
                    for p in c.ports
                    if p.get("protocol") == "tcp" and p.get("host_port")
                ]
                out.append((st.instance_id, sorted(set(ports))))
            return out

        def app_compose(instance_id: str) -> str:
            # the instance's app-compose.json, byte for byte what its compose hash measures: the gateway
            # checks it against the certificate's compose hash, then applies its port_policy
            try:
                return str(node.store.get(instance_id).app_compose_bytes().decode())
            except NodeError as exc:  # removed meanwhile: the registrar skips it this round
                raise ValueError(str(exc)) from exc

        voucher = NodeVoucher(
            node_id=node.node_id,
            operator=str(chain.address),
            sign=chain.sign_message,
            launch=node.launch_record,
        )
        self.voucher = voucher  # qemu guests' statements (_guest_vouch)
        registrar = NodeRegistrar(
            [gateway.registration_url],
            gateway.ca.cert_pem,
            boots,
            running,
            interval_s=2.0,
            app_compose=app_compose,
            vouch=voucher.vouch,
        )
        registrar.start()
        self._stack.callback(registrar.stop)
        return {
            "public_port": gateway.public_port,
            "passthrough_port": gateway.passthrough_port,
            "base_domain": gateway.base_domain,
            "ca_file": str(gateway.ca_file),
            "registration": gateway.registration_url,
            "admin": gateway.admin_url,
            "admin_token_file": str(token_file),
            "custom_domains_dns": (
                f"{self.gateway_dns[0]}:{self.gateway_dns[1]}" if self.gateway_dns is not None else ""
            ),
            "app_id": self.gateway_app_id,
            "cert_keys": gateway.registration_url + CERT_KEYS_PATH,
            # the same document on the public port, the base domain's apex (`teecloud gateway check-cert`)
            "cert_keys_public": gateway.cert_keys_url,
            "certificate": "acme" if acme is not None else "dev-ca",
            "acme_directory": self.acme_directory or "",
        }

    def _gateway_acme(self, keys: Any) -> Any:
        """With an ACME directory: the challenge DNS server (stopped with the cloud) and the gateway's
        AcmeCertificates (the first issuance happens when the gateway is made; its tick renews)."""
        if self.acme is None:
            return None
        from teecloud.gateway.errors import GatewayUsageError

        try:
            certs, dns = self.acme.open(self.home / "gateway", base_domain=GATEWAY_BASE_DOMAIN, keys=keys)
        except GatewayUsageError as exc:
            raise NodeError(str(exc)) from exc
        self._stack.callback(dns.stop)
        return certs

    def _publish_kms(self, chain: Any, tee: Any, identity: Any, keys: Any) -> None:
        """What KmsAuth must know to trust this KMS and the CVMs it serves (once per chain and key set): the
        simulated OS image, this KMS build's measurement and device, and its root public keys (none for
        threshold nodes, `keys` None: their group record is not on chain yet)."""
        from teecloud.kms.bootstrap import publish_kms_info

        marker = self.home / "cloud" / "kms-published.json"
        root_tag = keys.k256_public_key.hex() if keys is not None else "threshold"
        key = f"{chain.chain_key}:{identity.mr_aggregated.hex()}:{root_tag}"
        try:
            if key in json.loads(marker.read_text()).get("published", []):
                return
        except (OSError, ValueError, AttributeError):
            pass
        chain.add_os_image(tee.os_image_hash)
        chain.add_kms_mr(identity.mr_aggregated)
        chain.add_kms_mr(identity.boot_mr_aggregated)  # its onboarding quotes (boot-time evidence)
        chain.add_kms_device(tee.device_id)
        if keys is not None:
            publish_kms_info(chain, keys, tee, self.home)
        atomic_write_json(marker, {"published": [key]})

    def _start_threshold_kms(self, chain: Any, rpc_url: str, tee: Any) -> tuple[str, str, Any]:
        """`teecloud up --kms-nodes N --threshold T`: N `teecloud kms up --threshold-node I` processes on this
        chain, each with its own data directory and sealed share, and the worker node's ThresholdKeyProvider
        over them. The first start runs a dealerless DKG between processes (`_networked_dkg`): no process
        ever holds the group secret. Returns (node 1's URL, its admin URL, the provider)."""

        from teecloud.kms.bootstrap import boot_kms_tee
        from teecloud.kms.client import connect_kms
        from teecloud.kms.errors import KmsError
        from teecloud.kms.rotation import refresh_committees
        from teecloud.kms.threshold import node_home, read_group
        from teecloud.kms.threshold_client import ThresholdGroup, ThresholdKeyProvider, group_from_chain

        self._publish_kms(chain, tee, boot_kms_tee(tee), None)
        # Create the simulated platform's dev PKI here, once, before N children start: N processes creating
        # it at the same moment have been seen to load each other's half-made state.
        tee.dev_root_der()
        try:
            group = read_group(self.home)
            if group is not None and (group.t, group.n) != (self.kms_threshold, self.kms_nodes):
                raise NodeError(
                    f"this data directory holds a {group.t}-of-{group.n} KMS group; changing t or n is a "
                    "reshare (not automated)"
                )
            if group is None:
                endpoints = self._networked_dkg(rpc_url)
                group = read_group(self.home)
                assert group is not None
            else:
                for i in range(1, self.kms_nodes + 1):
                    self.kms_processes[i] = self._spawn_kms(node_home(i, self.home), rpc_url, i)
                endpoints = self._wait_endpoints(self.kms_processes, lambda i: node_home(i, self.home))
        except KmsError as exc:
            raise NodeError(f"threshold KMS: {exc}") from exc
        self._record_committee(chain, group, endpoints)
        # every root epoch these nodes serve, as the chain records it at the nodes' addresses of this start
        # (after a rotation: `teecloud kms rotate`), each with the nodes' boot-time peer keys of this start:
        # members admit one live process per share index, the one recorded (before any round runs)
        served = refresh_committees(chain.kms_group, endpoints)
        try:
            self._record_peer_keys(chain, served, endpoints)
            group = self._networked_signing(group, endpoints)
            self._env_peers(endpoints)
        except KmsError as exc:
            raise NodeError(f"threshold KMS: {exc}") from exc
        if group.signing_key and chain.kms_group.signing_key(group.epoch) is None:
            # the signing-key round's result, recorded once by the operator as the committee is
            chain.kms_group.record_signing_key(group.epoch, group.signing_key)
        if group.ca_root_cert:
            # the root CA's key and the hash of its DER, recorded once like the signing key: clients keep a
            # root only if the chain names exactly it (group_from_chain)
            from teecloud.chain.errors import ChainError
            from teecloud.kms.threshold_client import group_ca_record

            try:
                if chain.kms_group.group_ca(group.epoch) is None:
                    chain.kms_group.record_ca(group.epoch, *group_ca_record(group.ca_root_cert))
            except ChainError as exc:
                raise NodeError(
                    f"threshold KMS: the group root CA could not be recorded on KmsGroup "
                    f"({chain.kms_group_address}; a KmsGroup deployed before `record_ca` existed has no "
                    f"such record: start from a new data directory): {exc}"
                ) from exc
        try:
            # the group as the chain records it (signing key included), not as a local file says; a
            # group.json that disagrees with the chain stops the start
            trusted = group_from_chain(chain.kms_group, group.epoch, local=group)
        except KmsError as exc:
            raise NodeError(f"threshold KMS: {exc}") from exc
        urls = dict(trusted.nodes)
        clients = {
            i: connect_kms(
                url,
                collateral_for=lambda _quote, _now: tee.collateral(),
                dev_root_der=tee.dev_root_der(),
                chain=chain,
            )
            for i, url in urls.items()
        }
        # the newer root epochs these nodes also serve, for the apps whose compose opts in
        provider = ThresholdKeyProvider(
            trusted,  # its root CA certificate checked against KmsGroup's record
            clients,
            epochs={
                e: ThresholdGroup(c.epoch, c.t, c.commitments, c.urls)
                for e, c in served.items()
                if e != trusted.epoch and c.urls == urls
            },
        )
        return urls[1], str(endpoints[1]["admin_url"]), provider

    @staticmethod
    def _record_peer_keys(chain: Any, served: dict[int, Any], endpoints: dict[int, dict[str, Any]]) -> None:
        """Record on KmsGroup each running node's current boot-time peer key (sha256 of the SPKI its
        listener serves: a threshold member's TLS key is its peer key) for every committee these nodes
        serve: peers admit member i under that key only (kms.peering step 5)."""
        from teecloud.kms.peering import record_current_peer_keys

        urls = {i: str(e["url"]) for i, e in endpoints.items()}
        for committee in served.values():
            if committee.urls == urls:
                record_current_peer_keys(chain.kms_group, committee)

    @staticmethod
    def _record_committee(chain: Any, group: Any, endpoints: dict[int, dict[str, Any]]) -> Any:
        """The serving committee on chain (KmsGroup): recorded and activated after the first DKG (and for a
        data directory made before KmsGroup existed); on later starts the chain's record must match the
        nodes' sealed group, or the cloud refuses to start."""
        from teecloud.chain.kmsgroup import CommitteeMember

        kms_group = chain.kms_group
        committee = kms_group.active(group.epoch)
        members = [
            CommitteeMember(
                i, bytes.fromhex(str(e["mr_aggregated"])), bytes.fromhex(str(e["device_id"])), str(e["url"])
            )
            for i, e in sorted(endpoints.items())
        ]
        if committee is None or (
            committee.commitments == group.commitments and committee.members != tuple(members)
        ):
            # first start, or the same committee serving at new addresses (ports change per start)
            cid = kms_group.record_committee(group.epoch, group.t, group.commitments, members)
            kms_group.activate(cid)
            committee = kms_group.committee(cid)
        if committee.commitments != group.commitments or committee.t != group.t:
            raise NodeError(
                f"the KMS committee on chain for epoch {group.epoch} (committee {committee.committee_id}) is "
                "not the group these nodes hold; refusing to start"
            )
        return committee

    def _env_peers(self, endpoints: dict[int, dict[str, Any]]) -> None:
        """Each node learns the other members' URLs (admin POST /tenv/peers): the node asked for an app's
        env key first coordinates that app's ceremony (teecloud.kms.threshold_env). A node that does not
        take them is a warning: env keys then cannot be made."""
        import httpx

        from teecloud.kms.launcher import load_admin_token
        from teecloud.kms.threshold import node_home

        peers = {str(i): str(e["url"]) for i, e in sorted(endpoints.items())}
        for i, e in sorted(endpoints.items()):
            try:
                r = httpx.post(
                    str(e["admin_url"]) + "/tenv/peers",
                    json={"peers": peers},
                    headers={"authorization": f"Bearer {load_admin_token(node_home(i, self.home))}"},
                    timeout=30,
                )
                r.raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("threshold KMS node %d did not take its peers (no env keys): %s", i, exc)

    def _networked_signing(self, group: Any, endpoints: dict[int, dict[str, Any]]) -> Any:
        """The group's signing key and presignatures, made by the running nodes (teecloud.kms.threshold_net,
        over kms.peering's channel), when there are 2t-1 nodes: a signing-key DKG when the group has no
        signing key yet (its key is then written to the group record), a presigning batch now when a
        maker's pool is below the low watermark, and then the supervisor's refill loop
        (threshold_net.PresignRefiller, `presign_policy`) while the cloud runs. A failed round is a warning:
        keys are still derived, and GetKey says why it cannot sign."""
        import dataclasses

        from teecloud.keys.certs import cert_to_pem
        from teecloud.kms.launcher import load_admin_token
        from teecloud.kms.threshold import node_home, write_group
        from teecloud.kms.threshold_net import (
            AdminEndpoint,
            PresignRefiller,
            RefillPolicy,
            RoundFailed,
            presign_participants,
            read_pool,
            run_ca_root,
            run_presign_round,
            run_signing_key_dkg,
        )

        if group.n < 2 * group.t - 1:
            return group
        nodes = {
            i: AdminEndpoint(str(e["admin_url"]), load_admin_token(node_home(i, self.home)), str(e["url"]))
            for i, e in sorted(endpoints.items())
        }
        try:
            if not group.signing_key:
                group = dataclasses.replace(group, signing_key=run_signing_key_dkg(nodes))
                write_group(group, self.home)
        except RoundFailed as exc:
            log.warning("threshold KMS: signing key not made: %s", exc)
        else:
            policy = self.presign_policy or RefillPolicy(low=PRESIGN_LOW, batch=PRESIGN_BATCH)
            refiller = PresignRefiller(nodes, group.t, policy)
            started = time.monotonic()
            if refiller.check():
                log.info("%d presignatures made in %.1f s", policy.batch, time.monotonic() - started)
            self.presign_refiller = refiller.start()
            self._stack.callback(refiller.stop)  # before the node processes stop (the stack unwinds LIFO)
        # the group's P-256 CA key, its root CA (self-signed by t nodes) and app CA presignatures (issue 19)
        try:
            if not group.ca_root_cert:
                # a CA key every member already holds (a start that stopped before the root) is kept
                docs = [read_pool(ep) for ep in nodes.values()]
                held = {doc.ca_key if doc is not None else "" for doc in docs}
                if len(held) == 1 and "" not in held:
                    ca_key = bytes.fromhex(held.pop())
                else:
                    ca_key = run_signing_key_dkg(nodes, kind="ca-sigkey")
                root = run_ca_root(nodes, group.t, ca_key, not_before=int(time.time()) - 300)
                group = dataclasses.replace(group, ca_root_cert=cert_to_pem(root))
                write_group(group, self.home)
            makers = presign_participants(list(nodes), group.t)
            ca_pools = [read_pool(nodes[i]) for i in makers]
            if min(doc.ca_unused if doc is not None else 0 for doc in ca_pools) < CA_PRESIGN_LOW:
                started = time.monotonic()
                run_presign_round(nodes, CA_PRESIGN_BATCH, group.t, kind="ca-presign")
                log.info("%d CA presignatures made in %.1f s", CA_PRESIGN_BATCH, time.monotonic() - started)
        except (RoundFailed, ValueError) as exc:
            log.warning(
                "threshold KMS: CA key / root / presignatures not made (self-signed app CAs): %s", exc
            )
        return group

    def _networked_dkg(self, rpc_url: str) -> dict[int, dict[str, Any]]:
        """Joint-Feldman with GJKR's complaint phase among processes: N share-less dealer processes each
        open a round (admin API; open_first_dkg), then the N node processes boot, each with its own plan
        (its member token only), fetch their sub-shares from every dealer over mutual RA-TLS with boot-time
        evidence, decide QUAL on the dealers' boards, seal their shares and serve; the dealers then stop.
        The group record is the commitments the nodes ended with (first_dkg_group), written last."""
        import httpx

        from teecloud.kms.launcher import load_admin_token
        from teecloud.kms.threshold import dealer_home, node_home, nodes_dir, write_group

        t, n = self.kms_threshold, self.kms_nodes
        dealers = {
            i: self._spawn_kms(dealer_home(i, self.home), rpc_url, i, "--dealer") for i in range(1, n + 1)
        }
        try:
            dealer_eps = self._wait_endpoints(dealers, lambda i: dealer_home(i, self.home))

            def admin_post(i: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
                r = httpx.post(
                    f"{dealer_eps[i]['admin_url']}{path}",
                    headers={"authorization": f"Bearer {load_admin_token(dealer_home(i, self.home))}"},
                    json=body,
                    timeout=30,
                )
                if r.status_code != 200:
                    raise NodeError(f"KMS dealer {i} refused the DKG round: {r.text[:300]}")
                answer: dict[str, Any] = r.json()
                return answer

            plans = open_first_dkg(
                dealer_eps, admin_post, t=t, n=n, plan_file_of=lambda j: node_home(j, self.home) / DKG_PLAN
            )
            # the round without any token, for the record (who dealt, t, n)
            public = {k: v for k, v in json.loads(plans[1].read_text()).items() if k != "member_tokens"}
            atomic_write_json(nodes_dir(self.home) / DKG_PLAN, public, mode=0o644)
            for i in range(1, n + 1):
                self.kms_processes[i] = self._spawn_kms(
                    node_home(i, self.home), rpc_url, i, "--join-dkg", str(plans[i])
                )
            endpoints = self._wait_endpoints(self.kms_processes, lambda i: node_home(i, self.home))
        finally:
            for p in dealers.values():
                _stop_process(p)
            for j in range(1, n + 1):  # each held that member's token: no longer needed
                (node_home(j, self.home) / DKG_PLAN).unlink(missing_ok=True)
        write_group(first_dkg_group(endpoints, t=t, n=n), self.home)
        return endpoints

    def _spawn_kms(self, data_dir: Path, rpc_url: str, index: int, *extra: str) -> Any:
        """One `teecloud kms up --threshold-node I` child: this very teecloud (its source tree first on the
        child's path) under this home; stopped (by its handle) when the cloud stops."""
        import subprocess
        import sys

        import teecloud

        src = str(Path(teecloud.__file__).resolve().parents[1])
        path = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH", "")])])
        env = {**os.environ, "TEECLOUD_HOME": str(self.home), "PYTHONPATH": path}
        code = "import sys; from teecloud.cli import main; sys.argv[0] = 'teecloud'; main()"
        args = ["kms", "up", "--dev", "--threshold-node", str(index), *extra]
        if self.kms_require_app_compose:
            args.append("--require-app-compose")
        if self.gateway_app_id:  # every node returns it with an app's keys; the client checks they agree
            args += ["--gateway-app-id", self.gateway_app_id]
        args += ["--rpc-url", rpc_url, "--port", "0", "--admin-port", "0"]
        kms_home = data_dir / "kms"
        kms_home.mkdir(parents=True, exist_ok=True)
        (kms_home / "endpoint.json").unlink(missing_ok=True)
        with (kms_home / "node.log").open("ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-c", code, *args], env=env, stdout=logf, stderr=subprocess.STDOUT
            )
        self._stack.callback(_stop_process, proc)
        return proc

    @staticmethod
    def _wait_endpoints(
        procs: dict[int, Any], data_dir: Any, timeout_s: float = 120
    ) -> dict[int, dict[str, Any]]:
        endpoints: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(endpoints) < len(procs):
            for i, p in procs.items():
                ep_file = data_dir(i) / "kms" / "endpoint.json"
                if i not in endpoints and ep_file.exists():
                    endpoints[i] = json.loads(ep_file.read_text())
                elif i not in endpoints and p.poll() is not None:
                    raise NodeError(f"KMS process {i} exited; see {ep_file.parent / 'node.log'}")
            if time.monotonic() > deadline:
                raise NodeError(f"the threshold KMS processes did not start within {timeout_s:g} s")
            time.sleep(0.1)
        return endpoints

    def stop(self) -> None:
        try:
            self._stack.close()
        except NodeError as exc:
            log.warning("while stopping: %s", exc)

    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


DKG_PLAN = "dkg-plan.json"  # in a node's data directory during `up`'s first DKG: its plan and token only


def open_first_dkg(
    dealer_eps: Mapping[int, Mapping[str, Any]],
    admin_post: Callable[[int, str, dict[str, Any]], dict[str, Any]],
    *,
    t: int,
    n: int,
    plan_file_of: Callable[[int], Path],
) -> dict[int, Path]:
    """`teecloud up`'s first DKG (epoch 1, GJKR's complaint phase: the n nodes join together): open the
    round on every dealer (`admin_post(i, "/dkg/open", body)`, its admin listener) with the sha256 of one
    fresh token per member, and write member j's plan — the round, the dealers, and member j's token only —
    to `plan_file_of(j)` (0600). A dealer hands share j's sub-share and board token only to the boot that
    presents token j (as `kms rotate`'s rounds do): not to whichever allowed KMS boot asks first.
    Returns j -> its plan file."""
    session = secrets.token_bytes(16)
    tokens = {j: secrets.token_bytes(32) for j in range(1, n + 1)}
    for i in sorted(dealer_eps):
        answer = admin_post(
            i,
            "/dkg/open",
            {
                "session": session.hex(),
                "epoch": 1,
                "dealer": i,
                "dealers": sorted(dealer_eps),
                "t": t,
                "n": n,
                "complaint_round": True,
                "member_token_hashes": {str(j): hashlib.sha256(tok).hexdigest() for j, tok in tokens.items()},
            },
        )
        if answer.get("dealer") != i:
            raise NodeError(f"KMS dealer {i} answered the DKG opening as dealer {answer.get('dealer')!r}")
    plan: dict[str, Any] = {
        "session": session.hex(),
        "epoch": 1,
        "t": t,
        "n": n,
        "complaint_round": True,
        "dealers": {
            str(i): {"url": ep["url"], "server_ca_pubkey": ep["server_ca_pubkey"]}
            for i, ep in sorted(dealer_eps.items())
        },
    }
    files = {}
    for j, tok in tokens.items():
        files[j] = plan_file_of(j)
        files[j].parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(files[j], {**plan, "member_tokens": {str(j): tok.hex()}}, mode=0o600)
    return files


def first_dkg_group(endpoints: Mapping[int, Mapping[str, Any]], *, t: int, n: int) -> Any:
    """The group record of `up`'s first DKG: the commitments every one of the n nodes states it sealed for
    epoch 1 (its endpoint file), which are the sums over QUAL (GJKR may have disqualified dealers: the sum
    over every dealer's commitments would then not be the nodes' group). Nodes that disagree, or one that
    states none, stop the start (NodeError)."""
    from teecloud.kms.threshold import GroupRecord

    stated: dict[int, tuple[bytes, ...]] = {}
    for j in range(1, n + 1):
        try:
            stated[j] = tuple(bytes.fromhex(c) for c in endpoints[j]["commitments"]["1"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise NodeError(f"KMS node {j} states no epoch-1 commitments after the DKG ({exc!r})") from exc
    if len(set(stated.values())) != 1:
        raise NodeError(
            "the KMS nodes ended the DKG with different group commitments: "
            + "; ".join(f"node {j}: {c[0].hex()[:16] if c else '-'}…" for j, c in sorted(stated.items()))
        )
    commitments = stated[1]
    if len(commitments) != t:
        raise NodeError(f"the KMS nodes state {len(commitments)} commitments, not t = {t}")
    return GroupRecord(1, t, n, commitments)


DEPLOYMENT_NAMES = ("AppAuthBlueprint", "KmsAuth", "NodeRegistry", "KmsGroup")  # ChainClient.deploy's
PRESIGN_LOW = 8  # `teecloud up` tops a node's presignature pool up when it holds fewer (at start and running)
PRESIGN_BATCH = 16  # presignatures per networked round (each boot uses one per signing node)
CA_PRESIGN_LOW = 4  # the same for the group's P-256 CA key (app CA certificates; P-256 rounds are slower)
CA_PRESIGN_BATCH = 8
