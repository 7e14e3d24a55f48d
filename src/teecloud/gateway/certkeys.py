"""A published quote per certificate key: anyone can check that the key a gateway's TLS certificate carries is
held inside a TEE (and, from the quote's event log, by which code).

Binding (the construction of the inference app's key set, docs/ai.md; RFC 8785 JCS, hex strings):

    report_data = sha256(JCS({"purpose": "teecloud:gateway-cert-key", "spki_sha256": hex(sha256(SPKI DER)),
                              "key_origin": "kms:<key path>" | "process"}))
                  zero-padded to TDX's 64 bytes ("key_origin" is left out of the JCS object for an entry
                  without one: the earlier documents' binding)

Document, served at `GET /.well-known/teecloud/cert-keys` (CERT_KEYS_PATH) on the gateway's registration
listener (public HTTPS; the document authenticates itself, so the transport need not be trusted):

    {"purpose": "teecloud:gateway-cert-key",
     "keys": [{"role": "public" | "registration" | "dev-ca", "spki_sha256": hex, "names": [...],
               "not_after": int, "key_origin": str, "quote": hex, "event_log": dstack event-log JSON text}]}

What binds what:
- the quote binds the SPKI hash and `key_origin` to the measured app (app_id, compose hash in the event log)
  of the TEE that took it: that app's code held the key and stated where it came from. The quote is taken
  when the certificate is made, after the gateway's boot (a renewal, months later): it is not boot-time
  evidence, so it says nothing about boot beyond what the measured app_id implies;
- `key_origin` "kms:<path>": the gateway's code states the key is derived from the app keys the KMS released
  to the gateway app at boot (teecloud.gateway.kmskeys; the KMS releases them only to boot-time evidence of
  an app KmsAuth allows). Nobody outside can recompute that derivation (it needs the app key): it is the
  measured code's statement, as trustworthy as that code. "process": born in the gateway process;
- `role`, `names` and `not_after` are informational (not covered by the quote); `spki_sha256` only selects
  an entry.

The checker (`check_cert_key`) decides from the quote and the key presented on the wire:
  (1) presented   the server's certificate (as received in the TLS handshake) parses; its SPKI is hashed
  (2) published   the document parses (strict: known fields, bounded sizes) and has an entry for that
                  SPKI hash; none means the key is not vouched for (a stale document after a renewal, or a
                  key no TEE holds)
  (3) quote       the entry's quote and event log verify under the verifier's policy (teecloud.peer:
                  signatures, collateral, TCB, RTMR replay; simulated evidence only where a development root
                  is trusted, and then reported as simulated)
  (4) binding     the quote's report_data equals the binding recomputed from the presented SPKI
  (5) app         optionally, the measured app_id is the expected one (the KMS's `gateway_app_id`)

Signature chain (an entry's optional `kms_signature`, when the gateway's keys come from the KMS): a statement
by the gateway app's KMS-derived key that anyone holding the KMS's k256 root (or threshold group) public key
checks without trusting the gateway, the TEE vendor or the document's transport:

    statement  = sha256(JCS({"purpose": "teecloud:gateway-cert-key-signature", "spki_sha256": hex,
                             "domain": <the gateway's base domain>, "not_after": <the certificate's, int>}))
    signature  = recoverable secp256k1 (r||s||v) over `statement` by the signing key (kmskeys.CertKeySigner:
                 GetKey("teecloud-gateway/v1/cert-key-signing"))
    signature_chain = the signing key's GetKey chain (teecloud.keys.sigchain): [app key over
                 keccak256("teecloud:gateway-cert-key-signing:<hex(signing key)>"), KMS root over
                 keccak256("dstack-kms-issued:" || app_id || app key)]

    "kms_signature": {"domain", "app_id": hex, "signing_key": hex (33 B), "signature": hex (65 B),
                      "signature_chain": [hex, hex]}

`check_cert_key_signature` decides from the key presented on the wire:
  (1) presented   as above; its SPKI hash and not_after are taken from the presented certificate
  (2) published   an entry for that SPKI hash carrying a kms_signature
  (3) signature   the signature over the statement recomputed from (1) and the entry's domain recovers to
                  the entry's signing key (a tampered signature, a substituted key, another certificate's
                  not_after or another domain fail here)
  (4) chain       the signing key's chain verifies up to the given KMS root for the entry's app_id (another
                  app's chain, or a chain under another KMS, fail here)
  (5) app         optionally, that app_id is the expected one (the KMS's `gateway_app_id`)
  (6) domain      optionally, the signed domain is the expected one
What it shows: the KMS released keys to app_id (only to boot-time evidence of code KmsAuth allows for it),
and whoever holds that app's keys vouched for this certificate key for this domain until not_after.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import httpx
import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teecloud.gateway.errors import GatewayError, GatewayUsageError
from teecloud.gateway.kmskeys import CERT_KEY_SIGNING_PURPOSE, CertKeySigner, is_key_origin
from teecloud.keys.errors import KeysError
from teecloud.keys.ratls import QuoteSource, event_log_json
from teecloud.keys.sigchain import recover_k256, verify_key_signature_chain
from teecloud.peer import PeerRejected, PeerVerifier

__all__ = [
    "CERT_KEYS_PATH",
    "CERT_KEY_PURPOSE",
    "CERT_KEY_SIGNATURE_PURPOSE",
    "CertKeyPublisher",
    "CertKeyRefused",
    "CertKeySignatureVerdict",
    "CertKeyVerdict",
    "KmsSignature",
    "PublishedKey",
    "cert_key_report_data",
    "cert_key_statement",
    "check_cert_key",
    "check_cert_key_signature",
    "fetch_document",
    "parse_document",
    "presented_cert",
]

CERT_KEYS_PATH = "/.well-known/teecloud/cert-keys"
CERT_KEY_PURPOSE = "teecloud:gateway-cert-key"
CERT_KEY_SIGNATURE_PURPOSE = "teecloud:gateway-cert-key-signature"
MAX_DOCUMENT_BYTES = 1 << 20
MAX_KEYS = 16
MAX_QUOTE_BYTES = 64 * 1024
MAX_EVENT_LOG_BYTES = 512 * 1024
MAX_NAMES = 16
MAX_NESTING = 8  # the document's own shape needs 4
ROLES = ("public", "registration", "dev-ca")
_ENTRY_FIELDS = {"role", "spki_sha256", "names", "not_after", "quote", "event_log"}
_OPTIONAL_FIELDS = {"key_origin", "kms_signature"}
_SIGNATURE_FIELDS = {"domain", "app_id", "signing_key", "signature", "signature_chain"}


class CertKeyRefused(GatewayError):
    """The presented certificate key is not shown to be TEE-held; `step` names the failing check."""

    def __init__(self, reason: str, *, step: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.reason = reason
        self.step = step


def spki_sha256(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def cert_key_report_data(spki_digest: bytes, key_origin: str = "") -> bytes:
    """The 64-byte report_data binding a certificate key (its SPKI's sha256) and, when given, its origin,
    for CERT_KEY_PURPOSE."""
    if len(spki_digest) != 32:
        raise GatewayUsageError("spki_sha256 is 32 bytes")
    doc = {"purpose": CERT_KEY_PURPOSE, "spki_sha256": spki_digest.hex()}
    if key_origin:
        doc["key_origin"] = key_origin
    return hashlib.sha256(rfc8785.dumps(doc)).digest().ljust(64, b"\x00")


def cert_key_statement(spki_digest: bytes, domain: str, not_after: int) -> bytes:
    """The 32-byte digest the gateway app's signing key signs for a certificate key (module docstring)."""
    if len(spki_digest) != 32:
        raise GatewayUsageError("spki_sha256 is 32 bytes")
    doc: dict[str, str | int] = {
        "purpose": CERT_KEY_SIGNATURE_PURPOSE,
        "spki_sha256": spki_digest.hex(),
        "domain": domain,
        "not_after": not_after,
    }
    return hashlib.sha256(rfc8785.dumps(doc)).digest()


@dataclass(frozen=True)
class KmsSignature:
    domain: str
    app_id: bytes
    signing_key: bytes
    signature: bytes
    signature_chain: tuple[bytes, bytes]

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "app_id": self.app_id.hex(),
            "signing_key": self.signing_key.hex(),
            "signature": self.signature.hex(),
            "signature_chain": [s.hex() for s in self.signature_chain],
        }


