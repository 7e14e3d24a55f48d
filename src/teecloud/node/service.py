"""The worker node: CVM lifecycle over a CVM backend (`Node`; teecloud.node.runtime), its HTTP API
(`make_node_app`), and a background server (`NodeServer`).

Lifecycle, per CVM (one lock each, held for a whole stop, upgrade or remove, and while a boot starts; boots
run in background threads, and a change of state first waits for a running boot to end):
    create   instance directory written, then boot (backend.launch)              -> booting -> running|failed
    stop     app stopped, agent stopped, volume unmounted, tmpfs state wiped     -> stopped (desired: stopped)
    start    boot again (fresh RTMR3, keys fetched again)                        -> booting -> running|failed
    upgrade  stop, swap app-compose.json (same app_id, instance), boot: if the new compose hash is not allowed
             on chain the KMS refuses the keys and the app does not start        -> failed (reason kept)
             (all under the lock: a concurrent start cannot boot the old compose in between)
    remove   best effort, never half-way: agent stopped and keys forgotten, down + volumes, unmounted,
             cipher directory deleted (crypto-shredded), directory deleted; what could not be cleaned (the
             containers while the engine is down) is reported, not raised
Node start (`resume()`): every CVM whose desired state is running boots again; node stop (`close()`): every
CVM is stopped but keeps its desired state, so a restart brings it back. `reattach()` (before `resume()`)
adopts instead the CVMs whose VM an earlier node process left running and booted (qemu: VMs outlive it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import teecloud
from teecloud import vmconfig
from teecloud._asgi import BoundedBody
from teecloud._fs import atomic_write, data_home
from teecloud._serve import NODE_API, LimitedServer, ServeLimits, limited_config
from teecloud.agent.boot import GpuGate
from teecloud.agent.keyprovider import KeyProvider
from teecloud.ids import HexError, parse_app_id, parse_hex
from teecloud.node import api
from teecloud.node.compose import check_app_compose, image_refs
from teecloud.node.errors import (
    BadRequest,
    BootFailed,
    ComposeRejected,
    InstanceNotFound,
    InstanceStateError,
    NodeError,
    RuntimeFailed,
    RuntimeUnavailable,
    TooManyStreams,
)
from teecloud.node.instance import Instance, InstanceStore, node_home
from teecloud.node.runtime import Cvm, CvmBackend, LogSource, ResourceLimits, Runtime, make_backend
from teecloud.tee.base import TeePlatform

__all__ = ["Node", "NodeServer", "load_or_create_token", "make_node_app"]

log = logging.getLogger("teecloud.node")

# Compose files, env blobs and user config travel in request bodies; none is near this.
NODE_MAX_BODY_BYTES = 4 * 1024 * 1024
# CVMs per node: bounds the node's work and every listing (GET /cvms carries each app-compose, ≤ 576 KiB).
MAX_CVMS = 64
# `logs?follow=true` (public for apps with public_logs) holds a `docker logs --follow` process and a worker
# thread for as long as the client stays: capped per CVM and per node (below the 40 threads of the server's
# pool, so followers cannot starve the other routes); beyond, 429.
MAX_FOLLOW_STREAMS_PER_CVM = 4
MAX_FOLLOW_STREAMS = 16
# `logs` without follow ends by itself: at most this many bytes (then a truncation line); `tail` is capped too
MAX_LOG_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_LOG_TAIL = 100_000
# Status errors (a KMS refusal, a compose failure) are kept to this many characters
MAX_ERROR_CHARS = 4000
# An app whose deployment states no memory limit gets 1/DEFAULT_APP_MEMORY_SHARE of the node's memory (at
# least DEFAULT_MIN_APP_MEMORY_MB): without a cap one app could take the host's memory from every other CVM.
DEFAULT_APP_MEMORY_SHARE = 4
DEFAULT_MIN_APP_MEMORY_MB = 64
# How long a stop, upgrade or remove waits for a running boot (keys, compose up, health) to end.
BOOT_WAIT_S = 180.0


def host_memory_mb() -> int:
    """Physical memory of this host in MB."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))
    except (ValueError, OSError):  # no sysconf names on this platform
        return 0


