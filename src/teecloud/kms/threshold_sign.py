"""Threshold mode, node side of the KMS's signatures (teecloud.keys.threshold_ecdsa): one node's share of
the group's secp256k1 signing key (sealed to the node's measurement) and its pool of presignatures (in
memory only).

    SigningShare       this node's KeyShare of the signing key (x·G, commitments[0], is what verifiers pin)
    PresignaturePool   presignatures by session, in this process's memory only (never sealed, never reloaded:
                       a copy of the node's disk, or a restart, has none); each signs at most ONE digest: the
                       digest is bound before the signature share is computed, so this process never signs a
                       second digest with the same k (which would reveal the key to whoever holds both
                       signatures). The same digest again gets the same share (a client retrying, or fetching
                       from other nodes, learns nothing new).
    ThresholdSigner    signature shares only for an AuthorizedApp, over a message the node recomputes:
                       keccak256("dstack-kms-issued:" ‖ app_id from the verified boot_info ‖ the app's k256
                       public key). The caller supplies only the public key (a checked curve point): the key
                       is derived inside the CVM from the VOPRF outputs, which no node knows; the boot-time
                       evidence that authorized this call is what vouches for the measured agent that sent it.
                       With a P-256 key (the group's CA key, issue 19's app CA): the group's root CA
                       (self-signed by t nodes, `sign_root_ca`) and app CA certificates under it
                       (`sign_app_ca`), each node building the TBS itself (teecloud.keys.threshold_certs) from
                       the verified app_id and the app CA key the caller names.
    AppCaCache         group-signed app CA certificates by (epoch, app_id, app CA key)
    AppSignatureCache  per (epoch, app_id): the group's signature of the app's k256 key (and that key), and
                       which app CA key the app's kept certificate is for, so that a node can hand both back
                       inside its ThresholdEvaluate answer (one attested round per repeat boot)
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import coincurve
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from teecloud._fs import atomic_write
from teecloud.keys import threshold_certs as tc
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.certs import cert_to_pem
from teecloud.keys.errors import KeysError
from teecloud.keys.sigchain import kms_issued_digest, recover_k256
from teecloud.kms.authz import AuthorizedApp
from teecloud.kms.bootstrap import KmsIdentity, kms_dir
from teecloud.kms.errors import AccessDenied, SealingError
from teecloud.kms.sealing import platform_sealing_secret, seal, sealing_key, unseal
from teecloud.tee.base import TeePlatform

__all__ = [
    "APP_CA_CACHE_DIR",
    "APP_SIGNATURE_CACHE_DIR",
    "CA_ROOT_FILE",
    "CA_SHARE_FILE",
    "LEGACY_PRESIG_FILE",
    "MAX_PRESIGNATURES",
    "SIGNING_SHARE_FILE",
    "AppCaCache",
    "AppSignatureCache",
    "KeptSignatures",
    "PresignaturePool",
    "ThresholdSigner",
    "app_key_signature_problem",
    "key_share_from_json",
    "key_share_to_json",
    "open_app_ca_cache",
    "open_ca_signer",
    "open_signer",
    "save_ca_root",
    "save_signing_share",
]

SIGNING_SHARE_FILE = "threshold-signing-share.sealed"
CA_SHARE_FILE = "threshold-ca-share.sealed"  # the group's P-256 CA key share (issue 19's app CA)
CA_ROOT_FILE = "threshold-ca-root.pem"  # public; re-checked against the CA key at every open
LEGACY_PRESIG_FILE = "threshold-presignatures.sealed"  # before R4-4's fix: never read, removed at open
MAX_PRESIGNATURES = 512  # a bound on one process's memory
APP_CA_CACHE_DIR = "threshold-app-ca"  # group-signed app CA certificates, one sealed file each
MAX_APP_CA_CACHE = 1024  # entries; the oldest is dropped to make room
_APP_CA_FORMAT = "teecloud-kms-app-ca-cache-v1"
APP_SIGNATURE_CACHE_DIR = "threshold-app-signatures"  # per (epoch, app_id): kept app-key signature + CA key
MAX_APP_SIGNATURE_CACHE = 1024  # entries; the oldest is dropped to make room
_APP_SIG_FORMAT = "teecloud-kms-app-signature-cache-v1"
log = logging.getLogger("teecloud.kms.threshold")
_Sealer = Callable[[bytes], bytes]
_Entries = dict[bytes, tuple[te.Presignature, bytes | None]]
_SHARE_FORMAT = "teecloud-kms-threshold-signing-share-v1"


def key_share_to_json(k: te.KeyShare) -> bytes:
    return json.dumps(
        {
            "format": _SHARE_FORMAT,
            "index": k.index,
            "t": k.t,
            "n": k.n,
            "share": f"{k.share:064x}",
            "commitments": [c.hex() for c in k.commitments],
            # secp256k1 shares keep their earlier bytes (no field); others name their curve
            **({"curve": k.curve} if k.curve != te.SECP256K1.name else {}),
        },
        sort_keys=True,
    ).encode()


def key_share_from_json(data: bytes) -> te.KeyShare:
    """Parse and Feldman-check a signing share (a corrupted or foreign share is refused, never used)."""
    try:
        doc = json.loads(data)
        if doc.get("format") != _SHARE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        return te.KeyShare(
            int(doc["index"]),
            int(doc["t"]),
            int(doc["n"]),
            int(doc["share"], 16),
            tuple(bytes.fromhex(c) for c in doc["commitments"]),
            str(doc.get("curve", te.SECP256K1.name)),
        )
    except (ValueError, KeyError, TypeError, AttributeError, KeysError) as exc:
        raise SealingError(f"signing share is malformed or does not match its commitments: {exc}") from exc


class PresignaturePool:
    """This node's presignatures, in the memory of the process whose round made them ONLY: never sealed,
    never reloaded (review 4, R4-4). Sealing binds to the KMS measurement, which has no per-boot value, so a
    sealed pool is readable by every copy of the node's disk; two copies would each sign one message with
    the same presignature, and two messages under one R give away the group's key. A restart starts
    empty (`teecloud up` tops pools up at start with a networked round, kms.threshold_net)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: _Entries = {}

    def add(self, presigs: Iterable[te.Presignature]) -> int:
        """Add fresh presignatures (a session already present is refused: never overwrite one that may
        have signed). Returns the number unused."""
        with self._lock:
            entries = dict(self._entries)
            for p in presigs:
                if p.session in entries:
                    raise SealingError(f"presignature {p.session.hex()} is already in the pool")
                entries[p.session] = (p, None)
            if len(entries) > MAX_PRESIGNATURES:
                entries = self._drop_used(entries)
            if len(entries) > MAX_PRESIGNATURES:
                raise SealingError(f"the presignature pool holds at most {MAX_PRESIGNATURES}")
            self._entries = entries
            return sum(1 for _, used in entries.values() if used is None)

    @staticmethod
    def _drop_used(entries: _Entries) -> _Entries:
        return {s: e for s, e in entries.items() if e[1] is None}

    def unused(self) -> list[bytes]:
        with self._lock:
            return sorted(s for s, (_, used) in self._entries.items() if used is None)

    def public(self, session: bytes) -> te.Presignature:
        with self._lock:
            entry = self._entries.get(session)
        if entry is None:
            raise AccessDenied(f"no presignature {session.hex()} here", step="presignature")
        return entry[0]

    def sign(self, session: bytes, digest: bytes) -> te.SignatureShare:
        """This node's share over `digest` with presignature `session`: the digest is bound to the
        presignature first (under the lock); a presignature already bound to another digest is refused."""
        with self._lock:
            entry = self._entries.get(session)
            if entry is None:
                raise AccessDenied(f"no presignature {session.hex()} here", step="presignature")
            presig, used = entry
            if used is not None and used != digest:
                raise AccessDenied(
                    f"presignature {session.hex()} has already signed another message (a presignature "
                    "signs one message, ever)",
                    step="presignature",
                )
            if used is None:
                self._entries = {**self._entries, session: (presig, digest)}
        return te.sign_share(presig, digest)


