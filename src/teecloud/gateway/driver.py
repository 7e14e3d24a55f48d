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

With `DataPlaneLimits(processes=N)` there are N HAProxy processes (one thread each) on the same ports, each
with its own configuration file and runtime socket: every runtime change goes to each, in the same order
(each process moves from the old plan to the new one as a single process does), a reload and supervision
act on each.
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
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * limits.processes
        self._lock = threading.RLock()
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """The (first) HAProxy master's PID while it runs."""
        return self.pids[0]

    @property
    def pids(self) -> list[int | None]:
        """Each HAProxy master's PID while it runs (DataPlaneLimits.processes)."""
        return [p.pid if p is not None and p.poll() is None else None for p in self._procs]

    @property
    def process_paths(self) -> list[HaproxyPaths]:
        """Each process's paths (its configuration, runtime and metrics sockets); the first is `paths`."""
        return [self.paths.for_process(k) for k in range(self.limits.processes)]

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
        for paths in self.process_paths:
            config = render_config(
                bind_host=self.bind_host,
                port=self.port,
                paths=paths,
                limits=self.limits,
                plan=self.plan,
                timeouts=self.timeouts,
                terminate_mode=self.terminate_mode,
                custom_domains=self.custom_domains,
                base_domain=self.base_domain,
                access_log=self.access_log,
                cert_keys_port=self.cert_keys_port,
            )
            atomic_write(Path(paths.config), config.encode(), mode=0o600)

    def check_config(self) -> None:
        for paths in self.process_paths:
            r = subprocess.run(
                [self.haproxy, "-c", "-q", "-f", paths.config], capture_output=True, text=True, timeout=30
            )
            if r.returncode != 0:
                raise DataPlaneError(f"HAProxy refuses the rendered configuration: {r.stderr.strip()[:2000]}")

    # ------------------------------------------------------------------------------------------ process

    def start(self, timeout: float = 15.0) -> HaproxyDriver:
        with self._lock:
            self._stopping = False
            self._write_files()
            self.check_config()
            try:
                for k in range(self.limits.processes):
                    self._spawn(k, timeout)
            except DataPlaneError:
                self._stop_all()
                raise
        return self

    def _spawn(self, k: int, timeout: float) -> None:
        paths = self.paths.for_process(k)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.admin_socket)
        logf = open(self.run_dir / "haproxy.log", "ab")
        try:
            self._procs[k] = proc = subprocess.Popen(
                [self.haproxy, "-W", "-db", "-f", paths.config],
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
            if proc.poll() is not None:
                raise DataPlaneError(
                    f"HAProxy exited at start ({proc.returncode}); see {self.run_dir / 'haproxy.log'}"
                )
            try:
                if "Name: HAProxy" in self.command("show info", process=k):
                    return
            except DataPlaneError:
                pass
            if time.monotonic() > deadline:
                kill(proc)
                raise DataPlaneError(f"HAProxy did not answer on its admin socket within {timeout} s")
            time.sleep(0.05)

    def check(self) -> bool:
        """Restart each HAProxy process that died (supervision). Returns True when it had to."""
        with self._lock:
            if self._stopping:
                return False
            dead = [k for k, p in enumerate(self._procs) if p is not None and p.poll() is not None]
            if not dead:
                return False
            self._write_files()
            for k in dead:
                proc = self._procs[k]
                log.warning(
                    "HAProxy exited (%s); restarting it with the current routes",
                    proc.returncode if proc is not None else None,
                )
                self.restarts += 1
                self._spawn(k, 15.0)
            return True

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._stop_all()

    def _stop_all(self) -> None:
        procs, self._procs = self._procs, [None] * self.limits.processes
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # master-worker: the master stops its worker
        for proc in procs:
            if proc is None:
                continue
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

    def _worker_pid(self, k: int) -> int | None:
        try:
            info = self.command("show info", timeout=1.0, process=k)
        except DataPlaneError:
            return None
        for line in info.splitlines():
            if line.startswith("Pid: "):
                return int(line[5:].strip() or 0)
        return None

    def _reload(self, timeout: float = 10.0) -> None:
        """SIGUSR2 to each master, then wait until each has a new worker answering on its admin socket
        (commands sent before that would reach the old worker and be lost with it)."""
        running = [(k, p) for k, p in enumerate(self._procs) if p is not None and p.poll() is None]
        if not running:
            return
        old = {k: self._worker_pid(k) for k, _ in running}
        for _k, proc in running:
            proc.send_signal(signal.SIGUSR2)
        self.reloads += 1
        deadline = time.monotonic() + timeout
        waiting = {k for k, _ in running}
        while time.monotonic() < deadline:
            for k in list(waiting):
                pid = self._worker_pid(k)
                if pid is not None and pid != old[k]:
                    waiting.discard(k)
            if not waiting:
                return
            time.sleep(0.05)
        raise DataPlaneError(f"HAProxy did not reload within {timeout} s; see {self.run_dir / 'haproxy.log'}")

    # ------------------------------------------------------------------------------------------ runtime API

    def command(self, line: str, timeout: float = 5.0, *, process: int = 0) -> str:
        """One runtime API command over the admin socket of one HAProxy process; its answer."""
        if "\n" in line or ";" in line:
            raise DataPlaneError("one runtime command at a time")
        if not 0 <= process < self.limits.processes:
            raise DataPlaneError(f"no HAProxy process {process}")
        sock = self.paths.for_process(process).admin_socket
        try:
            answer = unix_exchange(sock, line.encode() + b"\n", timeout=timeout)
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
                # each process in turn, each through the whole ordered change (runtime_commands)
                for k in range(self.limits.processes):
                    for cmd in cmds:
                        answer = self.command(cmd, process=k).strip()
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