def load_or_create_token(home: Path | None = None) -> str:
    path = node_home(home) / "admin-token"
    if not path.exists():
        atomic_write(path, secrets.token_urlsafe(32).encode())
    return path.read_text().strip()


@dataclass
class _Cvm:
    lock: threading.RLock = field(default_factory=threading.RLock)
    status: str = "stopped"
    phase: str = ""
    error: str = ""
    booted: Cvm | None = None
    thread: threading.Thread | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Node:
    def __init__(
        self,
        *,
        key_provider: KeyProvider,
        tee_factory: Callable[[], TeePlatform],
        backend: CvmBackend | None = None,
        runtime: Runtime | None = None,
        home: Path | None = None,
        kms_urls: list[str] | None = None,
        node_id: int | None = None,
        memory_mb: int | None = None,
        default_memory_mb: int | None = None,
        max_cvms: int = MAX_CVMS,
        gpu_gate: GpuGate | None = None,
        launcher: str | None = None,
    ) -> None:
        # the operator address the instance_id seeds commit to, so this node can vouch for its CVMs'
        # addresses to a gateway (teecloud.node.vouch); None: random seeds, nothing to vouch for
        self.launcher = launcher
        self.home = Path(home) if home is not None else data_home()
        self.max_cvms = max_cvms
        # the node's memory (default: the host's) and the cap of an app that states none (default: a quarter)
        self.memory_mb = memory_mb if memory_mb is not None else host_memory_mb()
        self.default_memory_mb = (
            default_memory_mb
            if default_memory_mb is not None
            else max(DEFAULT_MIN_APP_MEMORY_MB, self.memory_mb // DEFAULT_APP_MEMORY_SHARE)
        )
        self.store = InstanceStore(self.home)
        # `tee_factory` gives the host's platform (what the node reports: kind, device, vm_config); the docker
        # backend's guest half runs on the same host, so it is the guest's too there. `runtime` is the docker
        # backend's container engine (tests pass a fake one). `gpu_gate` (teecloud.node.gpus): the GPUs the
        # docker backend's guests attest at boot, and the device roots trusted for them.
        self.backend: CvmBackend = backend or make_backend(
            "docker",
            key_provider=key_provider,
            guest_tee_factory=tee_factory,
            **({"runtime": runtime} if runtime is not None else {}),
            **({"gpu_gate": gpu_gate} if gpu_gate is not None else {}),
        )
        self.tee_factory = tee_factory
        self.kms_urls = list(kms_urls or [])
        self.node_id = node_id
        self._cvms: dict[str, _Cvm] = {}
        self._lock = threading.Lock()
        # RLock: a log stream may be closed (and release its slot) by the garbage collector at any point
        self._follow_lock = threading.RLock()
        self._follows: dict[str, int] = {}
        self._closing = False
        self._platform = tee_factory()

    # -- bookkeeping
    def _cvm(self, instance_id: str) -> _Cvm:
        with self._lock:
            return self._cvms.setdefault(instance_id, _Cvm())

    def info(self) -> api.NodeInfo:
        p = self._platform
        return api.NodeInfo(
            version=teecloud.__version__,
            tee=p.kind,
            device_id=bytes(getattr(p, "device_id", b"")).hex(),
            os_image_hash=bytes(getattr(p, "os_image_hash", b"")).hex(),
            kms_urls=self.kms_urls,
            compose=self.backend.describe(),
            node_id=self.node_id,
            cvms=len(self.store.all()),
        )

    def status(self, ref: str, *, with_containers: bool = True) -> api.CvmStatus:
        inst = self.store.get(ref)
        cvm = self._cvm(inst.instance_id)
        st = inst.state()
        try:
            compose = inst.app_compose()
        except (OSError, ValueError):
            compose = {}
        containers: list[api.Container] = []
        urls: list[str] = []
        if with_containers:
            try:
                for c in self._handle(inst, cvm).containers():
                    containers.append(api.Container(**c.__dict__))
                    for p in c.ports:
                        if p["protocol"] == "tcp" and p["host_port"]:
                            urls.append(f"http://{p['host_ip'] or '127.0.0.1'}:{p['host_port']}")
            except NodeError:
                pass
        return api.CvmStatus(
            instance_id=inst.instance_id,
            name=str(st.get("name", "")),
            app_id=inst.info()["app_id"],
            compose_hash=inst.compose_hash().hex(),
            status=cvm.status,
            phase=cvm.phase,
            error=cvm.error,
            desired=str(st.get("desired", "running")),
            public_logs=bool(compose.get("public_logs")),
            created_at=int(st.get("created_at", 0)),
            containers=containers,
            urls=sorted(set(urls)),
            timings={k: round(v, 4) for k, v in cvm.timings.items()},
            dropped_env=list(cvm.booted.dropped_env) if cvm.booted else [],
            history=list(st.get("history", [])),
            app_compose=inst.app_compose_bytes().decode("utf-8", "replace"),
        )

    def list_cvms(self) -> list[api.CvmStatus]:
        return [self.status(i.instance_id) for i in self.store.all()]

    def _handle(self, inst: Instance, cvm: _Cvm) -> Cvm:
        """The CVM booted by this process, or a handle on its backend's leftovers (listing, logs, removal)."""
        return cvm.booted if cvm.booted is not None else self.backend.attach(inst)

    # -- boot machinery
    def _boot_async(self, inst: Instance) -> None:
        cvm = self._cvm(inst.instance_id)
        with cvm.lock:
            if cvm.status in ("booting", "running"):
                return
            cvm.status, cvm.phase, cvm.error, cvm.timings = "booting", "measuring", "", {}
            self._apply_default_memory(inst)
            t = threading.Thread(
                target=self._boot, args=(inst, cvm), name=f"boot-{inst.instance_id[:8]}", daemon=True
            )
            cvm.thread = t
        t.start()

    def _boot(self, inst: Instance, cvm: _Cvm) -> None:
        def progress(phase: str) -> None:
            cvm.phase = phase

        t0 = time.perf_counter()
        try:
            booted = self.backend.launch(inst, inst.limits(), progress=progress)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, NodeError) else f"{type(exc).__name__}: {exc}"
            reason = reason[:MAX_ERROR_CHARS]
            if not isinstance(exc, NodeError):
                log.exception("CVM %s: boot failed", inst.instance_id)
            with cvm.lock:
                cvm.status, cvm.error = "failed", reason
                cvm.phase = exc.phase if isinstance(exc, BootFailed) else cvm.phase
            with contextlib.suppress(NodeError, OSError):
                inst.add_history("boot-failed", state={"last_error": reason}, reason=reason[:500])
            return
        with cvm.lock:
            cvm.booted = booted
            cvm.timings = dict(booted.timings)
            cvm.timings["total"] = time.perf_counter() - t0
            cvm.status, cvm.phase, cvm.error = "running", "healthy", ""
        log.info("CVM %s running (%.2f s)", inst.instance_id, cvm.timings["total"])

    def _wait_idle(self, cvm: _Cvm, timeout: float = BOOT_WAIT_S) -> None:
        t = cvm.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    @contextlib.contextmanager
    def _idle(self, cvm: _Cvm, timeout: float = BOOT_WAIT_S) -> Iterator[None]:
        """Hold the CVM's lock with no boot running. Boots start only under this lock, so none can start
        until the block ends. (Waiting for a boot happens without the lock: its last step takes it.)"""
        deadline = time.monotonic() + timeout
        while True:
            self._wait_idle(cvm, max(0.0, deadline - time.monotonic()))
            cvm.lock.acquire()
            t = cvm.thread
            if t is None or not t.is_alive() or t is threading.current_thread():
                break
            cvm.lock.release()
            if time.monotonic() > deadline:
                raise InstanceStateError(f"the CVM is still booting after {timeout:.0f} s; try again later")
        try:
            yield
        finally:
            cvm.lock.release()

    def _shutdown(self, inst: Instance, cvm: _Cvm) -> None:
        with self._idle(cvm):
            cvm.status, cvm.phase = "stopping", ""
            try:
                self._handle(inst, cvm).stop()
            finally:
                cvm.booted = None
                cvm.status = "stopped"

    # -- lifecycle
    def check(self, name: str | None, app_compose: bytes) -> api.CheckResult:
        """Everything create refuses before it registers the instance: the name is free on this node, the
        app-compose and its compose file pass the whole policy (teecloud.node.compose), every image is on
        the node. `teecloud deploy` calls it (POST /cvms/check) before it registers the app on chain."""
        existing = self.store.all()
        if name is not None and any(i.state().get("name") == name for i in existing):
            raise InstanceStateError(f"a CVM named {name!r} already exists on this node")
        if len(existing) >= self.max_cvms:
            raise InstanceStateError(
                f"this node holds its maximum of {self.max_cvms} CVMs; remove one or deploy to another node"
            )
        _doc, compose = check_app_compose(app_compose)
        images = image_refs(compose)
        self.backend.check_images(images)
        return api.CheckResult(name=name, images=images)

    def launch_record(self, instance_id: str) -> tuple[bytes, bytes]:
        """(app_id, launch nonce) of an instance this node launched (teecloud.node.vouch); ValueError else."""
        try:
            inst = self.store.get(instance_id)
        except NodeError as exc:
            raise ValueError(str(exc)) from exc
        if inst.instance_id != instance_id:  # `get` also takes names and prefixes: only an exact id here
            raise ValueError(f"no instance {instance_id[:16]!r} on this node")
        return inst.app_id, inst.launch_nonce()

    def create(self, req: api.CreateCvmRequest) -> api.CvmStatus:
        app_compose = req.app_compose.encode()
        # (1) every refusal first: nothing is written, registered or booted (so no key is fetched) before
        self.check(req.name, app_compose)
        limits = self._limits(req.cpus, req.memory_mb)
        sys_config = {
            "kms_urls": self.kms_urls,
            "gateway_urls": [],
            "pccs_url": "",
            "docker_registry": "",
            "host_api_url": "",
            "vm_config": vmconfig.to_json(self._platform.vm_config()) or "{}",
        }
        # (2) the instance directory, then (3) the boot (which fetches keys)
        inst = self.store.create(
            app_compose=app_compose,
            app_id=parse_app_id(req.app_id),
            name=req.name,
            encrypted_env=bytes.fromhex(req.encrypted_env) if req.encrypted_env else None,
            user_config=req.user_config,
            sys_config=sys_config,
            limits=limits,
            launcher=self.launcher,
        )
        self._boot_async(inst)
        return self.status(inst.instance_id, with_containers=False)

    def _apply_default_memory(self, inst: Instance) -> None:
        """An instance created before the node set default memory caps boots with the default too."""
        limits = inst.limits()
        if limits.memory_mb is None:
            inst.update_state(
                limits={"cpus": limits.cpus, "memory_mb": self.default_memory_mb, "pids": limits.pids}
            )

    def _limits(self, cpus: float | None, memory_mb: int | None) -> ResourceLimits:
        """The deployment's limits; without a memory limit, the node's default (a share of its memory), so
        no app can take the whole host. A request above the node's memory is refused."""
        total = self.memory_mb
        if memory_mb is not None and total and memory_mb > total:
            raise BadRequest(f"memory_mb {memory_mb} is above this node's memory ({total} MB)")
        if memory_mb is None:
            memory_mb = self.default_memory_mb
        return ResourceLimits(cpus=cpus, memory_mb=memory_mb)

    def start(self, ref: str) -> api.CvmStatus:
        inst = self.store.get(ref)
        inst.update_state(desired="running")
        self._boot_async(inst)
        return self.status(inst.instance_id, with_containers=False)

    def stop(self, ref: str) -> api.CvmStatus:
        inst = self.store.get(ref)
        inst.update_state(desired="stopped")
        self._shutdown(inst, self._cvm(inst.instance_id))
        return self.status(inst.instance_id)

    def restart(self, ref: str) -> api.CvmStatus:
        inst = self.store.get(ref)
        self._shutdown(inst, self._cvm(inst.instance_id))
        return self.start(inst.instance_id)

    def upgrade(self, ref: str, req: api.UpgradeCvmRequest) -> api.CvmStatus:
        inst = self.store.get(ref)
        new = req.app_compose.encode()
        self.check(None, new)
        env = bytes.fromhex(req.encrypted_env) if req.encrypted_env else None
        cvm = self._cvm(inst.instance_id)
        # One critical section from the stop to the start of the new boot: a `start` arriving meanwhile
        # waits, then finds the CVM booting the new compose (it would otherwise boot the old one, or read a
        # half-swapped manifest).
        with self._idle(cvm):
            old_hash = inst.compose_hash().hex()
            self._shutdown(inst, cvm)
            inst.write_manifest(new, env, None)
            inst.add_history(
                "upgraded",
                state={"desired": "running"},
                **{"from": old_hash, "compose_hash": hashlib.sha256(new).hexdigest()},
            )
            self._boot_async(inst)
        return self.status(inst.instance_id, with_containers=False)

    def remove(self, ref: str) -> api.RemoveResult:
        """Remove the CVM for good. Best effort, never half-way: each step runs even when an earlier one
        failed (keys forgotten, volume unmounted, ciphertext shredded, directory deleted); what could not be
        cleaned is returned in `leftovers` (and logged) instead of raised."""
        inst = self.store.get(ref)
        cvm = self._cvm(inst.instance_id)
        leftovers: list[str] = []
        with self._idle(cvm):
            cvm.status, cvm.phase = "removing", ""
            handle, cvm.booted = self._handle(inst, cvm), None  # the node's only reference to the app's keys
            leftovers += handle.remove()
            try:
                self.store.delete(inst)
            except OSError as exc:
                leftovers.append(f"cannot delete the instance directory {inst.dir}: {exc}")
            cvm.status = "removed"
        with self._lock:
            self._cvms.pop(inst.instance_id, None)
        for item in leftovers:
            log.warning("CVM %s removed, but: %s", inst.instance_id, item)
        return api.RemoveResult(removed=inst.instance_id, leftovers=leftovers)

    def _take_follow_slot(self, instance_id: str) -> Callable[[], None]:
        """Count one more `follow` stream of this CVM, or raise TooManyStreams; returns the release."""
        with self._follow_lock:
            if sum(self._follows.values()) >= MAX_FOLLOW_STREAMS:
                raise TooManyStreams(
                    f"this node already serves {MAX_FOLLOW_STREAMS} followed log streams (the limit); "
                    "try again later"
                )
            if self._follows.get(instance_id, 0) >= MAX_FOLLOW_STREAMS_PER_CVM:
                raise TooManyStreams(
                    f"CVM {instance_id} already has {MAX_FOLLOW_STREAMS_PER_CVM} followed log streams (the "
                    "limit); close one or try again later"
                )
            self._follows[instance_id] = self._follows.get(instance_id, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._follow_lock:
                if released:
                    return
                released = True
                left = self._follows.get(instance_id, 1) - 1
                if left > 0:
                    self._follows[instance_id] = left
                else:
                    self._follows.pop(instance_id, None)

        return release

    def follow_streams(self) -> dict[str, int]:
        """Followed log streams open now, per instance id."""
        with self._follow_lock:
            return dict(self._follows)

    def logs(self, ref: str, *, service: str | None, tail: int, follow: bool, public: bool) -> LogSource:
        """The CVM's container output. Close the stream when done: a followed stream holds a process and
        one of the node's follow slots until then."""
        inst = self.store.get(ref)
        if public and not inst.app_compose().get("public_logs"):
            raise PermissionError("this app's logs are not public (app-compose public_logs is false)")
        release = self._take_follow_slot(inst.instance_id) if follow else None
        try:
            stream = self._handle(inst, self._cvm(inst.instance_id)).logs(
                service=service, tail=tail, follow=follow
            )
        except BaseException:
            if release is not None:
                release()
            raise
        if release is not None:
            stream.on_close(release)
        return stream

    def stats(self, ref: str) -> list[dict[str, Any]]:
        inst = self.store.get(ref)
        return self._handle(inst, self._cvm(inst.instance_id)).stats()

    def attestation(self, ref: str, nonce: bytes, *, public: bool) -> api.Attestation:
        """A quote of the CVM over api.attest_report_data(nonce): the caller's nonce behind a fixed domain
        prefix, so no caller can choose the report_data (an RA-TLS binding would then be one request away)."""
        inst = self.store.get(ref)
        cvm = self._cvm(inst.instance_id)
        booted = cvm.booted
        if booted is None:
            raise InstanceStateError(f"CVM {inst.instance_id} is {cvm.status}, not running: no attestation")
        if public and not booted.public_tcbinfo:
            raise PermissionError("this app does not publish its attestation (public_tcbinfo is false)")
        # the backend binds the nonce under the fixed prefix itself: the host never picks the report_data
        a = booted.attestation(nonce)
        return api.Attestation(
            instance_id=inst.instance_id,
            app_id=a.app_id,
            compose_hash=a.compose_hash,
            quote=a.quote,
            event_log=a.event_log,
            nonce=nonce.hex(),
            report_data=a.report_data,
            vm_config=a.vm_config,
            app_compose=a.app_compose,
        )

    # -- node lifecycle
    def reattach(self) -> list[str]:
        """Adopt every CVM whose desired state is running and whose VM an earlier node process left running
        and booted (the qemu backend's VMs outlive the node process; `backend.attach` says whether the guest
        runs): its handle becomes this process's (status running; stop, upgrade and remove reach it), and on
        qemu the node's statements of its endpoints are renewed from now on. Returns the adopted ids; a
        `resume()` after it boots the others (an adopted CVM is not booted again)."""
        adopted = []
        for inst in self.store.all():
            if inst.state().get("desired", "running") != "running":
                continue
            cvm = self._cvm(inst.instance_id)
            with self._idle(cvm):
                if cvm.booted is not None or cvm.status in ("booting", "running"):
                    continue
                handle = self.backend.attach(inst)
                if not handle.booted:
                    continue
                cvm.booted, cvm.timings = handle, dict(handle.timings)
                cvm.status, cvm.phase, cvm.error = "running", "healthy", ""
            adopted.append(inst.instance_id)
            log.info("CVM %s: re-attached to the VM an earlier node process left running", inst.instance_id)
        return adopted

    def resume(self) -> list[str]:
        """Boot every CVM whose desired state is running (after a node or engine restart)."""
        started = []
        for inst in self.store.all():
            if inst.state().get("desired", "running") == "running":
                self._boot_async(inst)
                started.append(inst.instance_id)
        return started

    def wait_all(self, timeout: float = 180.0) -> None:
        for cvm in list(self._cvms.values()):
            self._wait_idle(cvm, timeout)

    def close(self) -> None:
        """Power off every CVM (desired states are kept for the next start)."""
        self._closing = True
        for inst in self.store.all():
            cvm = self._cvm(inst.instance_id)
            try:
                self._shutdown(inst, cvm)
            except NodeError as exc:
                log.warning("CVM %s: %s", inst.instance_id, exc)


# ------------------------------------------------------------------------------------------------ HTTP


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _next_chunk(stream: LogSource) -> bytes | None:
    return next(stream, None)


async def _stream_lines(stream: LogSource, max_bytes: int | None = None) -> AsyncIterator[bytes]:
    """Serve a log stream and close it however the response ends. When the client goes away, Starlette
    cancels the response: the read (a thread blocked on `docker logs --follow`) is abandoned, not awaited,
    and closing the stream kills the process, which ends that thread too. With `max_bytes`, the response
    ends (with a last line saying so) once that much was sent."""
    sent = 0
    try:
        while True:
            chunk = await anyio.to_thread.run_sync(_next_chunk, stream, abandon_on_cancel=True)
            if chunk is None:
                return
            if max_bytes is not None and sent + len(chunk) > max_bytes:
                yield f"[teecloud: output truncated at {max_bytes} bytes; ask for a smaller tail]\n".encode()
                return
            sent += len(chunk)
            yield chunk
    finally:
        stream.close()


def make_node_app(node: Node, *, token: str) -> FastAPI:
    app = FastAPI(title="teecloud node", version=teecloud.__version__)
    app.add_middleware(BoundedBody, max_bytes=NODE_MAX_BODY_BYTES)

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        return secrets.compare_digest(header.encode(), f"Bearer {token}".encode())

    def admin(request: Request) -> None:
        if not authorized(request):
            raise PermissionError("missing or wrong node admin token")

    @app.exception_handler(PermissionError)
    async def _perm(_r: Request, exc: PermissionError) -> JSONResponse:
        return _error(403 if "token" not in str(exc) else 401, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, "invalid request: the body is not valid JSON")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if not where:  # the body itself: not an object, or not sent as application/json
            return _error(
                400, "invalid request: the body must be a JSON object (Content-Type: application/json)"
            )
        return _error(400, f"invalid request: {where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown route (404) or method (405): the same {"error"} shape as every other refusal
        if exc.status_code == 404:
            return _error(404, f"no route {request.method} {request.url.path} (see teecloud.node.api)")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("node API: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error in the node (see its log)")

    @app.exception_handler(NodeError)
    async def _node_error(_r: Request, exc: NodeError) -> JSONResponse:
        if isinstance(exc, InstanceNotFound):
            return _error(404, str(exc))
        if isinstance(exc, ComposeRejected | ValueError):
            return _error(400, str(exc))
        if isinstance(exc, InstanceStateError):
            return _error(409, str(exc))
        if isinstance(exc, RuntimeUnavailable):
            return _error(503, str(exc))
        if isinstance(exc, RuntimeFailed):  # the container engine failed: not the client's mistake, nor ours
            return _error(502, f"the container engine failed: {exc}")
        if isinstance(exc, TooManyStreams):
            return _error(429, str(exc))
        return _error(500, str(exc))

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/info")
    def info() -> api.NodeInfo:
        return node.info()

    @app.get("/cvms", dependencies=[Depends(admin)])
    def list_cvms() -> list[api.CvmStatus]:
        return node.list_cvms()

    @app.post("/cvms/check", dependencies=[Depends(admin)])
    def check(req: api.CheckCvmRequest) -> api.CheckResult:
        return node.check(req.name, req.app_compose.encode())

    @app.post("/cvms", dependencies=[Depends(admin)])
    def create(req: api.CreateCvmRequest) -> api.CvmStatus:
        return node.create(req)

    @app.get("/cvms/{ref}", dependencies=[Depends(admin)])
    def get(ref: str) -> api.CvmStatus:
        return node.status(ref)

    @app.post("/cvms/{ref}/upgrade", dependencies=[Depends(admin)])
    def upgrade(ref: str, req: api.UpgradeCvmRequest) -> api.CvmStatus:
        return node.upgrade(ref, req)

    @app.post("/cvms/{ref}/{action}", dependencies=[Depends(admin)])
    def act(ref: str, action: str) -> api.CvmStatus:
        if action == "start":
            return node.start(ref)
        if action == "stop":
            return node.stop(ref)
        if action == "restart":
            return node.restart(ref)
        raise InstanceNotFound(f"unknown action {action!r} (start, stop, restart, upgrade)")

    @app.delete("/cvms/{ref}", dependencies=[Depends(admin)])
    def remove(ref: str) -> api.RemoveResult:
        return node.remove(ref)

    @app.get("/cvms/{ref}/stats", dependencies=[Depends(admin)])
    def stats(ref: str) -> list[dict[str, Any]]:
        return node.stats(ref)

    @app.get("/cvms/{ref}/logs")
    def logs(
        request: Request, ref: str, service: str | None = None, tail: int = 200, follow: bool = False
    ) -> StreamingResponse:
        stream = node.logs(
            ref,
            service=service,
            tail=max(0, min(tail, MAX_LOG_TAIL)),
            follow=follow,
            public=not authorized(request),
        )
        limit = None if follow else MAX_LOG_RESPONSE_BYTES
        return StreamingResponse(_stream_lines(stream, limit), media_type="text/plain")

    @app.get("/cvms/{ref}/attestation")
    def attestation(request: Request, ref: str, nonce: str = "", report_data: str = "") -> api.Attestation:
        # `report_data` is the route's old parameter name: accepted, and treated as the nonce it always was
        text = nonce or report_data
        try:
            raw = parse_hex(text, name="nonce")
        except HexError as exc:
            raise BadRequest(str(exc)) from None
        if len(raw) > api.MAX_ATTEST_NONCE:
            raise BadRequest(f"nonce is at most {api.MAX_ATTEST_NONCE} bytes")
        return node.attestation(ref, raw, public=not authorized(request))

    return app


class NodeServer:
    """The node API on 127.0.0.1 in a background thread."""

    def __init__(
        self,
        node: Node,
        *,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ServeLimits = NODE_API,
    ) -> None:
        self.node = node
        self.host = host
        self.limits = limits
        self._server = LimitedServer(
            limited_config(make_node_app(node, token=token), limits, host=host, port=port),
            limits,
            name="node API listener",
        )
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> NodeServer:
        self._thread = threading.Thread(target=self._server.run, name="teecloud-node-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeUnavailable(f"the node API did not start on {self.host} (port in use?)")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
