"""The worker node's HTTP contract: request/response models and a small client. Other components (the
cloud orchestration, the CLI, the bench) import only this module from the node.

Routes (JSON; management routes need `Authorization: Bearer <node admin token>`):
    GET    /health                                  {"ok": true}                                 public
    GET    /info                                    NodeInfo                                      public
    GET    /cvms                                    [CvmStatus]
    POST   /cvms/check            CheckCvmRequest   CheckResult: what create would refuse, refused now
                                                    (name taken, compose policy, absent images)
    POST   /cvms                  CreateCvmRequest  CvmStatus (boot continues in the background); the
                                                    same checks first, before anything is written
    GET    /cvms/{id}                               CvmStatus
    POST   /cvms/{id}/start | /stop | /restart      CvmStatus
    POST   /cvms/{id}/upgrade     UpgradeCvmRequest CvmStatus
    DELETE /cvms/{id}                               RemoveResult {"removed": id, "leftovers": [what remains]}
    GET    /cvms/{id}/logs?service=&tail=&follow=   text/plain stream    public iff app-compose public_logs
                                                    (follow: at most a few streams per CVM and per node, 429)
    GET    /cvms/{id}/stats                         [dict]
    GET    /cvms/{id}/attestation?nonce=hex         Attestation          public iff public_tcbinfo (default)
                                                    report_data = attest_report_data(nonce), never the raw
                                                    nonce (see ATTEST_DOMAIN)
Errors: {"error": "..."} with 400 (bad request), 401/403 (token), 404 (no such CVM), 409 (wrong state),
429 (too many log streams), 503 (runtime unavailable), 500 (node fault).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from teecloud.node.errors import NodeError

__all__ = [
    "ATTEST_DOMAIN",
    "MAX_ATTEST_NONCE",
    "Attestation",
    "CheckCvmRequest",
    "CheckResult",
    "CreateCvmRequest",
    "CvmStatus",
    "NodeApiError",
    "NodeClient",
    "NodeInfo",
    "RemoveResult",
    "UpgradeCvmRequest",
    "attest_report_data",
]

MAX_APP_COMPOSE = 512 * 1024
# The node's attestation route quotes over sha512(ATTEST_DOMAIN ‖ nonce), never over caller-chosen bytes:
# a quote whose report_data a caller picks could equal an RA-TLS binding sha512("ratls-cert:" ‖ SPKI) and be
# replayed in a certificate for a key the caller holds (issue 10, F1). The agent's GetQuote stays raw.
ATTEST_DOMAIN = b"teecloud-attest:"
MAX_ATTEST_NONCE = 64


def attest_report_data(nonce: bytes) -> bytes:
    """The 64-byte report_data of the node's attestation for `nonce` (what a verifier must expect)."""
    if len(nonce) > MAX_ATTEST_NONCE:
        raise ValueError(f"the nonce is at most {MAX_ATTEST_NONCE} bytes")
    return hashlib.sha512(ATTEST_DOMAIN + bytes(nonce)).digest()


_EVEN_HEX = r"^(?:[0-9a-fA-F]{2})*$"  # whole bytes: "0" would pass [0-9a-f]* and then fail bytes.fromhex


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateCvmRequest(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
    app_compose: str = Field(max_length=MAX_APP_COMPOSE)  # the exact app-compose.json text
    app_id: str = Field(pattern=r"^(0x)?[0-9a-fA-F]{40}$")
    encrypted_env: str | None = Field(default=None, max_length=512 * 1024, pattern=_EVEN_HEX)
    user_config: str | None = Field(default=None, max_length=64 * 1024)
    cpus: float | None = Field(default=None, gt=0, le=1024)
    memory_mb: int | None = Field(default=None, ge=6)


class CheckCvmRequest(_Model):
    # the CVM name to create (must be free), or None to check a compose for an upgrade
    name: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"
    )
    app_compose: str = Field(max_length=MAX_APP_COMPOSE)


class CheckResult(BaseModel):
    ok: bool = True
    name: str | None = None
    images: list[str] = []  # present on the node


class UpgradeCvmRequest(_Model):
    app_compose: str = Field(max_length=MAX_APP_COMPOSE)
    encrypted_env: str | None = Field(default=None, max_length=512 * 1024, pattern=_EVEN_HEX)


class Container(BaseModel):
    service: str
    container: str
    state: str
    health: str | None = None
    exit_code: int = 0
    ports: list[dict[str, Any]] = []


class CvmStatus(BaseModel):
    instance_id: str
    name: str
    app_id: str
    compose_hash: str
    status: str  # booting | running | stopping | stopped | failed
    phase: str = ""  # boot phase while booting (teecloud.node.runtime.BOOT_PHASES)
    error: str = ""
    desired: str = "running"
    public_logs: bool = False
    created_at: int = 0
    containers: list[Container] = []
    urls: list[str] = []
    timings: dict[str, float] = {}
    dropped_env: list[str] = []
    history: list[dict[str, Any]] = []
    app_compose: str = ""  # the current app-compose.json (public: it is what the app's hash commits to)


