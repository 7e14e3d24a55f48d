"""PCCS (Intel Provisioning Certification Caching Service) client with an on-disk cache, and a small
PCCS-compatible server over a CollateralStore.

Endpoints follow Intel's PCS/PCCS API v4 ("Intel SGX and Intel TDX PCCS API", v4):

    GET /{sgx|tdx}/certification/v4/tcb?fmspc=F     {"tcbInfo": {...}, "signature": hex}
                                                    header TCB-Info-Issuer-Chain (URL-encoded PEM)
    GET /{sgx|tdx}/certification/v4/qe/identity     {"enclaveIdentity": {...}, "signature": hex}
                                                    header SGX-Enclave-Identity-Issuer-Chain
    GET /sgx/certification/v4/pckcrl?ca=C&encoding=der   DER CRL, header SGX-PCK-CRL-Issuer-Chain
    GET /sgx/certification/v4/rootcacrl             DER CRL (some PCCS answer hex text)

The TCB info and QE identity signatures cover the exact bytes of those JSON members, so the client cuts
them out of the response text rather than re-serialising them. The cache holds one QuoteCollateralV3
JSON per (tee, ca, FMSPC) and is used until the earliest nextUpdate among TCB info, QE identity and both
CRLs; then it is fetched again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote as urlquote
from urllib.parse import unquote

import dcap_qvl
import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from teecloud import _json
from teecloud._fs import atomic_write
from teecloud.collateral._http import bounded_get
from teecloud.collateral.errors import CollateralError, InvalidCollateral, why
from teecloud.collateral.store import CollateralEntry, CollateralStore, describe_collateral

if TYPE_CHECKING:  # the server side (uvicorn) is imported only by whoever serves
    from teecloud._serve import LimitedServer, ServeLimits

__all__ = [
    "MAX_RESPONSE_SIZE",
    "PccsClient",
    "collateral_next_update",
    "make_pccs_app",
    "pccs_server",
    "serve_collateral",
]

MAX_RESPONSE_SIZE = 1024 * 1024
_HEX = re.compile(rb"^[0-9a-fA-F\s]+$")
_FMSPC = re.compile(r"[0-9a-fA-F]{12}")
log = logging.getLogger(__name__)


def _iso_to_unix(text: str) -> int:
    return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def collateral_next_update(raw: bytes) -> int:
    """Unix time of the earliest nextUpdate among TCB info, QE identity, PCK CRL and root CA CRL."""
    entry = describe_collateral(raw)
    times = [_iso_to_unix(entry.next_update)]
    for key in ("pck_crl", "root_ca_crl"):
        try:
            crl = x509.load_der_x509_crl(bytes.fromhex(entry.doc[key]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidCollateral(f"collateral {key} is not a hex DER CRL: {why(exc)}") from exc
        if crl.next_update_utc is not None:
            times.append(int(crl.next_update_utc.timestamp()))
    return min(times)


def _raw_member(text: str, key: str) -> str:
    """The exact source text of top-level member `key` of a JSON object (signatures cover these bytes)."""
    m = re.search(r'"' + re.escape(key) + r'"\s*:\s*', text)
    if m is None:
        raise InvalidCollateral(f"PCCS response has no {key!r}")
    try:
        _, end = json.JSONDecoder().raw_decode(text, m.end())
    except ValueError as exc:
        raise InvalidCollateral(f"PCCS response member {key!r} is not JSON: {exc}") from exc
    return text[m.end() : end]


class PccsClient:
    """Fetches QuoteCollateralV3 JSON for an FMSPC from a PCCS, caching it on disk by FMSPC.

    `transport` replaces the HTTP transport (tests use httpx.MockTransport or a live 127.0.0.1 server).
    """

    def __init__(
        self,
        base_url: str,
        cache_dir: str | Path,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        max_response_size: int = MAX_RESPONSE_SIZE,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout
        self.transport = transport
        self.max_response_size = max_response_size
        self.fetches = 0
        self.cache_hits = 0

    # -------------------------------------------------------------------------------------- cache

    def _cache_path(self, tee: str, ca: str, fmspc: str) -> Path:
        return self.cache_dir / f"{tee}-{ca}-{fmspc}.json"

    def cached(self, fmspc: str, *, ca: str = "processor", tee: str = "tdx", now: int) -> bytes | None:
        """The cached collateral if it is still before its nextUpdate at `now`, else None."""
        path = self._cache_path(tee, ca, fmspc.upper())
        try:
            raw = path.read_bytes()
            if now < collateral_next_update(raw):
                return raw
        except (OSError, InvalidCollateral):
            pass
        return None

    def get_collateral(self, fmspc: str, *, ca: str = "processor", tee: str = "tdx", now: int) -> bytes:
        """QuoteCollateralV3 JSON for `fmspc`: from the cache until its nextUpdate, else from the PCCS."""
        fmspc = fmspc.upper()
        if not re.fullmatch(r"[0-9A-F]{12}", fmspc):
            raise ValueError(f"FMSPC must be 12 hex digits, got {fmspc!r}")
        if ca not in ("processor", "platform"):
            raise ValueError(f"ca must be 'processor' or 'platform', got {ca!r}")
        if tee not in ("tdx", "sgx"):
            raise ValueError(f"tee must be 'tdx' or 'sgx', got {tee!r}")
        hit = self.cached(fmspc, ca=ca, tee=tee, now=now)
        if hit is not None:
            self.cache_hits += 1
            return hit
        raw = self._fetch(fmspc, ca, tee)
        next_update = collateral_next_update(raw)
        if next_update <= now:
            raise InvalidCollateral(
                f"the PCCS at {self.base_url} served collateral for FMSPC {fmspc} that expired at "
                f"{dt.datetime.fromtimestamp(next_update, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
            )
        atomic_write(self._cache_path(tee, ca, fmspc), raw, mode=0o644)
        return raw

    # ------------------------------------------------------------------------------------------ HTTP

    def _get(self, client: httpx.Client, path: str, params: Mapping[str, str]) -> httpx.Response:
        url = f"{self.base_url}{path}"
        return bounded_get(
            client,
            url,
            name="PCCS",
            base_url=self.base_url,
            path=path,
            max_bytes=self.max_response_size,
            params=params,
            not_found=f"PCCS at {self.base_url} has nothing at {path} ({dict(params)})",
        )

    @staticmethod
    def _chain(resp: httpx.Response, header: str) -> str:
        value = resp.headers.get(header)
        if not value:
            raise InvalidCollateral(f"PCCS response lacks the {header} header")
        return unquote(value)

    @staticmethod
    def _der(body: bytes) -> str:
        # Intel PCS answers DER; some PCCS builds answer the DER as hex text.
        if body and _HEX.match(body):
            return body.decode().strip().lower()
        return body.hex()

    def _fetch(self, fmspc: str, ca: str, tee: str) -> bytes:
        self.fetches += 1
        with httpx.Client(timeout=self.timeout, transport=self.transport) as client:
            tcb = self._get(client, f"/{tee}/certification/v4/tcb", {"fmspc": fmspc})
            qe = self._get(client, f"/{tee}/certification/v4/qe/identity", {"fmspc": fmspc})
            pck_crl = self._get(
                client, "/sgx/certification/v4/pckcrl", {"ca": ca, "encoding": "der", "fmspc": fmspc}
            )
            root_crl = self._get(client, "/sgx/certification/v4/rootcacrl", {"fmspc": fmspc})
        try:
            tcb_doc = _json.loads(tcb.text)
            qe_doc = _json.loads(qe.text)
            collateral: dict[str, Any] = {
                "pck_crl_issuer_chain": self._chain(pck_crl, "SGX-PCK-CRL-Issuer-Chain"),
                "root_ca_crl": self._der(root_crl.content),
                "pck_crl": self._der(pck_crl.content),
                "tcb_info_issuer_chain": self._chain(tcb, "TCB-Info-Issuer-Chain"),
                "tcb_info": _raw_member(tcb.text, "tcbInfo"),
                "tcb_info_signature": str(tcb_doc["signature"]),
                "qe_identity_issuer_chain": self._chain(qe, "SGX-Enclave-Identity-Issuer-Chain"),
                "qe_identity": _raw_member(qe.text, "enclaveIdentity"),
                "qe_identity_signature": str(qe_doc["signature"]),
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidCollateral(f"PCCS at {self.base_url} sent an unusable answer: {why(exc)}") from exc
        raw = json.dumps(collateral, indent=2).encode()
        try:
            dcap_qvl.QuoteCollateralV3.from_json(raw.decode())
        except ValueError as exc:
            raise InvalidCollateral(f"PCCS collateral does not parse: {exc}") from exc
        got = describe_collateral(raw).fmspc
        if got != fmspc:
            raise InvalidCollateral(f"PCCS returned TCB info for FMSPC {got} when asked for {fmspc}")
        return raw


# ----------------------------------------------------------------------------------------------- server


def _crl_ca(entry: CollateralEntry) -> str:
    chain = str(entry.doc.get("pck_crl_issuer_chain", ""))
    first = x509.load_pem_x509_certificates(chain.encode())[0] if "BEGIN" in chain else None
    name = first.subject.rfc4514_string() if first is not None else ""
    return "platform" if "Platform" in name else "processor"


def make_pccs_app(store: CollateralStore | str | Path | Mapping[str, bytes]) -> Any:
    """A FastAPI app answering the PCCS v4 collateral endpoints from `store` (see the module docstring).
    The FMSPC-independent endpoints accept `fmspc` as an extra query parameter to pick an entry; without
    it they serve the newest entry of that TEE kind."""
    from fastapi import FastAPI, HTTPException, Request, Response
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    st = CollateralStore.from_source(store)
    app = FastAPI(title="teecloud PCCS (collateral from a local store)", docs_url=None, redoc_url=None)

    # Errors: {"error": "..."}; 400 for a malformed request (Intel PCS answers 400 "Invalid request
    # parameters"), 404 when the store has nothing for it.
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = (
            exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else "no such PCCS endpoint"
        )
        return JSONResponse({"error": str(detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return JSONResponse(
            {"error": f"invalid request parameter {where}: {first.get('msg', 'invalid')}"}, status_code=400
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("PCCS: %s failed", request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error in the PCCS (see its log)"}, status_code=500)

    def check_fmspc(fmspc: str | None) -> None:
        if fmspc is not None and not _FMSPC.fullmatch(fmspc):
            raise HTTPException(400, f"fmspc must be 12 hex digits, got {fmspc[:32]!r}")

    def check_ca(ca: str) -> None:
        if ca not in ("processor", "platform"):
            raise HTTPException(400, f"ca must be 'processor' or 'platform', got {ca[:32]!r}")

    def pick(tee: str, fmspc: str | None) -> CollateralEntry:
        try:
            return st.entry(fmspc) if fmspc else st.latest(tee)
        except CollateralError as exc:
            raise HTTPException(404, str(exc)) from exc

    def check_tee(tee: str) -> None:
        if tee not in ("sgx", "tdx"):
            raise HTTPException(404, "unknown TEE")

    @app.get("/{tee}/certification/v4/tcb", response_model=None)
    def tcb(tee: str, fmspc: str) -> Response:
        check_tee(tee)
        check_fmspc(fmspc)
        e = pick(tee, fmspc)
        if e.tee != tee:
            raise HTTPException(404, f"no {tee.upper()} TCB info for FMSPC {fmspc.upper()}")
        body = '{"tcbInfo":' + e.doc["tcb_info"] + ',"signature":"' + e.doc["tcb_info_signature"] + '"}'
        headers = {"TCB-Info-Issuer-Chain": urlquote(e.doc["tcb_info_issuer_chain"])}
        return Response(body, media_type="application/json", headers=headers)

    @app.get("/{tee}/certification/v4/qe/identity", response_model=None)
    def qe_identity(tee: str, fmspc: str | None = None) -> Response:
        check_tee(tee)
        check_fmspc(fmspc or None)
        e = pick(tee, fmspc)
        body = (
            '{"enclaveIdentity":'
            + e.doc["qe_identity"]
            + ',"signature":"'
            + e.doc["qe_identity_signature"]
            + '"}'
        )
        headers = {"SGX-Enclave-Identity-Issuer-Chain": urlquote(e.doc["qe_identity_issuer_chain"])}
        return Response(body, media_type="application/json", headers=headers)

    @app.get("/sgx/certification/v4/pckcrl", response_model=None)
    def pckcrl(ca: str, encoding: str = "pem", fmspc: str | None = None) -> Response:
        check_ca(ca)
        check_fmspc(fmspc or None)
        if encoding not in ("pem", "der"):
            raise HTTPException(400, f"encoding must be 'pem' or 'der', got {encoding[:32]!r}")
        if fmspc and st.get(fmspc):
            candidates = [st.entry(fmspc)]
        else:
            candidates = [st.entry(f) for f in st.fmspcs()]
        matching = [e for e in candidates if _crl_ca(e) == ca]
        if not matching:
            raise HTTPException(404, f"no PCK CRL for ca={ca}")
        e = max(matching, key=lambda x: x.issue_date)
        der = bytes.fromhex(e.doc["pck_crl"])
        headers = {"SGX-PCK-CRL-Issuer-Chain": urlquote(e.doc["pck_crl_issuer_chain"])}
        if encoding == "der":
            return Response(der, media_type="application/pkix-crl", headers=headers)
        pem = x509.load_der_x509_crl(der).public_bytes(Encoding.PEM)
        return Response(pem, media_type="application/x-pem-file", headers=headers)

    @app.get("/sgx/certification/v4/rootcacrl", response_model=None)
    def rootcacrl(fmspc: str | None = None) -> Response:
        check_fmspc(fmspc or None)
        if fmspc and st.get(fmspc):
            e = st.entry(fmspc)
        else:
            entries = [st.entry(f) for f in st.fmspcs()]
            if not entries:
                raise HTTPException(404, "no collateral")
            e = max(entries, key=lambda x: x.issue_date)
        return Response(bytes.fromhex(e.doc["root_ca_crl"]), media_type="application/pkix-crl")

    return app


def pccs_server(
    source: CollateralStore | str | Path | Mapping[str, bytes],
    host: str = "127.0.0.1",
    port: int = 8081,
    *,
    limits: ServeLimits | None = None,
) -> LimitedServer:
    """A server (not yet running) for `source`, with the listener limits of teecloud._serve (PCCS)."""
    from teecloud._serve import PCCS, LimitedServer, limited_config

    limits = limits or PCCS
    return LimitedServer(
        limited_config(make_pccs_app(source), limits, host=host, port=port), limits, name="PCCS listener"
    )


def serve_collateral(
    source: CollateralStore | str | Path | Mapping[str, bytes],
    host: str = "127.0.0.1",
    port: int = 8081,
    *,
    limits: ServeLimits | None = None,
) -> None:
    """Serve `source` (a directory of `<FMSPC>.json`, a file, or a mapping) as a PCCS. Blocks."""
    pccs_server(source, host, port, limits=limits).run()
