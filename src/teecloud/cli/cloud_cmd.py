"""`teecloud up`, `deploy`, `ps`, `logs`, `upgrade`, `stop`, `start`, `rm`, `attest`, and `teecloud cvm ...`
(status, stats, restart): the local cloud and the CVMs on its node."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from teecloud.cli._gateway_options import (
    AcmeCaFileOpt,
    AcmeDirectoryOpt,
    AcmeDnsOpt,
    AcmeDnsServerOpt,
    AcmeEmailOpt,
    AcmeTsigKeyFileOpt,
    GatewayDnsOpt,
    PassthroughPortOpt,
)

__all__ = ["register"]

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

cvm_app = typer.Typer(
    name="cvm",
    help="CVMs on the local node: status, stats, restart.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

PHASE_TEXT = {
    "registering": "registering the app on chain",
    "governance": "governance contract deployed",
    "checking": "checking the chain",
    "chain": "on chain:",
    "rollback": "rolling back",
    "booting": "booting the CVM",
    "measuring": "measuring the app into RTMR3",
    "keys": "keys released by the KMS",
    "env": "decrypting env vars",
    "storage": "mounting the encrypted volume",
    "agent": "guest agent up (/var/run/dstack.sock)",
    "starting": "starting containers",
    "healthy": "waiting for services",
    "running": "running",
    "attesting": "verifying the app's attestation",
    "failed": "failed",
}


def gateway_url_rows(gateway: dict[str, Any]) -> list[tuple[str, str]]:
    """`teecloud up`'s gateway URLs: plain names, and `s` names + custom domains (their own port, or the
    public one)."""
    base, public = gateway["base_domain"], gateway["public_port"]
    return [
        ("gateway (HTTPS)", f"https://<app_id>-<port>.{base}:{public}/"),
        (
            "gateway passthrough (TLS to the app)",
            f"https://<app_id>-<port>s.{base}:{gateway.get('passthrough_port') or public}/",
        ),
    ]


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Map every error a user can cause or fix to a message and exit code 1 (never a traceback)."""
    from teecloud.cloud.errors import CloudError, ComposeRefused
    from teecloud.errors import Error
    from teecloud.node.errors import NodeError

    try:
        yield
    except ComposeRefused as exc:  # the file given is unusable: a usage error (exit 2), as before
        _fail(str(exc), 2)
    except (CloudError, NodeError) as exc:
        _fail(str(exc))
    except Error as exc:
        _fail(exc.diagnostics())
    except OSError as exc:
        _fail(f"{exc.strerror or exc}: {exc.filename or ''}")


def _session() -> Any:
    from teecloud.cloud.deploy import Session

    return Session()


def _progress(t0: float) -> Callable[[str, str], None]:
    seen: set[str] = set()

    def show(phase: str, detail: str) -> None:
        if phase in seen and phase != "failed":
            return
        seen.add(phase)
        text = PHASE_TEXT.get(phase, phase)
        colour = "red" if phase == "failed" else "yellow" if phase == "warning" else "cyan"
        extra = f" [dim]{detail}[/]" if detail and phase not in ("failed", "warning") else ""
        if phase == "warning":
            text = f"warning: {detail}"
        err.print(f"[dim]{time.perf_counter() - t0:6.2f}s[/] [{colour}]{text}[/]{extra}")

    return show


def _print_verdict(verdict: Any) -> None:
    for step in verdict.steps:
        mark = "[green]✓[/]" if step.ok else "[red]✗[/]"
        out.print(f"  {mark} {step.name:<10} {step.reason}")
    if verdict.ok:
        sim = (
            " [yellow](simulated TEE: trusted only because this installation's dev root is)[/]"
            if verdict.simulated
            else ""
        )
        out.print(f"[bold green]attested[/]{sim}")
    else:
        out.print(f"[bold red]NOT attested:[/] {verdict.reason}")