@dataclass(frozen=True)
class PublishedKey:
    role: str
    spki_sha256: bytes
    names: tuple[str, ...]
    not_after: int
    quote: bytes
    event_log: str
    key_origin: str = ""  # "" only in earlier documents (not covered then)
    kms_signature: KmsSignature | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": self.role,
            "spki_sha256": self.spki_sha256.hex(),
            "names": list(self.names),
            "not_after": self.not_after,
            "quote": self.quote.hex(),
            "event_log": self.event_log,
        }
        if self.key_origin:
            out["key_origin"] = self.key_origin
        if self.kms_signature is not None:
            out["kms_signature"] = self.kms_signature.to_json()
        return out


class CertKeyPublisher:
    """The gateway side: a quote for each certificate key it serves with, from its TEE, taken when the
    certificate is made; the document lists the keys in use now (a replaced key's entry goes with it). With
    `signer` (the gateway's keys from the KMS) each entry also carries the signature chain, for `domain`."""

    def __init__(self, tee: QuoteSource, *, signer: CertKeySigner | None = None, domain: str = "") -> None:
        if signer is not None and not domain:
            raise GatewayUsageError("a signed cert-keys document names the gateway's base domain")
        self.tee = tee
        self.signer = signer
        self.domain = domain
        self._keys: dict[tuple[str, bytes], PublishedKey] = {}
        self._document = b""
        self._lock = threading.Lock()
        self._render()

    def publish(
        self,
        role: str,
        cert_pem: str,
        names: tuple[str, ...] = (),
        *,
        replace: bool = True,
        origin: str = "process",
    ) -> PublishedKey:
        """A quote for this certificate's key and its `origin` (kmskeys.key_origin). `replace`: the role's
        other keys leave the document at once; otherwise they stay until `retire` (a renewal publishes the
        new key before HAProxy serves it)."""
        if role not in ROLES:
            raise GatewayUsageError(f"unknown certificate role {role!r}")
        if not is_key_origin(origin):
            raise GatewayUsageError(f"not a key origin: {origin[:80]!r}")
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        digest = spki_sha256(cert)
        not_after = int(cert.not_valid_after_utc.timestamp())
        signature = None
        if self.signer is not None:
            signature = KmsSignature(
                domain=self.domain,
                app_id=self.signer.app_id,
                signing_key=self.signer.public_key,
                signature=self.signer.sign(cert_key_statement(digest, self.domain, not_after)),
                signature_chain=(self.signer.signature_chain[0], self.signer.signature_chain[1]),
            )
        entry = PublishedKey(
            role=role,
            spki_sha256=digest,
            names=tuple(names)[:MAX_NAMES],
            not_after=not_after,
            quote=self.tee.quote(cert_key_report_data(digest, origin)),
            event_log=event_log_json(self.tee.event_log()),
            key_origin=origin,
            kms_signature=signature,
        )
        with self._lock:
            if replace:
                self._keys = {k: v for k, v in self._keys.items() if k[0] != role}
            self._keys[(role, digest)] = entry
            self._render()
        return entry

    def retire(self, role: str, *, keep: PublishedKey) -> None:
        """The role's keys other than `keep` leave the document."""
        with self._lock:
            self._keys = {k: v for k, v in self._keys.items() if k[0] != role or v == keep}
            self._render()

    def _render(self) -> None:
        doc = {"purpose": CERT_KEY_PURPOSE, "keys": [v.to_json() for _k, v in sorted(self._keys.items())]}
        self._document = json.dumps(doc, separators=(",", ":")).encode()

    def document(self) -> bytes:
        with self._lock:
            return self._document