class RemoveResult(BaseModel):
    removed: str  # the instance id; its directory, keys and ciphertext are gone
    leftovers: list[str] = []  # what could not be cleaned up (e.g. containers while the engine is down)


class NodeInfo(BaseModel):
    version: str
    tee: str
    device_id: str
    os_image_hash: str
    kms_urls: list[str]
    compose: str
    node_id: int | None = None
    cvms: int = 0


class Attestation(BaseModel):
    instance_id: str
    app_id: str
    compose_hash: str
    quote: str
    event_log: str
    nonce: str = ""  # hex, as sent; report_data == attest_report_data(nonce)
    report_data: str
    vm_config: str
    app_compose: str


class NodeApiError(NodeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NodeClient:
    """httpx client of the node API (the transport can be swapped, e.g. for an ASGI app in tests)."""

    def __init__(
        self, base_url: str, token: str | None = None, *, timeout: float = 60.0, transport: Any = None
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _req(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise NodeApiError(0, f"cannot reach the node at {self.base_url}: {exc}") from exc
        if r.status_code >= 400:
            try:
                msg = r.json().get("error") or r.text
            except ValueError:
                msg = r.text
            raise NodeApiError(r.status_code, str(msg))
        return r.json()

    def info(self) -> NodeInfo:
        return NodeInfo.model_validate(self._req("GET", "/info"))

    def list_cvms(self) -> list[CvmStatus]:
        return [CvmStatus.model_validate(x) for x in self._req("GET", "/cvms")]

    def check(self, req: CheckCvmRequest) -> CheckResult:
        """Raises NodeApiError (400 policy / 409 name taken) with what create would refuse."""
        return CheckResult.model_validate(self._req("POST", "/cvms/check", json=req.model_dump()))

    def create(self, req: CreateCvmRequest) -> CvmStatus:
        return CvmStatus.model_validate(self._req("POST", "/cvms", json=req.model_dump()))

    def get(self, ref: str) -> CvmStatus:
        return CvmStatus.model_validate(self._req("GET", f"/cvms/{ref}"))

    def action(self, ref: str, action: str) -> CvmStatus:
        return CvmStatus.model_validate(self._req("POST", f"/cvms/{ref}/{action}"))

    def upgrade(self, ref: str, req: UpgradeCvmRequest) -> CvmStatus:
        return CvmStatus.model_validate(self._req("POST", f"/cvms/{ref}/upgrade", json=req.model_dump()))

    def remove(self, ref: str) -> RemoveResult:
        return RemoveResult.model_validate(self._req("DELETE", f"/cvms/{ref}"))

    def stats(self, ref: str) -> list[dict[str, Any]]:
        return list(self._req("GET", f"/cvms/{ref}/stats"))

    def attestation(self, ref: str, nonce: bytes = b"") -> Attestation:
        """A quote over attest_report_data(nonce); checked here to bind that value (the full check of the
        quote is teecloud.cloud.verify's)."""
        att = Attestation.model_validate(
            self._req("GET", f"/cvms/{ref}/attestation", params={"nonce": nonce.hex()})
        )
        if att.report_data != attest_report_data(nonce).hex():
            raise NodeApiError(0, "the node's attestation does not bind our nonce (report_data differs)")
        return att

    def logs(
        self, ref: str, *, service: str | None = None, tail: int = 200, follow: bool = False
    ) -> Iterator[str]:
        params: dict[str, Any] = {"tail": tail, "follow": follow}
        if service:
            params["service"] = service
        try:
            with self._http.stream("GET", f"/cvms/{ref}/logs", params=params, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    try:
                        msg = r.json().get("error") or r.text
                    except ValueError:
                        msg = r.text
                    raise NodeApiError(r.status_code, str(msg))
                yield from r.iter_lines()
        except httpx.HTTPError as exc:
            raise NodeApiError(0, f"cannot reach the node at {self.base_url}: {exc}") from exc

    def wait(
        self,
        ref: str,
        *,
        until: tuple[str, ...] = ("running", "failed", "stopped"),
        timeout: float = 120.0,
        on_phase: Callable[[CvmStatus], None] | None = None,
        poll: float = 0.05,
    ) -> CvmStatus:
        """Poll until the CVM's status is in `until`; `on_phase` sees every change of status/phase."""
        deadline = time.monotonic() + timeout
        last: tuple[str, str] | None = None
        while True:
            st = self.get(ref)
            if (st.status, st.phase) != last:
                last = (st.status, st.phase)
                if on_phase is not None:
                    on_phase(st)
            if st.status in until:
                return st
            if time.monotonic() > deadline:
                raise NodeApiError(0, f"CVM {ref} still {st.status}/{st.phase} after {timeout:.0f} s")
            time.sleep(poll)
