"""teecloud.keys: key derivation, signature chains, env encryption and RA-TLS certificates.

A pure library (no I/O, no clock reads): time, trust anchors and collateral are parameters.

    kdf        HKDF-SHA256 (salt "RATLS"), deterministic P-256 derivation, dstack's derive_dh_secret
    appkeys    RootKeys (KMS root), AppKeys and derive_app_keys, env-encrypt public key + signature_v1
    sigchain   GetKey / Sign keys and their signature chains, with verifiers
    envcrypt   encrypted environment variables (X25519 + AES-256-GCM, dstack format)
    certs      X.509 hierarchy: root CA -> app CA -> TLS leaves, chain verification
    ratls      RA-TLS certificates (dstack OIDs 1.3.6.1.4.1.62397.1.*): build, parse, check the key binding
    errors     the error tree (see teecloud.keys.errors)
"""

from teecloud.keys.appkeys import (
    AppKeys,
    RootKeys,
    derive_app_keys,
    env_encrypt_pubkey,
    sign_env_encrypt_pubkey,
)
from teecloud.keys.envcrypt import decrypt_env, encrypt_env
from teecloud.keys.errors import (
    CertChainInvalid,
    EnvDecryptionFailed,
    KeysError,
    KeyUsageError,
    MalformedKeyMaterial,
    RaTlsCertInvalid,
    SignatureChainInvalid,
)
from teecloud.keys.kdf import derive_key
from teecloud.keys.ratls import (
    RaTlsClaims,
    check_key_binding,
    generate_ratls_identity,
    make_ratls_cert,
    parse_ratls_cert,
)
from teecloud.keys.sigchain import verify_key_signature_chain, verify_sign_signature_chain

__all__ = [
    "AppKeys",
    "CertChainInvalid",
    "EnvDecryptionFailed",
    "KeyUsageError",
    "KeysError",
    "MalformedKeyMaterial",
    "RaTlsCertInvalid",
    "RaTlsClaims",
    "RootKeys",
    "SignatureChainInvalid",
    "check_key_binding",
    "decrypt_env",
    "derive_app_keys",
    "derive_key",
    "encrypt_env",
    "env_encrypt_pubkey",
    "generate_ratls_identity",
    "make_ratls_cert",
    "parse_ratls_cert",
    "sign_env_encrypt_pubkey",
    "verify_key_signature_chain",
    "verify_sign_signature_chain",
]