def _hex(value: object, name: str, *, size: int | None = None, max_bytes: int = MAX_QUOTE_BYTES) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * max_bytes:
        raise CertKeyRefused(f"{name} is not a hex string of at most {max_bytes} bytes", step="published")
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        raise CertKeyRefused(f"{name} is not hex", step="published") from exc
    if size is not None and len(raw) != size:
        raise CertKeyRefused(f"{name} is not {size} bytes", step="published")
    return raw


def _nesting(data: bytes) -> int:
    """The deepest [ / { nesting outside JSON strings, in one linear pass. Checked before json.loads: py-evm
    (imported with the chain client) raises Python's recursion limit to 100000, and the C JSON decoder then
    overflows the C stack, not the limit, on a hostile document nested some 100000 levels deep."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_document(data: bytes) -> list[PublishedKey]:
    """Strict parse of a cert-keys document (untrusted bytes). Raises CertKeyRefused(step="published")."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise CertKeyRefused(f"the document is larger than {MAX_DOCUMENT_BYTES} bytes", step="published")
    if _nesting(data) > MAX_NESTING:
        raise CertKeyRefused(f"the document nests deeper than {MAX_NESTING} levels", step="published")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CertKeyRefused("the document is not JSON", step="published") from exc
    if not isinstance(doc, dict) or set(doc) != {"purpose", "keys"}:
        raise CertKeyRefused("the document has not exactly the fields purpose, keys", step="published")
    if doc["purpose"] != CERT_KEY_PURPOSE:
        raise CertKeyRefused(f"the document's purpose is not {CERT_KEY_PURPOSE!r}", step="published")
    keys = doc["keys"]
    if not isinstance(keys, list) or len(keys) > MAX_KEYS:
        raise CertKeyRefused(f"keys is not a list of at most {MAX_KEYS}", step="published")
    out = []
    for i, e in enumerate(keys):
        if not isinstance(e, dict) or not _ENTRY_FIELDS <= set(e) <= _ENTRY_FIELDS | _OPTIONAL_FIELDS:
            raise CertKeyRefused(
                f"keys[{i}] has not exactly the fields {sorted(_ENTRY_FIELDS)} (and optionally "
                f"{sorted(_OPTIONAL_FIELDS)})",
                step="published",
            )
        names = e["names"]
        origin = e.get("key_origin", "")
        if "key_origin" in e and not (
            isinstance(origin, str) and len(origin) <= 128 and is_key_origin(origin)
        ):
            raise CertKeyRefused(f"keys[{i}].key_origin is not a key origin", step="published")
        if (
            e["role"] not in ROLES
            or not isinstance(names, list)
            or len(names) > MAX_NAMES
            or not all(isinstance(n, str) and len(n) <= 253 for n in names)
            or not isinstance(e["not_after"], int)
            or isinstance(e["not_after"], bool)
            or not isinstance(e["event_log"], str)
            or len(e["event_log"]) > MAX_EVENT_LOG_BYTES
        ):
            raise CertKeyRefused(f"keys[{i}] has a malformed field", step="published")
        out.append(
            PublishedKey(
                role=e["role"],
                spki_sha256=_hex(e["spki_sha256"], f"keys[{i}].spki_sha256", size=32),
                names=tuple(names),
                not_after=e["not_after"],
                quote=_hex(e["quote"], f"keys[{i}].quote"),
                event_log=e["event_log"],
                key_origin=origin,
                kms_signature=_parse_signature(e["kms_signature"], i) if "kms_signature" in e else None,
            )
        )
    return out


