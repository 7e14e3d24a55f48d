"""The HAProxy data plane as a supervised child process, its routes changed through the runtime API.

HaproxyDriver.start()          render and check (`haproxy -c`) the configuration, start HAProxy in
                               master-worker mode, wait until its admin socket answers
HaproxyDriver.apply(routes)    the plan for `routes` (teecloud.gateway.routing), the runtime commands
                               from the current plan to it (teecloud.gateway.haproxy), then the map
                               files and configuration rewritten atomically so a restart or reload
                               starts where the runtime left off; no reload, no dropped connection
HaproxyDriver.reload_certs(c)  a new certificate: files rewritten, then SIGUSR2 (a reload: the only
                               change that needs one)
supervision                    a HAProxy that died is restarted (with the current plan) by `check()`,
                               which the gateway calls once a second
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from teecloud._fs import atomic_write
from teecloud._proc import kill
from teecloud.gateway.devca import IssuedCert
from teecloud.gateway.errors import DataPlaneError
from teecloud.gateway.haproxy import (
    CustomDomainHook,
    HaproxyPaths,
    HaproxyTimeouts,
    TerminateMode,
    render_config,
    render_lua,
    render_map,
    runtime_commands,
)
from teecloud.gateway.routing import DataPlaneLimits, Plan, Route, plan

__all__ = ["HaproxyDriver", "find_haproxy", "unix_exchange"]

log = logging.getLogger("teecloud.gateway")

_OK_PREFIXES = ("", "IP changed from", "no need to change", "port changed from")
_MAX_ANSWER = 1 << 20


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it ends (a gateway killed with SIGKILL
    leaves no HAProxy behind; the master stops its workers on SIGTERM). Linux prctl(PR_SET_PDEATHSIG): start
    the driver from a thread that lives as long as the gateway (the main thread, or the tick thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def unix_exchange(path: str, request: bytes, *, timeout: float = 5.0, max_bytes: int = _MAX_ANSWER) -> bytes:
    """Send `request` on a unix stream socket, read the answer to its end. OSError past `max_bytes`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request)
        chunks: list[bytes] = []
        size = 0
        while chunk := s.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise OSError(f"the answer on {path} is longer than {max_bytes} bytes")
    return b"".join(chunks)


def find_haproxy() -> str:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if path is None:
        raise DataPlaneError("HAProxy is missing: apt-get install haproxy (scripts/setup.sh does)")
    return path


