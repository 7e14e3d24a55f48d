"""The gateway as a teecloud app: an app_id on chain (an AppAuth allowing the gateway's compose hash),
recorded as KmsAuth's `gateway_app_id`, and measured into the TEE that quotes the gateway's certificate keys.

What `gateway_app_id` means: the app whose code may hold this cloud's gateway keys. The KMS returns it with
every app's keys (`AppKeyResponse.gateway_app_id`, as dstack's KMS does), and `teecloud gateway check-cert
--app-id <gateway_app_id>` accepts a certificate key only when the quote published for it was made in that
app (teecloud.gateway.certkeys, step 5).

Local cloud (`teecloud up`): the gateway is a process beside the node, not a CVM. Its simulated TEE gets the
dstack boot events of that app (`app-id`, `compose-hash`, `instance-id`; `measure_gateway`) from the local
launcher, so its quotes name the app; it does not boot through the agent (no KMS key request, no boot-time
evidence, its keys are born in its process rather than given by the KMS). docs/gateway.md lists this gap.
"""

from __future__ import annotations

import secrets
from typing import Any

from teecloud.appcompose import compose_hash
from teecloud.tee.base import TeePlatform

__all__ = ["GATEWAY_APP_COMPOSE", "gateway_compose_hash", "measure_gateway", "register_gateway_app"]

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


def measure_gateway(tee: TeePlatform, app_id: str) -> bytes:
    """The dstack boot events naming the gateway app, into the gateway's (simulated) TEE; a new instance_id
    per gateway process (returned)."""
    instance_id = secrets.token_bytes(20)
    tee.emit_event("app-id", bytes.fromhex(app_id.removeprefix("0x")))
    tee.emit_event("compose-hash", gateway_compose_hash())
    tee.emit_event("instance-id", instance_id)
    return instance_id