class ThresholdSigner:
    """This node's signature shares as the KMS, only for an AuthorizedApp (which only
    teecloud.kms.authz.Authorizer makes, after the whole key-release rule): with a secp256k1 key the GetKey
    chain's KMS signature (`sign_app_key`), with a P-256 key (and its root CA) app CA certificates
    (`sign_app_ca`)."""

    def __init__(
        self, key: te.KeyShare, pool: PresignaturePool, *, ca_root: x509.Certificate | None = None
    ) -> None:
        self.key = key
        self.pool = pool
        self.ca_root: x509.Certificate | None = None
        if ca_root is not None:
            self.install_ca_root(ca_root)

    @property
    def group_public_key(self) -> bytes:
        return self.key.group_public_key

    def sign_app_key(self, app: AuthorizedApp, app_public_key: bytes, session: bytes) -> te.SignatureShare:
        if not isinstance(app, AuthorizedApp):
            raise TypeError("signature shares only for an AuthorizedApp")
        if self.key.curve != te.SECP256K1.name:
            raise AccessDenied("this is not the group's secp256k1 signing key", step="mode")
        try:
            pub = coincurve.PublicKey(bytes(app_public_key)).format(compressed=True)
        except Exception as exc:  # coincurve raises ValueError / bare Exception for non-points
            raise AccessDenied("the app public key is not a secp256k1 point", step="request") from exc
        if pub != bytes(app_public_key):
            raise AccessDenied("the app public key must be SEC1 compressed (33 bytes)", step="request")
        return self._sign(session, kms_issued_digest(app.boot_info.app_id, pub))

    def _sign(self, session: bytes, digest: bytes) -> te.SignatureShare:
        presig = self.pool.public(session)
        if presig.group_public_key != self.key.group_public_key or presig.index != self.key.index:
            raise AccessDenied("presignature of another group or share", step="presignature")
        return self.pool.sign(session, digest)

    # --- the group's CA (P-256)

    def _ca_key(self) -> ec.EllipticCurvePublicKey:
        if self.key.curve != te.P256.name:
            raise AccessDenied("this is not the group's P-256 CA key", step="mode")
        return tc.group_ca_public_key(self.key.group_public_key)

    def root_ca_to_sign(self, not_before: int) -> tc.CertToSign:
        """The group's root CA TBS (this node builds it from its own key; the caller names only the start
        of its validity)."""
        self._ca_key()
        return tc.root_ca_to_sign(self.key.group_public_key, not_before=not_before)

    def sign_root_ca(self, not_before: int, session: bytes) -> te.SignatureShare:
        """This node's share of the root CA's self-signature (operator only: kms admin listener)."""
        return self._sign(session, self.root_ca_to_sign(not_before).digest)

    def install_ca_root(self, cert: x509.Certificate) -> None:
        """Accept the group's root CA certificate only if it is exactly the TBS this node builds for its
        validity and the group's key signed it (a tampered or foreign root is refused)."""
        key = self._ca_key()
        try:
            expected = self.root_ca_to_sign(int(cert.not_valid_before_utc.timestamp()))
            tc.assemble_certificate(expected, _raw_signature(cert), key)
        except KeysError as exc:
            raise SealingError(f"the group root CA certificate is refused: {exc}") from exc
        if cert.tbs_certificate_bytes != expected.tbs:
            raise SealingError("the group root CA certificate is not this group's root (other fields)")
        self.ca_root = cert

    def app_ca_to_sign(self, app_id: bytes, app_ca_public_key: bytes) -> tc.CertToSign:
        self._ca_key()
        if self.ca_root is None:
            raise AccessDenied("this node has no group root CA certificate yet", step="mode")
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(app_ca_public_key))
        except ValueError as exc:
            raise AccessDenied("the app CA public key is not a P-256 point", step="request") from exc
        if len(app_ca_public_key) != 33:
            raise AccessDenied("the app CA public key must be SEC1 compressed (33 bytes)", step="request")
        return tc.app_ca_to_sign(self.ca_root, app_id, key)

    def check_app_ca(self, app_id: bytes, app_ca_public_key: bytes, certificate_pem: str) -> x509.Certificate:
        """A group-signed app CA certificate for (app_id, key), accepted only if its TBS is exactly the one
        this node builds for them under its root and the group's CA key signed it (AccessDenied, step
        `request`, otherwise). Returns it re-assembled from that TBS and signature (the canonical
        encoding: keep and serve that one, never the bytes a caller sent)."""
        to_sign = self.app_ca_to_sign(app_id, app_ca_public_key)
        assert self.ca_root is not None  # app_ca_to_sign refuses without one
        root_key = self.ca_root.public_key()
        assert isinstance(root_key, ec.EllipticCurvePublicKey)
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem.encode())
            return tc.canonical_certificate(to_sign, cert, root_key)
        except (ValueError, x509.InvalidVersion, KeysError) as exc:
            raise AccessDenied(f"the app CA certificate is refused: {exc}", step="request") from exc

    def sign_app_ca(self, app: AuthorizedApp, app_ca_public_key: bytes, session: bytes) -> te.SignatureShare:
        """This node's share of the app CA certificate of the attested app: subject and serial from the
        verified app_id, the key the caller names (derived in its CVM), validity from the group root."""
        if not isinstance(app, AuthorizedApp):
            raise TypeError("signature shares only for an AuthorizedApp")
        return self._sign(session, self.app_ca_to_sign(app.boot_info.app_id, app_ca_public_key).digest)