class HaproxyDriver:
    def __init__(
        self,
        run_dir: Path,
        *,
        base_domain: str,
        bind_host: str = "127.0.0.1",
        port: int,
        cert: IssuedCert,
        chain_pem: str,
        limits: DataPlaneLimits = DataPlaneLimits(),
        timeouts: HaproxyTimeouts = HaproxyTimeouts(),
        haproxy: str | None = None,
        terminate_mode: TerminateMode = "http",
        custom_domains: CustomDomainHook | None = None,
        access_log: bool = False,
        cert_keys_port: int = 0,
    ) -> None:
        self.custom_domains = custom_domains
        self.cert_keys_port = cert_keys_port  # the gateway's own cert-keys listener (haproxy.render_config)
        self.access_log = access_log  # log lines to paths.access_log (teecloud.gateway.accesslog)
        self.terminate_mode: TerminateMode = terminate_mode
        self.run_dir = Path(run_dir)
        self.base_domain = base_domain
        self.bind_host = bind_host
        self.port = port
        self.limits = limits
        self.timeouts = timeouts
        self.paths = HaproxyPaths(str(self.run_dir), f"teecloud-gw-{secrets.token_hex(8)}")
        self.haproxy = haproxy or find_haproxy()
        self.plan = Plan()
        self.restarts = 0
        self.reloads = 0
        self._cert = cert
        self._chain_pem = chain_pem
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # ------------------------------------------------------------------------------------------ files

    def _write_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.run_dir, 0o700)
        cert_dir = Path(self.paths.cert_dir)
        cert_dir.mkdir(exist_ok=True, mode=0o700)
        atomic_write(cert_dir / "wildcard.pem", self._cert.haproxy_pem(self._chain_pem).encode(), mode=0o600)
        atomic_write(Path(self.paths.http_map), render_map(self.plan.http_map).encode(), mode=0o600)
        atomic_write(Path(self.paths.tcp_map), render_map(self.plan.tcp_map).encode(), mode=0o600)
        if self.custom_domains is not None:
            atomic_write(Path(self.paths.lua), render_lua(self.custom_domains).encode(), mode=0o600)
        config = render_config(
            bind_host=self.bind_host,
            port=self.port,
            paths=self.paths,
            limits=self.limits,
            plan=self.plan,
            timeouts=self.timeouts,
            terminate_mode=self.terminate_mode,
            custom_domains=self.custom_domains,
            base_domain=self.base_domain,
            access_log=self.access_log,
            cert_keys_port=self.cert_keys_port,
        )
        atomic_write(Path(self.paths.config), config.encode(), mode=0o600)

    def check_config(self) -> None:
        r = subprocess.run(
            [self.haproxy, "-c", "-q", "-f", self.paths.config], capture_output=True, text=True, timeout=30
        )
        if r.returncode != 0:
            raise DataPlaneError(f"HAProxy refuses the rendered configuration: {r.stderr.strip()[:2000]}")

    # ------------------------------------------------------------------------------------------ process

    def start(self, timeout: float = 15.0) -> HaproxyDriver:
        with self._lock:
            self._stopping = False
            self._write_files()
            self.check_config()
            self._spawn(timeout)
        return self

    def _spawn(self, timeout: float) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.admin_socket)
        logf = open(self.run_dir / "haproxy.log", "ab")
        try:
            self._proc = subprocess.Popen(
                [self.haproxy, "-W", "-db", "-f", self.paths.config],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            logf.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise DataPlaneError(
                    f"HAProxy exited at start ({self._proc.returncode}); see {self.run_dir / 'haproxy.log'}"
                )
            try:
                if "Name: HAProxy" in self.command("show info"):
                    return
            except DataPlaneError:
                pass
            if time.monotonic() > deadline:
                kill(self._proc)
                raise DataPlaneError(f"HAProxy did not answer on its admin socket within {timeout} s")
            time.sleep(0.05)

    def check(self) -> bool:
        """Restart HAProxy if it died (supervision). Returns True when it had to."""
        with self._lock:
            if self._stopping or self._proc is None or self._proc.poll() is None:
                return False
            log.warning("HAProxy exited (%s); restarting it with the current routes", self._proc.returncode)
            self.restarts += 1
            self._write_files()
            self._spawn(15.0)
            return True

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # master-worker: the master stops its worker
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill(proc)

    def reload_certs(self, cert: IssuedCert, chain_pem: str) -> None:
        with self._lock:
            self._cert, self._chain_pem = cert, chain_pem
            self._write_files()
            self.check_config()
            self._reload()

    def _worker_pid(self) -> int | None:
        try:
            info = self.command("show info", timeout=1.0)
        except DataPlaneError:
            return None
        for line in info.splitlines():
            if line.startswith("Pid: "):
                return int(line[5:].strip() or 0)
        return None

    def _reload(self, timeout: float = 10.0) -> None:
        """SIGUSR2 to the master, then wait until a new worker answers on the admin socket (commands sent
        before that would reach the old worker and be lost with it)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        old = self._worker_pid()
        self._proc.send_signal(signal.SIGUSR2)
        self.reloads += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self._worker_pid()
            if pid is not None and pid != old:
                return
            time.sleep(0.05)
        raise DataPlaneError(f"HAProxy did not reload within {timeout} s; see {self.run_dir / 'haproxy.log'}")

    # ------------------------------------------------------------------------------------------ runtime API

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One runtime API command over the admin socket; its answer."""
        if "\n" in line or ";" in line:
            raise DataPlaneError("one runtime command at a time")
        try:
            answer = unix_exchange(self.paths.admin_socket, line.encode() + b"\n", timeout=timeout)
        except OSError as exc:
            raise DataPlaneError(f"HAProxy's admin socket: {exc}") from exc
        return answer.decode(errors="replace")

    def apply(
        self, routes: Iterable[Route], custom_domains: Mapping[str, tuple[str, int]] | None = None
    ) -> list[str]:
        """Move HAProxy to the plan for `routes` (and resolved custom domains) at run time. Returns the
        commands sent."""
        with self._lock:
            new = plan(routes, self.base_domain, self.limits, self.plan, custom_domains)
            cmds = runtime_commands(self.plan, new, self.paths, self.limits)
            try:
                for cmd in cmds:
                    answer = self.command(cmd).strip()
                    if not any(answer.startswith(p) for p in _OK_PREFIXES if p) and answer:
                        raise DataPlaneError(f"HAProxy refused {cmd!r}: {answer[:300]}")
            except DataPlaneError:
                # Part of the change may have happened: HAProxy re-reads the whole new state (a reload,
                # the only way back to a known state; open connections finish on the old worker).
                self.plan = new
                self._write_files()
                self._reload()
                raise
            self.plan = new
            self._write_files()
            return cmds