def _qemu_options(
    backend: str, mode: str | None, accel: str | None, gpus: list[str], *, external_kms: bool = False
) -> tuple[str, str, tuple[str, ...]]:
    """`up`'s qemu options, checked before anything starts: (mode, accel, GPU addresses in sysfs's form).
    A usage error exits 2; a tdx / sev-snp host that lacks the TEE exits 1 naming what is missing. Modes
    tdx and sev-snp then need an external KMS (`external_kms`: --kms-url): their guest verifies the KMS
    under Intel's / AMD's root and the KMS this local cloud would start is simulated, so no CVM could get
    its keys (docs/node.md)."""
    from teecloud.node.runtime.qemu import tee_host_missing
    from teecloud.node.runtime.qemu_cmdline import MAX_GPUS, MODES, UnsafeVmConfig, pci_address

    if backend != "qemu":
        given = [o for o, v in (("--qemu-mode", mode), ("--qemu-accel", accel), ("--qemu-gpu", gpus)) if v]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            _fail(
                f"{', '.join(given)} {verb} --backend qemu (the CVM backend is {escape(repr(backend[:40]))})",
                2,
            )
        return "plain", "tcg", ()
    mode = mode if mode is not None else "plain"
    if mode not in MODES:
        _fail(f"--qemu-mode is one of {', '.join(sorted(MODES))}, not {escape(repr(mode[:40]))}", 2)
    accel = accel if accel is not None else ("tcg" if mode == "plain" else "kvm")
    if mode != "plain" and accel != "kvm":
        _fail(f"--qemu-mode {mode} runs under KVM only (TCG runs mode plain)", 2)
    if len(gpus) > MAX_GPUS:
        _fail(f"at most {MAX_GPUS} --qemu-gpu", 2)
    try:
        addresses = tuple(pci_address(g) for g in gpus)
    except UnsafeVmConfig as exc:
        _fail(f"--qemu-gpu: {escape(str(exc))}", 2)
    if len(set(addresses)) != len(addresses):
        _fail("--qemu-gpu: a PCI device is given twice", 2)
    if addresses and mode == "plain":
        _fail(
            "--qemu-gpu needs --qemu-mode tdx or sev-snp: a VM in mode plain has no TEE to bind the GPU's "
            "evidence to, and its memory is readable by the host",
            2,
        )
    if mode == "plain":
        return mode, accel, addresses
    missing = tee_host_missing(mode)
    if missing:
        _fail(f"--qemu-mode {mode} needs a {mode} host; this one lacks: " + escape("; ".join(missing)))
    if external_kms:
        return mode, accel, addresses
    _fail(
        f"--qemu-mode {mode} needs a real KMS: a {mode} guest verifies the KMS's attestation under "
        f"{'Intel' if mode == 'tdx' else 'AMD'}'s root, and the local cloud's KMS is simulated, so no CVM "
        "would get its keys. Give the real KMS with --kms-url URL --kms-chain RPC_URL (docs/node.md)",
        2,
    )


