"""The inference app's key set and the attestation route's report_data.

A key set names every key a client relies on, and is bound into a fresh quote per request of the attestation
route (`GET /v1/attestation/report?nonce=`):

    signing key   secp256k1, from the guest API's GetKey(path=RECEIPT_KEY_PATH, purpose=RECEIPT_KEY_PURPOSE);
                  its GetKey signature chain (reference/dstack.md §5) lets anyone check, with the KMS root's
                  k256 public key, that the KMS issued it to this app_id
    e2ee key      X25519 public key; its private key is GetKey(path=E2EE_KEY_PATH) (32 bytes), so every
                  replica of the app holds the same one and nobody outside the CVM does; and optionally a
                  secp256k1 E2EE public key derived from the same secret (teecloud.ai.e2ee)
    tls spki      sha256 of the DER SubjectPublicKeyInfo of the TLS key the app serves with (for pinning)
    epoch         bumped by the app to rotate all keys (it is part of both GetKey paths)

keyset_digest = sha256(JCS(key set JSON)); report_data = sha256(JCS({"keyset_digest", "nonce", "purpose"}))
(RFC 8785 JCS, hex strings), zero-padded to TDX's 64 bytes by the guest API. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eth_utils.crypto import keccak

from teecloud.ai._fields import get_hex, get_int, get_obj
from teecloud.ai._jcs import jcs_sha256
from teecloud.ai.errors import KeySetInvalid, MalformedInput
from teecloud.keys.errors import KeysError
from teecloud.keys.sigchain import verify_key_signature_chain

__all__ = [
    "ATTESTATION_PURPOSE",
    "E2EE_KEY_PATH",
    "KEYSET_VERSION",
    "MAX_NONCE_BYTES",
    "MIN_NONCE_BYTES",
    "RECEIPT_KEY_PATH",
    "RECEIPT_KEY_PURPOSE",
    "KeySet",
    "eth_address",
    "report_data_for",
]

KEYSET_VERSION = 1
RECEIPT_KEY_PATH = "teecloud/ai/receipt-signing"
RECEIPT_KEY_PURPOSE = "teecloud-ai-receipt"
E2EE_KEY_PATH = "teecloud/ai/e2ee-x25519"
ATTESTATION_PURPOSE = "teecloud-ai-attestation"
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64


def eth_address(public_key: bytes) -> str:
    """The Ethereum address (EIP-55 not applied: lowercase hex) of a secp256k1 public key (33 or 65 bytes),
    what a contract's ecrecover returns for a receipt signature."""
    import coincurve

    try:
        uncompressed = coincurve.PublicKey(public_key).format(compressed=False)
    except Exception as exc:  # coincurve raises ValueError / bare Exception for bad points
        raise MalformedInput("not a secp256k1 public key") from exc
    return "0x" + keccak(uncompressed[1:])[-20:].hex()


def key_path(base: str, epoch: int) -> str:
    """GetKey path of a key of this epoch (epoch 0 keeps the base path)."""
    return base if epoch == 0 else f"{base}/epoch-{epoch}"