def _parse_signature(sig: object, i: int) -> KmsSignature:
    where = f"keys[{i}].kms_signature"
    if not isinstance(sig, dict) or set(sig) != _SIGNATURE_FIELDS:
        raise CertKeyRefused(
            f"{where} has not exactly the fields {sorted(_SIGNATURE_FIELDS)}", step="published"
        )
    domain, chain = sig["domain"], sig["signature_chain"]
    if not isinstance(domain, str) or not 0 < len(domain) <= 253:
        raise CertKeyRefused(f"{where}.domain is not a domain name", step="published")
    if not isinstance(chain, list) or len(chain) != 2:
        raise CertKeyRefused(f"{where}.signature_chain is not 2 signatures", step="published")
    return KmsSignature(
        domain=domain,
        app_id=_hex(sig["app_id"], f"{where}.app_id", size=20),
        signing_key=_hex(sig["signing_key"], f"{where}.signing_key", size=33),
        signature=_hex(sig["signature"], f"{where}.signature", size=65),
        signature_chain=(
            _hex(chain[0], f"{where}.signature_chain[0]", size=65),
            _hex(chain[1], f"{where}.signature_chain[1]", size=65),
        ),
    )


@dataclass(frozen=True)
class CertKeyVerdict:
    spki_sha256: str
    role: str
    tee: str
    simulated: bool
    tcb_status: str
    app_id: str
    compose_hash: str
    key_origin: str  # covered by the quote ("" for an entry of an earlier document: none stated)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_cert_key(
    cert_der: bytes,
    document: bytes,
    verifier: PeerVerifier,
    *,
    now: int | None = None,
    expected_app_id: bytes | None = None,
) -> CertKeyVerdict:
    """(1)-(5) of the module docstring. Raises CertKeyRefused with the failing step."""
    # (1)
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        digest = spki_sha256(cert)
    except ValueError as exc:
        raise CertKeyRefused(f"the server's certificate does not parse ({exc})", step="presented") from exc
    # (2)
    entry = next((k for k in parse_document(document) if k.spki_sha256 == digest), None)
    if entry is None:
        raise CertKeyRefused(
            f"no published quote covers the key this server presented (spki sha256 {digest.hex()}): "
            "the document is stale or the key is not TEE-held",
            step="published",
        )
    # (3)
    try:
        evidence = verifier.verify_evidence(entry.quote, entry.event_log, now=now)
    except PeerRejected as exc:
        raise CertKeyRefused(f"the published quote does not verify: {exc.reason}", step="quote") from exc
    # (4)
    if evidence.report_data != cert_key_report_data(digest, entry.key_origin):
        raise CertKeyRefused(
            "the published quote's report_data does not bind the presented key and its stated origin "
            f"(expected sha256(JCS({{purpose: {CERT_KEY_PURPOSE}, spki_sha256, key_origin}})))",
            step="binding",
        )
    # (5)
    app = evidence.app_info
    app_id = app.app_id if app is not None else b""
    if expected_app_id is not None and app_id != expected_app_id:
        raise CertKeyRefused(
            f"the key is held by app {app_id.hex() or '(none measured)'}, not {expected_app_id.hex()}",
            step="app",
        )
    return CertKeyVerdict(
        spki_sha256=digest.hex(),
        role=entry.role,
        tee=evidence.tee,
        simulated=evidence.simulated,
        tcb_status=evidence.tcb_status,
        app_id=app_id.hex(),
        compose_hash=app.compose_hash.hex() if app is not None else "",
        key_origin=entry.key_origin,
    )


