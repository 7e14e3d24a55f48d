"""Onboarding: a new KMS copies the root keys from a running one over mutual RA-TLS.

Procedure (`onboard_from`), run inside the new KMS's TEE after `bootstrap.boot_kms_tee`:
  (1) connect to the source; its RA-TLS server certificate must verify (quote, binding, event log) and its
      boot_info must pass KmsAuth.isKmsAllowed — the new KMS will not take keys from an unauthorized KMS;
  (2) GetKmsKey with our own RA-TLS client certificate; the source runs the same checks on us
      (service.KmsService.get_kms_key: attestation + isKmsAllowed) and answers with the root keys;
  (3) the received keys must be the ones the source advertises (GetMeta) and, when KmsAuth has published
      KMS info, the ones on chain;
  (4) seal them to this TEE and measurement (sealing.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.attestation.policy import Policy
from teecloud.keys.appkeys import RootKeys
from teecloud.keys.errors import KeysError
from teecloud.kms import api
from teecloud.kms.authz import AuthChain
from teecloud.kms.bootstrap import KMS_APP_ID, KmsIdentity, KmsState, finish_kms_boot, save_state
from teecloud.kms.client import connect_kms
from teecloud.kms.errors import KmsClientError, KmsDenied, OnboardError, SealingError
from teecloud.kms.rootkeys import LocalRootKeys
from teecloud.tee.base import TeePlatform

__all__ = ["onboard_from", "published_kms_info"]


def published_kms_info(chain: Any) -> tuple[bytes, bytes] | None:
    """(k256_pubkey, ca_pubkey_der) published in KmsAuth, or None when nothing is published / no reader."""
    reader = getattr(chain, "kms_info", None)
    if not callable(reader):
        return None
    info = reader()
    k256, ca = bytes(info.get("k256_pubkey") or b""), bytes(info.get("ca_pubkey") or b"")
    if not k256 and not ca:
        return None
    return k256, ca


def onboard_from(
    source_url: str,
    *,
    tee: TeePlatform,
    identity: KmsIdentity,
    chain: AuthChain,
    collateral_for: Callable[[bytes, int], bytes],
    dev_root_der: bytes | None,
    policy: Policy | None = None,
    home: Path | None = None,
    clock: Callable[[], float] = time.time,
) -> LocalRootKeys:
    """Steps (1)-(4). Raises OnboardError naming the side that refused and why. `tee` must be at its boot
    measurement (`boot_kms_tee(..., finish=False)`): the source releases root keys only to boot-time
    evidence. The boot is finished here, whatever the outcome."""
    try:
        return _onboard(
            source_url,
            tee=tee,
            identity=identity,
            chain=chain,
            collateral_for=collateral_for,
            dev_root_der=dev_root_der,
            policy=policy,
            home=home,
            clock=clock,
        )
    finally:
        finish_kms_boot(tee)


def _onboard(
    source_url: str,
    *,
    tee: TeePlatform,
    identity: KmsIdentity,
    chain: AuthChain,
    collateral_for: Callable[[bytes, int], bytes],
    dev_root_der: bytes | None,
    policy: Policy | None,
    home: Path | None,
    clock: Callable[[], float],
) -> LocalRootKeys:
    # (1)
    client = connect_kms(
        source_url,
        collateral_for=collateral_for,
        dev_root_der=dev_root_der,
        policy=policy,
        chain=chain,
        clock=clock,
    )
    try:
        meta = client.meta()
        # (2)
        resp = client.attested_call(
            tee,
            api.PATH_GET_KMS_KEY,
            api.KmsKeyResponse,
            body=api.GetKmsKeyRequest().model_dump(),
            usage="kms:onboard",
            app_id=KMS_APP_ID,
        )
    except KmsDenied as exc:
        raise OnboardError(f"the source KMS refused this KMS: {exc.reason}") from exc
    except KmsClientError as exc:
        raise OnboardError(f"onboarding from {source_url} failed: {exc}") from exc
    # (3)
    try:
        ca_key = serialization.load_pem_private_key(resp.ca_key.encode(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise OnboardError("the source sent a root CA key that is not an EC key")
        root = RootKeys(ca_key, bytes.fromhex(resp.k256_key))
        state = KmsState.from_parts(
            root=root,
            root_ca_cert_pem=resp.ca_cert,
            temp_ca_key_pem=resp.temp_ca_key,
            temp_ca_cert_pem=resp.temp_ca_cert,
            created_at=int(clock()),
        )
    except (ValueError, KeysError, SealingError) as exc:
        raise OnboardError(f"the source sent unusable root keys: {exc}") from exc
    if root.ca_public_key_der.hex() != meta.ca_pubkey or root.k256_public_key.hex() != meta.k256_pubkey:
        raise OnboardError("the root keys received differ from the ones the source KMS advertises")
    try:
        published = published_kms_info(chain)
    except Exception as exc:  # cannot compare with the chain: refuse rather than guess
        raise OnboardError(f"cannot read KmsAuth's published KMS info: {exc}") from exc
    if published is not None and published != (root.k256_public_key, root.ca_public_key_der):
        raise OnboardError("the root keys received are not the ones published in KmsAuth")
    # (4)
    save_state(state, tee, identity, home)
    return LocalRootKeys(state)