def _kms_options(
    urls: list[str],
    chain: str | None,
    contracts: Path | None,
    started: dict[str, bool],
) -> tuple[str, ...]:
    """`up`'s external-KMS options, checked before anything starts (usage errors exit 2): the --kms-url
    values (devstack.external_kms_urls), --kms-chain with them, and none of the options that configure the
    KMS or chain `up` would otherwise start (`started`: option -> whether it was given)."""
    from teecloud.devstack import external_kms_urls
    from teecloud.node.errors import NodeError

    if not urls:
        given = [o for o, v in (("--kms-chain", chain), ("--kms-contracts", contracts)) if v]
        if given:
            _fail(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --kms-url", 2)
        return ()
    try:
        checked = external_kms_urls(urls)
    except NodeError as exc:
        _fail(escape(str(exc)), 2)
    if not chain:
        _fail("--kms-url needs --kms-chain RPC_URL: the chain the KMS trusts (this cloud then uses it)", 2)
    clash = [o for o, v in started.items() if v]
    if clash:
        _fail(
            f"{', '.join(clash)}: with --kms-url this cloud starts no KMS and no chain of its own (the "
            "threshold and the KMS's settings are the external KMS's; t is read from its chain)",
            2,
        )
    if contracts is not None and not contracts.is_file():
        _fail(f"--kms-contracts {escape(str(contracts))}: no such file", 2)
    return checked


def up(
    chain_port: Annotated[int, typer.Option("--chain-port", help="JSON-RPC port of the embedded chain.")] = 0,
    kms_port: Annotated[int, typer.Option("--kms-port", help="KMS (RA-TLS) port.")] = 0,
    node_port: Annotated[int, typer.Option("--node-port", help="Node API port.")] = 0,
    dev_time_travel: Annotated[
        bool,
        typer.Option(
            "--dev-time-travel",
            help="Let the chain's RPC serve evm_increaseTime/evm_mine (development only: any local process "
            "can then skip a timelock's delay).",
        ),
    ] = False,
    kms_nodes: Annotated[
        int, typer.Option("--kms-nodes", help="Threshold KMS: this many KMS node processes (1: one KMS).")
    ] = 1,
    kms_threshold: Annotated[
        int,
        typer.Option(
            "--threshold", help="Threshold KMS: how many nodes answer each key release (default: a majority)."
        ),
    ] = 0,
    gateway_dns: GatewayDnsOpt = None,
    passthrough_port: PassthroughPortOpt = 0,
    gpu: Annotated[
        str,
        typer.Option(
            "--gpu",
            help="GPUs the node gives its CVMs, attested at boot by the guest's GPU gate: none, "
            "simulated[:N] (development: SIMULATED GPUs under this installation's device root) or nvml.",
        ),
    ] = "none",
    gpu_root: Annotated[
        list[Path] | None,
        typer.Option(
            "--gpu-root", help="With --gpu nvml: a PEM file of trusted GPU device roots (NVIDIA's)."
        ),
    ] = None,
    gpu_collateral: Annotated[
        Path | None,
        typer.Option(
            "--gpu-collateral",
            help="With --gpu nvml: directory of offline NVIDIA collateral (OCSP answers, RIMs) for the gate.",
        ),
    ] = None,
    kms_require_app_compose: Annotated[
        bool,
        typer.Option(
            "--kms-require-app-compose",
            help="The KMS refuses key requests that do not send the CVM's measured app-compose.",
        ),
    ] = False,
    # the gateway's options, shared with `teecloud gateway up` (cli/_gateway_options.py)
    acme_directory: AcmeDirectoryOpt = None,
    acme_dns: AcmeDnsOpt = "127.0.0.1:53",
    acme_dns_server: AcmeDnsServerOpt = None,
    acme_tsig_key_file: AcmeTsigKeyFileOpt = None,
    acme_ca_file: AcmeCaFileOpt = None,
    acme_email: AcmeEmailOpt = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="What runs a CVM: docker (containers on this host's Docker; the default) or qemu (one VM "
            "per CVM, mode plain: the image of `teecloud image build`, the guest's TEE SIMULATED).",
        ),
    ] = "docker",
    image: Annotated[
        Path | None,
        typer.Option(
            "--image", help="With --backend qemu: a built guest image directory (default: build it)."
        ),
    ] = None,
    qemu_accel: Annotated[
        str | None,
        typer.Option(
            "--qemu-accel",
            help="With --backend qemu: tcg (any host; mode plain's default) or kvm (a host with KVM).",
        ),
    ] = None,
    qemu_mode: Annotated[
        str | None,
        typer.Option(
            "--qemu-mode",
            help="With --backend qemu: plain (the default; the guest's TEE SIMULATED), tdx or sev-snp (a "
            "TDX / SEV-SNP host and a real KMS: --kms-url; the KMS `up` starts itself is simulated).",
        ),
    ] = None,
    qemu_gpu: Annotated[
        list[str] | None,
        typer.Option(
            "--qemu-gpu",
            help="With --backend qemu --qemu-mode tdx|sev-snp: a host GPU's PCI address "
            "([domain:]bus:dev.fn, bound to vfio-pci) passed through to CVMs that require GPU attestation; "
            "repeatable.",
        ),
    ] = None,
    kms_url: Annotated[
        list[str] | None,
        typer.Option(
            "--kms-url",
            help="Use this KMS instead of starting one (https://HOST:PORT, RA-TLS); repeat for each node "
            "of a threshold group (its t and keys are read from --kms-chain's KmsGroup). Checked on chain "
            "first.",
        ),
    ] = None,
    kms_chain: Annotated[
        str | None,
        typer.Option(
            "--kms-chain",
            help="With --kms-url: the JSON-RPC URL of the chain the KMS trusts; this cloud uses it instead "
            "of its embedded chain (a development chain: the dev key signs).",
        ),
    ] = None,
    kms_contracts: Annotated[
        Path | None,
        typer.Option(
            "--kms-contracts",
            help="With --kms-url: teecloud's contracts on --kms-chain (the KMS operator's "
            "chain/deployment.json; default: this data directory's record for that chain).",
        ),
    ] = None,
) -> None:
    """Start a local cloud on 127.0.0.1: embedded chain, one KMS, one worker node (or, with --kms-url, a
    worker node on an external KMS and its chain). Ctrl-C (or `teecloud down`) stops it and powers off its
    CVMs; state is kept and the CVMs come back on the next `teecloud up`. On --backend qemu, `teecloud down
    --keep-vms` (or a killed `up`) leaves the VMs running: the next `up` re-attaches them without a reboot."""
    from teecloud.devstack import LocalCloud, read_endpoints

    kms_urls = _kms_options(
        kms_url or [],
        kms_chain,
        kms_contracts,
        {
            "--kms-nodes": kms_nodes != 1,
            "--threshold": bool(kms_threshold),
            "--kms-port": bool(kms_port),
            "--chain-port": bool(chain_port),
            "--dev-time-travel": dev_time_travel,
            "--kms-require-app-compose": kms_require_app_compose,
        },
    )
    mode, accel, gpus = _qemu_options(
        backend, qemu_mode, qemu_accel, qemu_gpu or [], external_kms=bool(kms_urls)
    )
    running = read_endpoints()
    if running is not None:
        _fail(
            f"a local cloud is already running for this data directory (pid {running.pid}, "
            f"node {running.node})"
        )
    kms_threshold = (kms_threshold or kms_nodes // 2 + 1) if not kms_urls else 1
    with _errors():
        cloud = LocalCloud(
            chain_port=chain_port,
            kms_port=kms_port,
            node_port=node_port,
            dev_time_travel=dev_time_travel,
            kms_nodes=kms_nodes,
            kms_threshold=kms_threshold,
            gateway_dns=gateway_dns,
            gateway_passthrough_port=passthrough_port,
            gpus=gpu,
            gpu_roots=gpu_root or [],
            gpu_collateral=gpu_collateral,
            kms_require_app_compose=kms_require_app_compose,
            acme_directory=acme_directory,
            acme_dns=acme_dns,
            acme_dns_server=acme_dns_server,
            acme_tsig_key_file=acme_tsig_key_file,
            acme_ca_file=acme_ca_file,
            acme_email=acme_email,
            backend=backend,
            qemu_image=image,
            qemu_accel=accel,
            qemu_mode=mode,
            qemu_gpus=gpus,
            kms_urls=kms_urls,
            kms_chain=kms_chain,
            kms_contracts=kms_contracts,
        )
        ep = cloud.start()
    resumed = len(cloud.node.store.all()) if cloud.node else 0
    table = Table(title="teecloud local cloud", show_header=False)
    table.add_row("chain (JSON-RPC)", ep.chain_rpc)
    table.add_row("KmsAuth", str(ep.contracts.get("KmsAuth", "")))
    if kms_urls:
        group = getattr(cloud.key_provider, "group", None)
        table.add_row(
            "KMS (RA-TLS)",
            f"external: {', '.join(kms_urls)}"
            + (f" (threshold group, t={group.t}, epoch {group.epoch})" if group is not None else "")
            + "; checked on chain",
        )
    else:
        table.add_row(
            "KMS (RA-TLS)",
            ep.kms if kms_nodes == 1 else f"{ep.kms} (node 1 of {kms_nodes}, t={kms_threshold})",
        )
        table.add_row("KMS admin", ep.kms_admin)
    table.add_row("node API", ep.node)
    table.add_row("node token", ep.node_token_file)
    table.add_row("TEE", "tdx-simulated (dev root of this installation)")
    table.add_row("CVM backend", cloud.node.backend.describe() if cloud.node else backend)
    if ep.gateway:  # --- gateway
        for row in gateway_url_rows(ep.gateway):
            table.add_row(*row)
        if ep.gateway.get("certificate") == "acme":
            table.add_row("gateway certificate", f"ACME ({ep.gateway['acme_directory']})")
        else:
            table.add_row("gateway CA", ep.gateway["ca_file"])
        if ep.gateway.get("cert_keys_public"):
            table.add_row("gateway cert-keys", ep.gateway["cert_keys_public"])
        table.add_row("gateway admin", ep.gateway["admin"])
        if ep.gateway.get("custom_domains_dns"):
            table.add_row("custom domains (TXT via)", ep.gateway["custom_domains_dns"])
    out.print(table)
    if cloud.reattached:
        out.print(f"re-attached {len(cloud.reattached)} running CVM(s) without a reboot")
    if resumed > len(cloud.reattached):
        out.print(f"resuming {resumed - len(cloud.reattached)} CVM(s); see `teecloud ps`")
    out.print("next: [bold]teecloud deploy examples/hello/docker-compose.yml[/]   (Ctrl-C to stop)")
    stop = threading.Event()
    keep_vms = threading.Event()

    def detach(*_: object) -> None:  # `teecloud down --keep-vms`
        keep_vms.set()
        stop.set()

    # Both signals set the event (SIGINT too: a backgrounded process may have inherited SIGINT ignored).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(DETACH_SIGNAL, detach)
    try:
        while not stop.is_set():
            stop.wait(0.5)
    finally:
        cloud.keep_vms = keep_vms.is_set() and backend == "qemu"
        if cloud.keep_vms:
            err.print("stopping: the VMs run on; the next `teecloud up` re-attaches them ...")
        else:
            err.print("stopping: CVMs are powered off and come back on the next `teecloud up` ...")
        cloud.stop()


# `teecloud down --keep-vms` asks the running `up` to stop without powering its VMs off
DETACH_SIGNAL = signal.SIGUSR1
DOWN_WAIT_S = 300.0  # powering off takes up to 3 x 5 s per VM


def _exited(pid: int) -> bool:
    """The process is gone, or has exited and waits for its parent to reap it (state Z, proc(5))."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat.rpartition(b")")[2].split()[:1] == [b"Z"]


def down(
    keep_vms: Annotated[
        bool,
        typer.Option(
            "--keep-vms",
            help="With --backend qemu: stop the cloud's services but leave its VMs running; the next "
            "`teecloud up` re-attaches them without a reboot (docker CVMs stop either way).",
        ),
    ] = False,
) -> None:
    """Stop the local cloud of this data directory (as Ctrl-C on `teecloud up` does: its CVMs are powered
    off and come back on the next `up`). With no `up` running, power off the qemu VMs one left running."""
    import os

    from teecloud._procid import process_start_time
    from teecloud.devstack import endpoints_path, read_endpoints
    from teecloud.node.errors import RuntimeFailed
    from teecloud.node.runtime.qemu import power_off_left_vms

    running = read_endpoints()
    if running is None:
        if keep_vms:
            out.print("no local cloud is running for this data directory: nothing to stop")
            return
        try:
            stopped = power_off_left_vms()
        except RuntimeFailed as exc:
            _fail(str(exc))
        out.print(
            f"no local cloud is running; powered off {len(stopped)} VM(s) left running"
            if stopped
            else "no local cloud is running for this data directory: nothing to stop"
        )
        return
    pid = running.pid
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    # a reused pid is not signalled: the process must be teecloud's, running its `up` command
    if b"up" not in argv or not any(b"teecloud" in a for a in argv):
        _fail(f"pid {pid} in {endpoints_path()} is not a `teecloud up` process: not signalled")
    try:
        pidfd = os.pidfd_open(pid)  # held from here: the start time checked is the signalled process's
    except ProcessLookupError:
        out.print("the local cloud has just stopped")
        return
    except OSError as exc:  # no pidfd_open (Linux < 5.3): never a signal by a bare pid
        _fail(f"cannot hold the local cloud's process (pid {pid}): {exc.strerror or exc}")
    try:
        # and it must be the very `up` that wrote the record (its start time), not a later one (R11-3)
        if running.pid_start_time is None or process_start_time(pid) != running.pid_start_time:
            why = "no start time: an older record" if running.pid_start_time is None else "another start time"
            _fail(
                f"pid {pid} in {endpoints_path()} is not the `teecloud up` that wrote it ({why}): not "
                "signalled; stop that `up` with Ctrl-C (or kill it) if it is this data directory's"
            )
        signal.pidfd_send_signal(pidfd, DETACH_SIGNAL if keep_vms else signal.SIGTERM)
    except ProcessLookupError:
        out.print("the local cloud has just stopped")
        return
    except PermissionError:
        _fail(f"not allowed to signal the local cloud's process (pid {pid})")
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + DOWN_WAIT_S
    while not _exited(pid):
        if time.monotonic() > deadline:
            _fail(f"the local cloud (pid {pid}) is still stopping after {DOWN_WAIT_S:.0f} s")
        time.sleep(0.2)
    out.print("the local cloud stopped" + ("; its VMs run on" if keep_vms else ""))


# One set of options for deploy, upgrade and compose-hash (teecloud.cloud.options.AppOptions).
NameOpt = Annotated[
    str | None,
    typer.Option(
        "--name", help="App/CVM name (default: the compose file's folder name).", show_default=False
    ),
]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option("--env", "-e", help="KEY=VALUE secret env var, encrypted to the app's KMS key (repeat)."),
]
EnvFileOpt = Annotated[Path | None, typer.Option("--env-file", help="KEY=VALUE file of secret env vars.")]
AllowedEnvOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allowed-env",
        help="Env var name the CVM may receive (repeat), added to the current list; without it, the names "
        "of the env given are allowed.",
    ),
]
ReplaceAllowedOpt = Annotated[
    bool,
    typer.Option(
        "--replace-allowed-envs",
        help="Make --allowed-env the whole list instead of adding to it (variables left out are dropped).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
GatewayPortOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--gateway-port",
        help="PORT[:pp][:h2c] (repeat): the app's port_policy (measured) routes only these ports through the "
        "gateway; :pp sends PROXY protocol v2 to that port; :h2c speaks HTTP/2 cleartext to it.",
    ),
]


def _app_options(
    *,
    name: str | None = None,
    env: list[str] | None = None,
    env_file: Path | None = None,
    allowed_env: list[str] | None = None,
    replace_allowed_envs: bool = False,
    public_logs: bool | None = None,
    cpus: float | None = None,
    memory: int | None = None,
    gateway_port: list[str] | None = None,
) -> Any:
    from teecloud.cloud.options import AppOptions

    return AppOptions.build(
        name=name,
        env=list(env or []),
        env_file=env_file,
        allowed_envs=list(allowed_env or []),
        replace_allowed_envs=replace_allowed_envs,
        public_logs=public_logs,
        cpus=cpus,
        memory_mb=memory,
        gateway_ports=gateway_port,
    )


def _print_plan(plan: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(plan.to_json(), indent=2) + "\n")
        return
    for w in plan.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    out.print("app-compose.json (normalized; its sha256 is the compose hash):", highlight=False)
    sys.stdout.write(plan.app_compose.decode() + "\n")
    out.print(f"compose_hash: 0x{plan.compose_hash.hex()}", highlight=False)


def compose_hash_cmd(
    compose: Annotated[Path, typer.Argument(help="The app's docker-compose.yml.")],
    name: NameOpt = None,
    env: EnvOpt = None,
    env_file: EnvFileOpt = None,
    allowed_env: AllowedEnvOpt = None,
    replace_allowed_envs: ReplaceAllowedOpt = False,
    public_logs: Annotated[
        bool, typer.Option("--public-logs", help="Anyone may read the app's logs.")
    ] = False,
    gateway_port: GatewayPortOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the exact app-compose.json and compose hash that `deploy` (same options) registers: what a
    multisig or timelock is asked to approve. Needs no running cloud; env values are not part of it."""
    from teecloud.cloud.options import plan_compose

    with _errors():
        opts = _app_options(
            name=name,
            env=env,
            env_file=env_file,
            allowed_env=allowed_env,
            replace_allowed_envs=replace_allowed_envs,
            public_logs=public_logs,
            gateway_port=gateway_port,
        )
        plan = plan_compose(compose, opts)
    _print_plan(plan, as_json)


def deploy(
    compose: Annotated[Path, typer.Argument(help="The app's docker-compose.yml (used unchanged).")],
    name: NameOpt = None,
    env: EnvOpt = None,
    env_file: EnvFileOpt = None,
    allowed_env: AllowedEnvOpt = None,
    replace_allowed_envs: ReplaceAllowedOpt = False,
    public_logs: Annotated[
        bool, typer.Option("--public-logs", help="Anyone may read the app's logs.")
    ] = False,
    app_id: Annotated[
        str | None, typer.Option("--app-id", help="Deploy as an existing on-chain app.")
    ] = None,
    multisig: Annotated[
        str | None,
        typer.Option(
            "--multisig", help="Owners of the new app: a multisig of these comma-separated addresses."
        ),
    ] = None,
    threshold: Annotated[
        int | None, typer.Option("--threshold", help="Approvals the multisig needs (with --multisig).")
    ] = None,
    timelock: Annotated[
        int | None,
        typer.Option(
            "--timelock", help="Every change to the app waits this many seconds (a timelock owns it)."
        ),
    ] = None,
    cpus: Annotated[float | None, typer.Option("--cpus", help="CPU cap per service.")] = None,
    memory: Annotated[int | None, typer.Option("--memory", help="Memory cap per service (MB).")] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the app-compose.json and compose hash; register nothing."),
    ] = False,
    gateway_port: GatewayPortOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register the app on chain, encrypt its env to its KMS key, boot it in a CVM, and verify it."""
    from teecloud.cloud.deploy import deploy as do_deploy
    from teecloud.cloud.governance import GovernanceSpec
    from teecloud.cloud.options import plan_compose

    t0 = time.perf_counter()
    with _errors():
        opts = _app_options(
            name=name,
            env=env,
            env_file=env_file,
            allowed_env=allowed_env,
            replace_allowed_envs=replace_allowed_envs,
            public_logs=public_logs,
            cpus=cpus,
            memory=memory,
            gateway_port=gateway_port,
        )
        governance = GovernanceSpec.build(multisig=multisig, threshold=threshold, timelock=timelock)
        if governance is not None and app_id is not None:
            _fail(
                "--multisig/--timelock give a new app its owner: for an existing app use "
                "`teecloud app transfer-ownership`",
                2,
            )
        if app_id is not None:
            from teecloud.ids import parse_app_id

            parse_app_id(app_id, name="--app-id")
        plan = plan_compose(compose, opts)  # every input refused here, before the cloud is contacted
        if dry_run:
            _print_plan(plan, as_json)
            return
        session = _session()
        result = do_deploy(
            session,
            compose,
            opts,
            app_id=app_id,
            governance=governance,
            progress=_progress(t0),
        )
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        table = Table(show_header=False)
        table.add_column(overflow="fold")
        table.add_column(overflow="fold")
        table.add_row("app_id", "0x" + result.app_id)
        table.add_row("compose_hash", result.compose_hash)
        table.add_row("instance_id", result.instance_id)
        table.add_row("name", result.name)
        table.add_row("status", result.status)
        for url in result.urls:
            table.add_row("url", url)
        for url in result.gateway_urls:  # --- gateway
            table.add_row("https", url)
        out.print(table)
        if result.verdict is not None:
            _print_verdict(result.verdict)
    if result.status != "running":
        _fail(f"the CVM did not start: {result.error}")
    if result.verdict is not None and not result.verdict.ok:
        raise typer.Exit(1)
    err.print(f"[dim]deployed in {time.perf_counter() - t0:.2f}s[/]")


def ps(
    as_json: JsonOpt = False,
    wide: Annotated[bool, typer.Option("--wide", "-w", help="Full ids, hashes and URLs.")] = False,
) -> None:
    """List the CVMs on the local node."""
    with _errors():
        cvms = _session().node.list_cvms()
    if as_json:
        sys.stdout.write(json.dumps([c.model_dump() for c in cvms], indent=2) + "\n")
        return
    table = Table()
    for col in ("name", "instance", "app_id", "compose_hash", "status", "urls"):
        table.add_column(col, overflow="fold" if wide else "ellipsis", no_wrap=not wide)
    for c in cvms:
        status = c.status + (f" ({c.phase})" if c.status == "booting" else "")
        if c.error:
            status += f": {c.error if wide else c.error[:80]}"
        table.add_row(
            c.name,
            c.instance_id if wide else c.instance_id[:12],
            "0x" + (c.app_id if wide else c.app_id[:10] + "…"),
            c.compose_hash if wide else c.compose_hash[:12],
            status,
            " ".join(c.urls),
        )
    out.print(table)
    if not wide and cvms:
        err.print("[dim](--wide for full values, --json for everything)[/]")


MAX_FOLLOWED_SERVICES = 32


def _follow_all(session: Any, app: str, tail: int) -> None:
    """`logs -f` without -s: one follow stream per service (the node follows one service per stream),
    merged here with a `service | ` prefix, until Ctrl-C or every stream ends."""
    import queue

    st = session.node.get(app)
    services = sorted({c.service for c in st.containers})[:MAX_FOLLOWED_SERVICES]
    if not services:
        _fail(f"{st.name} has no containers to follow (status {st.status})")
    width = max(len(x) for x in services)
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue(maxsize=1024)

    def pump(service: str) -> None:
        try:
            for line in session.node.logs(app, service=service, tail=tail, follow=True):
                lines.put((service, line))
        except Exception as exc:  # reported in the merged output; the other services keep going
            lines.put((service, f"[log stream ended: {exc}]"))
        lines.put((service, None))

    for service in services:
        threading.Thread(target=pump, args=(service,), daemon=True, name=f"logs-{service}").start()
    open_streams = len(services)
    while open_streams:
        service, line = lines.get()
        if line is None:
            open_streams -= 1
            continue
        sys.stdout.write(f"{service:<{width}} | {line}\n")
        sys.stdout.flush()


def logs(
    app: Annotated[str, typer.Argument(help="CVM name or instance id.")],
    service: Annotated[str | None, typer.Option("--service", "-s", help="Only this service.")] = None,
    tail: Annotated[int, typer.Option("--tail", "-n", min=0, max=100_000, help="Lines from the end.")] = 200,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep following (every service unless -s).")
    ] = False,
) -> None:
    """Print the app's container logs."""
    with _errors():
        session = _session()
        try:
            if follow and service is None:
                _follow_all(session, app, tail)
                return
            for line in session.node.logs(app, service=service, tail=tail, follow=follow):
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


def upgrade(
    app: Annotated[str, typer.Argument(help="CVM name or instance id.")],
    compose: Annotated[
        Path | None,
        typer.Argument(help="The new docker-compose.yml (not needed with --commit of a stored plan)."),
    ] = None,
    env: EnvOpt = None,
    env_file: EnvFileOpt = None,
    allowed_env: AllowedEnvOpt = None,
    replace_allowed_envs: ReplaceAllowedOpt = False,
    public_logs: Annotated[
        bool | None,
        typer.Option("--public-logs/--private-logs", help="Change who may read logs (default: unchanged)."),
    ] = None,
    commit: Annotated[
        bool,
        typer.Option(
            "--commit", help="Execute the pending on-chain approval if it may run now, then roll out."
        ),
    ] = False,
    no_propose: Annotated[
        bool,
        typer.Option("--no-propose", help="Only check the chain: do not propose the new hash to its owners."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Replace the app's compose (same app_id and data). The chain is checked first: while the new compose
    hash waits for a multisig or a timelock, the current version keeps running and this says what it waits
    for, and keeps the plan; run it again (or `teecloud upgrade APP --commit`, no file needed) once the
    chain allows the hash. A failed rollout returns to the previous version. Without -e/--env-file the
    app's current encrypted env is kept."""
    from teecloud.cloud.deploy import upgrade as do_upgrade

    t0 = time.perf_counter()
    with _errors():
        opts = _app_options(
            env=env,
            env_file=env_file,
            allowed_env=allowed_env,
            replace_allowed_envs=replace_allowed_envs,
            public_logs=public_logs,
        )
        from teecloud.cloud.errors import ComposeRefused
        from teecloud.cloud.options import read_compose_file
        from teecloud.node.compose import load_compose
        from teecloud.node.errors import ComposeRejected

        if compose is None and not commit:
            _fail(
                f"missing COMPOSE: give the new docker-compose.yml, or --commit to roll out the upgrade "
                f"of {app} that waits on chain (its plan is stored)",
                2,
            )
        if compose is not None:
            try:  # an unusable file is refused before the cloud is contacted
                load_compose(read_compose_file(compose))
            except ComposeRejected as exc:
                raise ComposeRefused(f"{compose}: {exc}") from exc
        result = do_upgrade(
            _session(), app, compose, opts, commit=commit, propose=not no_propose, progress=_progress(t0)
        )
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    if result.status == "unchanged":
        if not as_json:
            out.print(f"{result.name} already runs compose hash {result.compose_hash}: nothing to do")
        return
    if result.status == "pending":
        if not as_json:
            out.print(
                f"{result.name} keeps running its current version (compose hash "
                f"{result.previous_compose_hash}).",
                highlight=False,
            )
            out.print(
                f"new compose hash 0x{result.compose_hash} is not allowed on chain yet.", highlight=False
            )
            if result.pending is not None:
                out.print(f"waiting for: {result.pending.describe(result.name)}", highlight=False)
                if result.pending.executable:
                    out.print(
                        f"it may run now: `teecloud upgrade {result.name} --commit` executes it and rolls "
                        "out the stored plan (no file needed)",
                        highlight=False,
                    )
                else:
                    out.print(
                        f"the plan is kept: once the chain allows it, `teecloud upgrade {result.name} "
                        "--commit` rolls it out (no file needed)",
                        highlight=False,
                    )
            else:
                out.print(
                    "no pending change adds it: propose it with "
                    f"`teecloud app upgrade propose 0x{result.app_id} 0x{result.compose_hash}`",
                    highlight=False,
                )
        return
    if not as_json:
        out.print(f"compose_hash {result.compose_hash}: {result.status}", highlight=False)
        if result.verdict is not None:
            _print_verdict(result.verdict)
    if result.status != "running":
        _fail(f"the upgraded CVM did not start: {result.error}")
    if result.verdict is not None and not result.verdict.ok:
        raise typer.Exit(1)


def _action(action: str) -> Callable[[str], None]:
    def run(app: Annotated[str, typer.Argument(help="CVM name or instance id.")]) -> None:
        with _errors():
            session = _session()
            st = session.node.action(app, action)
            if action in ("start", "restart"):
                st = session.node.wait(
                    st.instance_id, on_phase=lambda s: err.print(f"  {s.status} {s.phase}")
                )
        out.print(f"{st.name} ({st.instance_id[:12]}): {st.status}" + (f": {st.error}" if st.error else ""))
        if st.status == "failed":
            raise typer.Exit(1)

    run.__doc__ = {
        "start": "Boot a stopped CVM (keys are fetched again).",
        "stop": "Power off a CVM (data kept, encrypted).",
        "restart": "Stop and boot a CVM again.",
    }[action]
    return run


def rm(
    app: Annotated[str, typer.Argument(help="CVM name or instance id.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Remove a CVM for good: the instance is retired on chain (no KMS releases its keys again), then its
    containers, keys and encrypted data are deleted."""
    from teecloud.cloud.deploy import retire_instance

    with _errors():
        session = _session()
        st = session.node.get(app)
        if not yes and not sys.stdin.isatty():
            _fail(
                f"not removing {st.name}: removal destroys its data and needs a confirmation, but stdin is "
                "not a terminal; pass -y/--yes to remove it without asking"
            )
        if not yes and not typer.confirm(f"remove {st.name} ({st.instance_id[:12]}) and destroy its data?"):
            raise typer.Exit(1)
        # (1) on chain first: once retired, neither a restart nor a stolen quote gets the keys back
        retirement = retire_instance(session, "0x" + st.app_id.removeprefix("0x"), st.instance_id)
        result = session.node.remove(st.instance_id)
        from teecloud.cloud.errors import DeployError
        from teecloud.cloud.pending import discard_plan

        with suppress(DeployError):  # an upgrade it waited for has nothing left to upgrade
            discard_plan(st.app_id, session.home)
    if retirement.retired:
        out.print(
            f"removed {st.name} ({st.instance_id}); instance {retirement.detail}: no KMS releases its keys "
            "again, so its data, and any copy of its ciphertext, can no longer be decrypted",
            highlight=False,
        )
    else:
        out.print(f"removed {st.name} ({st.instance_id}) from the node", highlight=False)
        err.print(
            f"[yellow]warning:[/] the instance is NOT retired on chain: {retirement.detail}. Until it is, "
            "the KMS still releases its keys to a CVM that boots with its measurements, so a copy of its "
            "encrypted data taken before removal can still be opened.",
            highlight=False,
        )
    for left in getattr(result, "leftovers", None) or []:
        out.print(f"[yellow]left behind:[/] {left}", highlight=False)


def attest(
    app: Annotated[str, typer.Argument(help="CVM name or instance id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Verify a running app from outside: fresh quote, event-log replay, compose hash, on-chain allowlist."""
    from teecloud.cloud.verify import verify_app

    with _errors():
        session = _session()
        verdict = verify_app(session.node, app, platform=session.platform, chain=session.chain)
    if as_json:
        sys.stdout.write(json.dumps(verdict.to_json(), indent=2) + "\n")
    else:
        if verdict.app_id:  # known only once the event log replayed
            out.print(
                f"app_id 0x{verdict.app_id}  compose_hash {verdict.compose_hash}  "
                f"instance {verdict.instance_id}",
                highlight=False,
            )
        else:
            out.print(f"app {app}", highlight=False)
        _print_verdict(verdict)
    if not verdict.ok:
        raise typer.Exit(1)


@cvm_app.command("status")
def cvm_status(app: Annotated[str, typer.Argument(help="CVM name or instance id.")]) -> None:
    """Everything the node knows about a CVM (JSON)."""
    with _errors():
        st = _session().node.get(app)
    out.print_json(st.model_dump_json())


@cvm_app.command("stats")
def cvm_stats(
    app: Annotated[str, typer.Argument(help="CVM name or instance id.")], as_json: JsonOpt = False
) -> None:
    """CPU, memory, network and block I/O of the CVM's containers, by service."""
    with _errors():
        session = _session()
        rows = session.node.stats(app)
        services = {c.container: c.service for c in session.node.get(app).containers}
    cols = ("service", "container", "cpu", "memory", "net_io", "block_io", "pids")
    rows = [{"service": services.get(str(r.get("container", "")), ""), **r} for r in rows]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table()
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in cols))
    out.print(table)


cvm_app.command("restart")(_action("restart"))


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    app.command("deploy")(deploy)
    app.command("compose-hash")(compose_hash_cmd)
    app.command("ps")(ps)
    app.command("logs")(logs)
    app.command("upgrade")(upgrade)
    app.command("stop")(_action("stop"))
    app.command("start")(_action("start"))
    app.command("rm")(rm)
    app.command("attest")(attest)
    app.add_typer(cvm_app, name="cvm")