@dataclass(frozen=True)
class CertKeySignatureVerdict:
    spki_sha256: str
    role: str
    domain: str
    not_after: int
    app_id: str
    app_public_key: str  # the app's k256 key the KMS root issued (recovered from the chain)
    signing_key: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_cert_key_signature(
    cert_der: bytes,
    document: bytes,
    *,
    kms_root_public_key: bytes,
    expected_app_id: bytes | None = None,
    expected_domain: str | None = None,
) -> CertKeySignatureVerdict:
    """(1)-(6) of "Signature chain" in the module docstring; no TEE evidence involved. Raises CertKeyRefused
    with the failing step."""
    # (1)
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        digest = spki_sha256(cert)
        not_after = int(cert.not_valid_after_utc.timestamp())
    except ValueError as exc:
        raise CertKeyRefused(f"the server's certificate does not parse ({exc})", step="presented") from exc
    # (2)
    entry = next((k for k in parse_document(document) if k.spki_sha256 == digest), None)
    if entry is None:
        raise CertKeyRefused(
            f"no published entry covers the key this server presented (spki sha256 {digest.hex()})",
            step="published",
        )
    sig = entry.kms_signature
    if sig is None:
        raise CertKeyRefused(
            "the entry for the presented key carries no KMS signature chain", step="published"
        )
    # (3)
    try:
        signer = recover_k256(cert_key_statement(digest, sig.domain, not_after), sig.signature)
    except KeysError as exc:
        raise CertKeyRefused(f"the signature is malformed ({exc})", step="signature") from exc
    if signer != sig.signing_key:
        raise CertKeyRefused(
            "the signature does not verify under the published signing key for the presented key, its "
            "not_after and the signed domain (tampered, or made for another key or certificate)",
            step="signature",
        )
    # (4)
    try:
        app_public_key = verify_key_signature_chain(
            app_id=sig.app_id,
            public_key=sig.signing_key,
            purpose=CERT_KEY_SIGNING_PURPOSE,
            signature_chain=sig.signature_chain,
            kms_root_public_key=kms_root_public_key,
        )
    except KeysError as exc:
        raise CertKeyRefused(
            f"the signing key's chain does not lead to the KMS root for app {sig.app_id.hex()}: {exc}",
            step="chain",
        ) from exc
    # (5)
    if expected_app_id is not None and sig.app_id != expected_app_id:
        raise CertKeyRefused(
            f"the chain is app {sig.app_id.hex()}'s, not {expected_app_id.hex()}'s", step="app"
        )
    # (6)
    if expected_domain is not None and sig.domain != expected_domain.rstrip(".").lower():
        raise CertKeyRefused(f"the key is vouched for {sig.domain!r}, not {expected_domain!r}", step="domain")
    return CertKeySignatureVerdict(
        spki_sha256=digest.hex(),
        role=entry.role,
        domain=sig.domain,
        not_after=not_after,
        app_id=sig.app_id.hex(),
        app_public_key=app_public_key.hex(),
        signing_key=sig.signing_key.hex(),
    )