class AppCaCache:
    """Group-signed app CA certificates by (epoch, app_id, app CA public key), so that a reboot of the same
    app re-uses its certificate and spends no presignature. One file per entry in `dir`, sealed to the
    node's measurement, written atomically; at most `max_entries` (the oldest is dropped). The sealed record
    names its (epoch, app_id, key), checked on read (the file name is the host's); a certificate is public,
    and the service re-checks it against the node's root before serving it."""

    def __init__(
        self, dir: Path, seal: _Sealer, unseal: _Sealer, *, max_entries: int = MAX_APP_CA_CACHE
    ) -> None:
        self.dir = dir
        self._seal, self._unseal = seal, unseal
        self.max_entries = max_entries
        self._lock = threading.Lock()

    def _path(self, epoch: int, app_id: bytes, key: bytes) -> Path:
        name = hashlib.sha256(
            epoch.to_bytes(4, "big") + len(app_id).to_bytes(2, "big") + app_id + key
        ).hexdigest()
        return self.dir / f"{name}.sealed"

    def get(self, epoch: int, app_id: bytes, key: bytes) -> str | None:
        path = self._path(epoch, app_id, key)
        try:
            doc = json.loads(self._unseal(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, SealingError) as exc:
            log.warning("app CA cache entry %s is unreadable (ignored): %s", path.name, exc)
            return None
        if (
            not isinstance(doc, dict)
            or doc.get("format") != _APP_CA_FORMAT
            or (
                doc.get("epoch"),
                doc.get("app_id"),
                doc.get("app_ca_public_key"),
            )
            != (epoch, app_id.hex(), key.hex())
        ):
            log.warning("app CA cache entry %s names another app, key or epoch (ignored)", path.name)
            return None
        cert = doc.get("certificate")
        return cert if isinstance(cert, str) else None

    def put(self, epoch: int, app_id: bytes, key: bytes, certificate_pem: str) -> bool:
        """Keep a certificate (already checked by the caller); False when one is kept already (the first
        stays: any genuine one serves)."""
        path = self._path(epoch, app_id, key)
        record = json.dumps(
            {
                "format": _APP_CA_FORMAT,
                "epoch": epoch,
                "app_id": app_id.hex(),
                "app_ca_public_key": key.hex(),
                "certificate": certificate_pem,
            },
            sort_keys=True,
        ).encode()
        with self._lock:
            if path.exists():
                return False
            entries = (
                sorted(self.dir.glob("*.sealed"), key=lambda p: p.stat().st_mtime)
                if self.dir.exists()
                else []
            )
            for old in entries[: max(0, len(entries) - self.max_entries + 1)]:
                old.unlink(missing_ok=True)
            atomic_write(path, self._seal(record))
        return True


def app_key_signature_problem(
    app_id: bytes, app_public_key: bytes, signature: bytes, group_key: bytes
) -> str:
    """'' when `signature` is the group's signature of exactly this app's k256 key, in the form the group's
    combination makes (65 bytes r‖s‖v, v in {0, 1}, low s), over keccak256("dstack-kms-issued:" ‖ app_id ‖
    key) and recovering to `group_key`; otherwise what is wrong with it."""
    if len(signature) != 65 or signature[64] > 1:
        return "not a 65-byte r‖s‖v signature with v in {0, 1}"
    s = int.from_bytes(signature[32:64], "big")
    if not 0 < s <= te.SECP256K1.order // 2:
        return "its s is not in the low half (not the form the group's combination makes)"
    try:
        pub = coincurve.PublicKey(bytes(app_public_key)).format(compressed=True)
    except Exception:  # coincurve raises ValueError / bare Exception for non-points
        return "the app public key is not a secp256k1 point"
    if pub != bytes(app_public_key):
        return "the app public key is not SEC1 compressed"
    try:
        signer = recover_k256(kms_issued_digest(app_id, pub), signature)
    except KeysError as exc:
        return f"it does not recover: {exc}"
    if signer != group_key:
        return "it does not verify under the group's signing key for this app and key"
    return ""


@dataclass(frozen=True)
class KeptSignatures:
    """What a node keeps for one (epoch, app_id): the group's signature of the app's k256 key and that key
    (b"" when none), and the app CA key whose group-signed certificate AppCaCache keeps (b"" when none)."""

    app_public_key: bytes = b""
    signature: bytes = b""
    app_ca_public_key: bytes = b""


class AppSignatureCache:
    """KeptSignatures by (epoch, app_id): one file per entry in `dir`, sealed to the node's measurement,
    written atomically; at most `max_entries` (the oldest is dropped). The sealed record names its (epoch,
    app_id), checked on read (the file name is the host's). Only the service's keep handler writes it, for
    an attested app after the whole key-release rule and after checking what it keeps; the evaluate handler
    checks a kept signature again (under the node's current signing key) before it serves it."""

    def __init__(
        self, dir: Path, seal: _Sealer, unseal: _Sealer, *, max_entries: int = MAX_APP_SIGNATURE_CACHE
    ) -> None:
        self.dir = dir
        self._seal, self._unseal = seal, unseal
        self.max_entries = max_entries
        self._lock = threading.Lock()

    def _path(self, epoch: int, app_id: bytes) -> Path:
        name = hashlib.sha256(
            b"app-signatures:" + epoch.to_bytes(4, "big") + len(app_id).to_bytes(2, "big") + app_id
        ).hexdigest()
        return self.dir / f"{name}.sealed"

    def get(self, epoch: int, app_id: bytes) -> KeptSignatures | None:
        path = self._path(epoch, app_id)
        try:
            doc = json.loads(self._unseal(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, SealingError) as exc:
            log.warning("app signature cache entry %s is unreadable (ignored): %s", path.name, exc)
            return None
        try:
            if (
                not isinstance(doc, dict)
                or doc.get("format") != _APP_SIG_FORMAT
                or (doc.get("epoch"), doc.get("app_id")) != (epoch, app_id.hex())
            ):
                raise ValueError("it names another app or epoch")
            kept = KeptSignatures(
                bytes.fromhex(doc["app_public_key"]),
                bytes.fromhex(doc["signature"]),
                bytes.fromhex(doc["app_ca_public_key"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("app signature cache entry %s is refused (ignored): %s", path.name, exc)
            return None
        return kept

    def put(
        self,
        epoch: int,
        app_id: bytes,
        *,
        app_key: tuple[bytes, bytes] | None = None,
        app_ca_public_key: bytes | None = None,
    ) -> bool:
        """Keep (already checked by the caller) the app-key signature `app_key` = (public key, signature)
        and/or the app CA key, beside what is kept for (epoch, app_id); the newest replaces an older one.
        False when nothing changed."""
        path = self._path(epoch, app_id)
        with self._lock:
            old = self.get(epoch, app_id) or KeptSignatures()
            new = KeptSignatures(
                app_key[0] if app_key else old.app_public_key,
                app_key[1] if app_key else old.signature,
                app_ca_public_key if app_ca_public_key is not None else old.app_ca_public_key,
            )
            if new == old and path.exists():
                return False
            record = json.dumps(
                {
                    "format": _APP_SIG_FORMAT,
                    "epoch": epoch,
                    "app_id": app_id.hex(),
                    "app_public_key": new.app_public_key.hex(),
                    "signature": new.signature.hex(),
                    "app_ca_public_key": new.app_ca_public_key.hex(),
                },
                sort_keys=True,
            ).encode()
            if not path.exists():
                entries = (
                    sorted(self.dir.glob("*.sealed"), key=lambda p: p.stat().st_mtime)
                    if self.dir.exists()
                    else []
                )
                for stale in entries[: max(0, len(entries) - self.max_entries + 1)]:
                    stale.unlink(missing_ok=True)
            atomic_write(path, self._seal(record))
        return True


def open_app_ca_cache(tee: TeePlatform, identity: KmsIdentity, home: Path | None = None) -> AppCaCache:
    seal_fn, unseal_fn = _sealers(tee, identity)
    return AppCaCache(kms_dir(home) / APP_CA_CACHE_DIR, seal_fn, unseal_fn)


def _raw_signature(cert: x509.Certificate) -> bytes:
    try:
        r, s = decode_dss_signature(cert.signature)
    except ValueError as exc:
        raise SealingError("the certificate's signature is not an ECDSA signature") from exc
    if not (0 < r < te.P256.order and 0 < s < te.P256.order):
        raise SealingError("the certificate's signature is out of range")
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _sealers(tee: TeePlatform, identity: KmsIdentity) -> tuple[_Sealer, _Sealer]:
    key = sealing_key(platform_sealing_secret(tee), identity.mr_aggregated)
    mr = identity.mr_aggregated
    return (lambda data: seal(key, mr, data)), (lambda blob: unseal(key, mr, blob))


def save_signing_share(
    share: te.KeyShare,
    tee: TeePlatform,
    identity: KmsIdentity,
    home: Path | None = None,
    *,
    file: str = SIGNING_SHARE_FILE,
) -> Path:
    """Seal this node's signing share (to the node's measurement) beside its VOPRF share (the P-256 CA
    key's share: `file=CA_SHARE_FILE`)."""
    path = kms_dir(home) / file
    atomic_write(path, _sealers(tee, identity)[0](key_share_to_json(share)))
    return path


def open_signer(tee: TeePlatform, identity: KmsIdentity, home: Path | None = None) -> ThresholdSigner | None:
    """This node's signer from its sealed signing share, with an EMPTY presignature pool (presignatures live
    in the memory of the process that made them only); None without a share. A sealed pool left by an
    older version is never loaded: it is deleted."""
    path = kms_dir(home) / SIGNING_SHARE_FILE
    if not path.exists():
        return None
    key = key_share_from_json(_sealers(tee, identity)[1](path.read_bytes()))
    (kms_dir(home) / LEGACY_PRESIG_FILE).unlink(missing_ok=True)
    return ThresholdSigner(key, PresignaturePool())


def save_ca_root(cert: x509.Certificate, home: Path | None = None) -> Path:
    """Write the group's root CA certificate (public; `open_ca_signer` checks it against the key again)."""
    path = kms_dir(home) / CA_ROOT_FILE
    atomic_write(path, cert_to_pem(cert).encode())
    return path


def open_ca_signer(
    tee: TeePlatform, identity: KmsIdentity, home: Path | None = None
) -> ThresholdSigner | None:
    """This node's signer of the group's P-256 CA key (empty pool), with the group root CA certificate if
    one was installed (checked to be this key's root, else the start fails); None without a CA share."""
    path = kms_dir(home) / CA_SHARE_FILE
    if not path.exists():
        return None
    key = key_share_from_json(_sealers(tee, identity)[1](path.read_bytes()))
    if key.curve != te.P256.name:
        raise SealingError(f"{CA_SHARE_FILE} holds a {key.curve} share, not the P-256 CA key's")
    signer = ThresholdSigner(key, PresignaturePool())
    root = kms_dir(home) / CA_ROOT_FILE
    if root.exists():
        try:
            signer.install_ca_root(x509.load_pem_x509_certificate(root.read_bytes()))
        except ValueError as exc:
            raise SealingError(f"{root} is not a certificate") from exc
    return signer