@dataclass(frozen=True)
class KeySet:
    app_id: bytes  # 20 bytes
    signing_public_key: bytes  # 33-byte compressed secp256k1
    signing_key_chain: tuple[bytes, ...]  # GetKey chain: [app key sig, KMS root sig], 65 bytes each
    e2ee_public_key: bytes  # 32-byte X25519
    tls_spki_sha256: bytes  # 32 bytes (all zero when the app serves no TLS itself)
    epoch: int = 0
    # 33-byte compressed secp256k1 E2EE key (teecloud.ai.e2ee.k256_e2ee_public_key); None: X25519 only, and
    # the field is left out of the JSON (so key sets without it keep their digest)
    e2ee_k256_public_key: bytes | None = None

    @property
    def signing_address(self) -> str:
        return eth_address(self.signing_public_key)

    def to_json(self) -> dict[str, Any]:
        out = {
            "version": KEYSET_VERSION,
            "app_id": self.app_id.hex(),
            "signing_address": self.signing_address,
            "signing_public_key": self.signing_public_key.hex(),
            "signing_key_chain": [s.hex() for s in self.signing_key_chain],
            "e2ee_public_key": self.e2ee_public_key.hex(),
            "tls_spki_sha256": self.tls_spki_sha256.hex(),
            "epoch": self.epoch,
        }
        if self.e2ee_k256_public_key is not None:
            out["e2ee_k256_public_key"] = self.e2ee_k256_public_key.hex()
        return out

    def digest(self) -> bytes:
        return jcs_sha256(self.to_json())

    @classmethod
    def from_json(cls, value: Any) -> KeySet:
        """Parse (structure only; `verify_chain` checks the signatures)."""
        obj = get_obj(value, "key set")
        if obj.get("version") != KEYSET_VERSION:
            raise MalformedInput(f"key set version must be {KEYSET_VERSION}")
        chain = obj.get("signing_key_chain")
        if not isinstance(chain, list) or len(chain) != 2:
            raise MalformedInput("'signing_key_chain' must be a list of 2 hex signatures")
        ks = cls(
            app_id=get_hex(obj, "app_id", size=20),
            signing_public_key=get_hex(obj, "signing_public_key", size=33),
            signing_key_chain=tuple(get_hex({"s": s}, "s", size=65) for s in chain),
            e2ee_public_key=get_hex(obj, "e2ee_public_key", size=32),
            tls_spki_sha256=get_hex(obj, "tls_spki_sha256", size=32),
            epoch=get_int(obj, "epoch", hi=2**32 - 1),
            e2ee_k256_public_key=(
                get_hex(obj, "e2ee_k256_public_key", size=33) if "e2ee_k256_public_key" in obj else None
            ),
        )
        if ks.e2ee_k256_public_key is not None and ks.e2ee_k256_public_key[0] not in (2, 3):
            raise MalformedInput("'e2ee_k256_public_key' must be a compressed secp256k1 point")
        if obj.get("signing_address") != ks.signing_address:
            raise MalformedInput("'signing_address' is not the address of 'signing_public_key'")
        if set(obj) != set(ks.to_json()):
            raise MalformedInput("key set has unknown or missing fields")
        return ks

    def verify_chain(self, kms_root_public_key: bytes) -> None:
        """(1) the signing key's GetKey chain recovers an app key that (2) the KMS root (k256, the one
        the KmsAuth contract publishes) issued for this app_id. Raises KeySetInvalid(step="chain")."""
        try:
            verify_key_signature_chain(
                app_id=self.app_id,
                public_key=self.signing_public_key,
                purpose=RECEIPT_KEY_PURPOSE,
                signature_chain=list(self.signing_key_chain),
                kms_root_public_key=kms_root_public_key,
            )
        except KeysError as exc:
            raise KeySetInvalid(str(exc), step="chain") from exc


def report_data_for(keyset_digest: bytes, nonce: bytes, purpose: str = ATTESTATION_PURPOSE) -> bytes:
    """sha256(JCS({"keyset_digest": hex, "nonce": hex, "purpose": purpose})): 32 bytes."""
    if len(keyset_digest) != 32:
        raise ValueError("keyset_digest is 32 bytes")
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise MalformedInput(f"nonce must be {MIN_NONCE_BYTES}..{MAX_NONCE_BYTES} bytes, got {len(nonce)}")
    return jcs_sha256({"keyset_digest": keyset_digest.hex(), "nonce": nonce.hex(), "purpose": purpose})


def chain_from_hex(chain: Sequence[str]) -> tuple[bytes, ...]:
    try:
        return tuple(bytes.fromhex(s.removeprefix("0x")) for s in chain)
    except (ValueError, AttributeError) as exc:
        raise MalformedInput("signature chain entries must be hex") from exc