def presented_cert(host: str, port: int, *, server_name: str | None = None, timeout: float = 10.0) -> bytes:
    """The leaf certificate (DER) a TLS server presents for `server_name` (default `host`). The chain is not
    checked here: the question is which key answers, and the published quote decides about that key."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_name or host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise CertKeyRefused(f"TLS to {host}:{port} failed: {exc}", step="presented") from exc
    if not der:
        raise CertKeyRefused(f"{host}:{port} presented no certificate", step="presented")
    return der


def fetch_document(url: str, *, timeout: float = 10.0, server_name: str | None = None) -> bytes:
    """GET the cert-keys document (at most MAX_DOCUMENT_BYTES). TLS is not verified: the document carries
    its own proof (the quotes), and a forged one fails at step (3) or (4). `server_name`: the TLS server
    name and Host header to send when the URL's host is an address (the gateway's public port routes the
    document by the base domain's name)."""
    if not url.startswith(("https://", "http://")):
        raise GatewayUsageError("the cert-keys URL must be http(s)://")
    headers = {"Host": server_name} if server_name else {}
    extensions = {"sni_hostname": server_name} if server_name and url.startswith("https://") else {}
    try:
        with httpx.Client(verify=False, timeout=timeout) as client:  # noqa: S501 - self-authenticating
            with client.stream("GET", url, headers=headers, extensions=extensions) as r:
                if r.status_code != 200:
                    raise CertKeyRefused(f"{url} answered {r.status_code}", step="published")
                chunks, size = [], 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > MAX_DOCUMENT_BYTES:
                        raise CertKeyRefused(
                            f"{url} sent more than {MAX_DOCUMENT_BYTES} bytes", step="published"
                        )
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise CertKeyRefused(f"cannot fetch {url}: {type(exc).__name__}", step="published") from exc
    return b"".join(chunks)
