"""The gateway as a teecloud app: an app_id on chain (an AppAuth allowing the gateway's compose hash),
recorded as KmsAuth's `gateway_app_id`, and measured into the TEE that quotes the gateway's certificate keys.

What `gateway_app_id` means: the app whose code may hold this cloud's gateway keys. The KMS returns it with
every app's keys (`AppKeyResponse.gateway_app_id`, as dstack's KMS does), and `teecloud gateway check-cert
--app-id <gateway_app_id>` accepts a certificate key only when the quote published for it was made in that
app (teecloud.gateway.certkeys, step 5).

Local cloud (`teecloud up`): the gateway is a process beside the node, not a CVM, but its simulated TEE boots
through the same guest boot as every app (`boot_gateway` = teecloud.agent.boot.boot: the dstack events, the
boot nonce, `os-image-hash`, then the KMS key request, which the KMS grants only to boot-time evidence of an
app KmsAuth allows), so the quotes of its certificate keys name the gateway app and follow a boot the KMS
accepted. Its TLS keys are derived from the app keys the KMS released to that boot (teecloud.gateway.kmskeys),
so only a boot the KMS accepted has them; docs/gateway.md.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from teecloud.agent.boot import AgentState, boot
from teecloud.agent.keyprovider import KeyProvider
from teecloud.appcompose import compose_hash
from teecloud.tee.base import TeePlatform

__all__ = ["GATEWAY_APP_COMPOSE", "boot_gateway", "gateway_compose_hash", "register_gateway_app"]

# The gateway's app-compose.json (dstack's manifest shape). Its compose hash is what KmsAuth allows for the
# gateway app; a release of the gateway changes `version` and so needs an on-chain upgrade.
GATEWAY_APP_COMPOSE: dict[str, Any] = {
    "manifest_version": 2,
    "name": "teecloud-gateway",
    "runner": "teecloud-gateway",
    "version": "1",
    "kms_enabled": True,
    "gateway_enabled": False,
}


def gateway_compose_hash() -> bytes:
    return compose_hash(GATEWAY_APP_COMPOSE)


def register_gateway_app(chain: Any) -> str:
    """KmsAuth's `gateway_app_id`: the one already recorded when it allows the gateway's compose hash, or a
    new AppAuth for the gateway (owner: the chain client's signer) recorded there. Idempotent."""
    chash = gateway_compose_hash()
    current = str(chain.kms.info().gateway_app_id)
    if (
        int(current, 16) != 0
        and chain.is_registered(current)
        and chain.is_compose_hash_allowed(current, chash)
    ):
        return current
    app_id = str(chain.register_app(None, chash))
    chain.set_gateway_app_id(app_id)
    return app_id


def boot_gateway(tee: TeePlatform, app_id: str, key_provider: KeyProvider) -> AgentState:
    """Boot the gateway's TEE as the gateway app, the way every CVM boots (teecloud.agent.boot.boot, with the
    KMS-mode `os-image-hash` event), a new instance_id per gateway process. Raises what the boot raises (the
    KMS refusing the key request included)."""
    extra = [("os-image-hash", tee.os_image_hash)] if len(tee.os_image_hash) == 32 else []
    return boot(
        tee,
        json.dumps(GATEWAY_APP_COMPOSE),
        bytes.fromhex(app_id.removeprefix("0x")),
        secrets.token_bytes(20),
        key_provider,
        extra_events=extra,
    )
