"""KMS boot: measure the KMS into its TEE, then load its sealed root keys or generate new ones.

Procedure (`start_kms_state`):
  (1) boot the KMS's own TEE: emit dstack's boot events (app-id, compose-hash, instance-id, boot-mr-done)
      for the KMS build into RTMR3, so its `mr_aggregated` names exactly this KMS build on this OS image;
  (2) if data_home()/kms/sealed-state.json exists, unseal it with the key derived from this TEE and
      measurement (sealing.py); a file sealed by another platform or build refuses to open;
  (3) otherwise, unless told to onboard, generate root keys inside this process (P-256 CA key,
      secp256k1 key, the self-signed root CA certificate and a temporary CA) and seal them.
Publishing to KmsAuth happens in service.py once the chain client is known.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import teecloud
from teecloud._fs import atomic_write, data_home
from teecloud.appcompose import compose_hash
from teecloud.attestation.boottime import replay_runtime_events
from teecloud.attestation.eventlog import mr_aggregated
from teecloud.keys.appkeys import RootKeys
from teecloud.keys.certs import cert_to_pem, issue_cert, key_to_pem, make_root_ca_cert
from teecloud.kms.errors import BootstrapError, SealingError
from teecloud.kms.sealing import platform_sealing_secret, seal, sealing_key, unseal
from teecloud.tee.base import TeePlatform

__all__ = [
    "KMS_APP_ID",
    "KmsIdentity",
    "KmsState",
    "boot_kms_tee",
    "finish_kms_boot",
    "kms_compose",
    "kms_dir",
    "load_state",
    "new_state",
    "save_state",
    "start_kms_state",
]

# The KMS's own "app id": a fixed 20-byte name so every KMS build boots the same way (dstack runs its KMS
# as an ordinary CVM app; teecloud's simulated KMS measures itself the same way).
KMS_APP_ID = hashlib.sha256(b"teecloud-kms").digest()[:20]
SEALED_STATE_NAME = "sealed-state.json"
TEMP_CA_CN = "teecloud KMS temporary CA (public, carries no trust)"
TEMP_CA_VALIDITY_S = 10 * 365 * 24 * 3600


def kms_dir(home: Path | None = None) -> Path:
    return (home or data_home()) / "kms"


def kms_compose(build: str | None = None) -> dict[str, Any]:
    """The KMS's measured identity: what a compose file is for an app. `build` defaults to the package
    version; another build is another measurement (and must be allowed on chain separately)."""
    return {
        "manifest_version": 2,
        "name": "teecloud-kms",
        "runner": "teecloud-kms",
        "build": build or teecloud.__version__,
    }


@dataclass(frozen=True)
class KmsIdentity:
    """What boot measured: the compose hash of the KMS build; `mr_aggregated` once booted (what its server
    certificates' quotes show, and what its sealed state is bound to); `boot_mr_aggregated` at the boot
    measurement (what its onboarding request's quote shows: keys only to boot-time evidence). KmsAuth
    allows a KMS build by both."""

    compose_hash: bytes
    mr_aggregated: bytes
    boot_mr_aggregated: bytes = b""


# What the KMS measures after its keys are in place (the end of its boot, as for an app).
_KMS_FINISH_EVENTS = (
    ("key-provider", json.dumps({"name": "kms-root", "id": ""}, separators=(",", ":")).encode()),
    ("system-ready", b""),
)


def boot_kms_tee(tee: TeePlatform, *, build: str | None = None, finish: bool = True) -> KmsIdentity:
    """Step (1): measure the KMS build into RTMR3 (dstack event order, reference/dstack.md §4), up to the
    boot measurement (the boot grammar of teecloud.attestation.boottime, no boot-nonce: every KMS of a build
    must share one measurement for KmsAuth to allow it), then, unless `finish` is False, the end of boot.
    A KMS that onboards from another boots with finish=False and calls `finish_kms_boot` once onboarded:
    its onboarding quote must be boot-time evidence."""
    chash = compose_hash(kms_compose(build))
    tee.emit_event("system-preparing", b"")
    tee.emit_event("app-id", KMS_APP_ID)
    tee.emit_event("compose-hash", chash)
    # No instance id: every KMS of one build must share one mr_aggregated so KmsAuth can allowlist it.
    tee.emit_event("instance-id", b"")
    tee.emit_event("boot-mr-done", b"")
    if len(tee.os_image_hash) == 32:
        tee.emit_event("os-image-hash", tee.os_image_hash)
    at_boot = tee.measurements()
    # over the registers as the verifier derives them from this KMS's quotes (one implementation)
    final = dict(at_boot, rtmr3=replay_runtime_events(_KMS_FINISH_EVENTS, start=at_boot["rtmr3"]))
    identity = KmsIdentity(
        compose_hash=chash, mr_aggregated=mr_aggregated(final), boot_mr_aggregated=mr_aggregated(at_boot)
    )
    if finish:
        finish_kms_boot(tee)
    return identity


def finish_kms_boot(tee: TeePlatform) -> None:
    """The end of the KMS's boot: from here on its quotes are not boot-time evidence."""
    for name, payload in _KMS_FINISH_EVENTS:
        tee.emit_event(name, payload)


@dataclass(frozen=True)
class KmsState:
    """Everything a KMS must keep: root keys, the root CA certificate and the (public) temporary CA."""

    root: RootKeys
    root_ca_cert_pem: str
    temp_ca_key_pem: str
    temp_ca_cert_pem: str
    created_at: int

    def to_json_bytes(self) -> bytes:
        doc = {
            "version": 1,
            "root_keys_pem": self.root.to_pem().decode(),
            "root_ca_cert": self.root_ca_cert_pem,
            "temp_ca_key": self.temp_ca_key_pem,
            "temp_ca_cert": self.temp_ca_cert_pem,
            "created_at": self.created_at,
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> KmsState:
        try:
            doc = json.loads(data)
            state = cls(
                root=RootKeys.from_pem(str(doc["root_keys_pem"]).encode()),
                root_ca_cert_pem=str(doc["root_ca_cert"]),
                temp_ca_key_pem=str(doc["temp_ca_key"]),
                temp_ca_cert_pem=str(doc["temp_ca_cert"]),
                created_at=int(doc["created_at"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise SealingError(f"sealed KMS state is malformed: {exc}") from exc
        state.check()
        return state

    @classmethod
    def from_parts(
        cls,
        *,
        root: RootKeys,
        root_ca_cert_pem: str,
        temp_ca_key_pem: str,
        temp_ca_cert_pem: str,
        created_at: int,
    ) -> KmsState:
        state = cls(root, root_ca_cert_pem, temp_ca_key_pem, temp_ca_cert_pem, created_at)
        state.check()
        return state

    def check(self) -> None:
        """The root CA certificate must carry the root CA key; the temp CA key must match its cert."""
        try:
            ca_cert = x509.load_pem_x509_certificate(self.root_ca_cert_pem.encode())
            temp_cert = x509.load_pem_x509_certificate(self.temp_ca_cert_pem.encode())
            temp_key = serialization.load_pem_private_key(self.temp_ca_key_pem.encode(), password=None)
        except ValueError as exc:
            raise SealingError(f"KMS state holds an unreadable certificate or key: {exc}") from exc
        if ca_cert.public_key() != self.root.ca_key.public_key():
            raise SealingError("KMS state: the root CA certificate does not carry the root CA key")
        if (
            not isinstance(temp_key, ec.EllipticCurvePrivateKey)
            or temp_cert.public_key() != temp_key.public_key()
        ):
            raise SealingError("KMS state: the temporary CA key does not match its certificate")

    @property
    def root_ca_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.root_ca_cert_pem.encode())

    @property
    def temp_ca_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.temp_ca_key_pem.encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    @property
    def temp_ca_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.temp_ca_cert_pem.encode())


def new_state(*, now: int) -> KmsState:
    """Step (3): fresh root keys, generated in this (TEE) process."""
    root = RootKeys.generate()
    root_ca = make_root_ca_cert(root.ca_key, now=now)
    temp_key = ec.generate_private_key(ec.SECP256R1())
    temp_cert = issue_cert(
        temp_key.public_key(),
        issuer_key=temp_key,
        issuer_name=None,
        subject_cn=TEMP_CA_CN,
        not_before=now - 60,
        not_after=now + TEMP_CA_VALIDITY_S,
        ca=True,
    )
    return KmsState.from_parts(
        root=root,
        root_ca_cert_pem=cert_to_pem(root_ca),
        temp_ca_key_pem=key_to_pem(temp_key),
        temp_ca_cert_pem=cert_to_pem(temp_cert),
        created_at=now,
    )


def save_state(state: KmsState, tee: TeePlatform, identity: KmsIdentity, home: Path | None = None) -> Path:
    key = sealing_key(platform_sealing_secret(tee), identity.mr_aggregated)
    path = kms_dir(home) / SEALED_STATE_NAME
    atomic_write(path, seal(key, identity.mr_aggregated, state.to_json_bytes()))
    return path


def load_state(tee: TeePlatform, identity: KmsIdentity, home: Path | None = None) -> KmsState | None:
    path = kms_dir(home) / SEALED_STATE_NAME
    if not path.exists():
        return None
    key = sealing_key(platform_sealing_secret(tee), identity.mr_aggregated)
    return KmsState.from_json_bytes(unseal(key, identity.mr_aggregated, path.read_bytes()))


def start_kms_state(
    tee: TeePlatform, identity: KmsIdentity, *, now: int, generate: bool = True, home: Path | None = None
) -> tuple[KmsState, bool]:
    """Steps (2)-(3). Returns (state, created). With generate=False a missing state is an error (the
    operator must onboard from a running KMS first)."""
    state = load_state(tee, identity, home)
    if state is not None:
        return state, False
    if not generate:
        raise BootstrapError(
            "this KMS has no root keys yet: run `teecloud kms onboard --from URL` to copy them from an "
            "authorized KMS, or start it with bootstrap allowed"
        )
    state = new_state(now=now)
    save_state(state, tee, identity, home)
    return state, True


BOOTSTRAP_REPORT_PREFIX = b"teecloud-kms-bootstrap:"


class RootPublicKeys(Protocol):
    """The root's public half (a `teecloud.kms.rootkeys.RootKeyHolder` is one)."""

    @property
    def ca_public_key_der(self) -> bytes: ...

    @property
    def k256_public_key(self) -> bytes: ...


def bootstrap_report_data(root: RootPublicKeys) -> bytes:
    """report_data of the KMS's bootstrap quote: sha512(prefix ‖ k256 pubkey ‖ CA SPKI DER), so the quote
    published (by hash) in KmsAuth vouches that these root public keys were made in this TEE."""
    return hashlib.sha512(BOOTSTRAP_REPORT_PREFIX + root.k256_public_key + root.ca_public_key_der).digest()


def publish_kms_info(chain: Any, root: RootPublicKeys, tee: TeePlatform, home: Path | None = None) -> str:
    """Quote over the root public keys, kept in data_home()/kms/bootstrap-quote.* for anyone to verify, and
    its hash with the public keys written to KmsAuth (`set_kms_info`). Returns the quote hash (hex)."""
    from teecloud._fs import atomic_write
    from teecloud.keys.ratls import event_log_json
    from teecloud.kms.bootstrap import kms_dir

    quote = tee.quote(bootstrap_report_data(root))
    quote_hash = hashlib.sha256(quote).digest()
    atomic_write(kms_dir(home) / "bootstrap-quote.bin", quote, mode=0o644)
    atomic_write(
        kms_dir(home) / "bootstrap-event-log.json", event_log_json(tee.event_log()).encode(), mode=0o644
    )
    chain.set_kms_info(root.k256_public_key, root.ca_public_key_der, quote_hash)
    return quote_hash.hex()
