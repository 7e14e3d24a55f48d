"""Check a running app from the outside: what `teecloud verify --app` / `teecloud attest` print.

Procedure (`verify_app`), every step recorded with its reason:
  (1) fetch   a fresh quote from the app's agent (through the node) for a random nonce; the node quotes
              over report_data = sha512("teecloud-attest:" ‖ nonce) (teecloud.node.api.attest_report_data)
  (2) quote   DCAP signature chain to the trusted root (the installation's dev root for simulated TEEs),
              TCB status, not debug (teecloud.attestation.verifier.verify_tdx_with_event_log)
  (3) nonce   the quote's report_data is attest_report_data(our nonce) (not a replay)
  (4) replay  the event log replays to the quoted RTMRs; app_id, compose_hash, instance_id come from it
  (5) compose sha256(app-compose.json served by the node) equals the measured compose_hash
  (6) chain   the compose hash is allowed for the app_id in its AppAuth, and KmsAuth.isAppAllowed(boot_info)
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from teecloud.attestation.models import Step

__all__ = ["AppVerdict", "verify_app", "verify_attestation"]


@dataclass
class AppVerdict:
    ok: bool
    steps: list[Step] = field(default_factory=list)
    app_id: str = ""
    compose_hash: str = ""
    instance_id: str = ""
    tcb_status: str = ""
    simulated: bool = False
    app_compose: str = ""

    @property
    def reason(self) -> str:
        failed = [s for s in self.steps if not s.ok]
        return failed[0].reason if failed else "all checks passed"

    def to_json(self) -> dict[str, Any]:
        return {
            "is_valid": self.ok,  # the same key `teecloud verify EVIDENCE --json` uses
            "ok": self.ok,
            "tee": "tdx-simulated" if self.simulated else "tdx",
            "reason": self.reason,
            "app_id": self.app_id,
            "compose_hash": self.compose_hash,
            "instance_id": self.instance_id,
            "tcb_status": self.tcb_status,
            "simulated": self.simulated,
            "steps": [{"name": s.name, "ok": s.ok, "reason": s.reason} for s in self.steps],
        }


def verify_attestation(
    att: Any, nonce: bytes, *, collateral: bytes, dev_root_der: bytes | None, chain: Any | None, now: int
) -> AppVerdict:
    """Steps (2)-(6) over an already fetched `teecloud.node.api.Attestation`."""

    verdict = AppVerdict(ok=False, app_compose=att.app_compose)
    steps = verdict.steps

    def fail(name: str, reason: str) -> AppVerdict:
        steps.append(Step(name, False, reason))
        return verdict

    # (2) + (4): the shared peer verifier (teecloud.peer), under the dev or production preset
    from teecloud.peer import PeerPolicy, PeerRejected, PeerVerifier, StaticCollateral

    peer_policy = PeerPolicy.dev(dev_root_der) if dev_root_der is not None else PeerPolicy.production()
    peers = PeerVerifier(peer_policy, StaticCollateral(lambda: collateral))
    try:
        quote = bytes.fromhex(att.quote)
        evidence = peers.verify_evidence(quote, att.event_log, now=now)
    except ValueError as exc:
        return fail("quote", f"the quote is not hex: {exc}")
    except PeerRejected as exc:
        return fail(exc.step or "quote", exc.reason)
    steps.append(Step("quote", True, f"DCAP quote verified, TCB {evidence.tcb_status}"))
    steps.append(Step("event_log", True, "event log replays to the quoted RTMRs"))
    verdict.tcb_status = evidence.tcb_status
    verdict.simulated = evidence.simulated
    # (3)
    from teecloud.node.api import attest_report_data

    if evidence.report_data != attest_report_data(nonce):
        return fail(
            "nonce",
            'the quote\'s report_data is not sha512("teecloud-attest:" ‖ our nonce) (replayed or '
            "substituted quote)",
        )
    steps.append(Step("nonce", True, 'report_data is sha512("teecloud-attest:" ‖ the fresh nonce)'))
    info = evidence.app_info
    if info is None or not info.compose_hash:
        return fail("event_log", "the event log has no compose-hash event")
    verdict.app_id, verdict.compose_hash, verdict.instance_id = (
        info.app_id.hex(),
        info.compose_hash.hex(),
        info.instance_id.hex(),
    )
    # (5)
    served = hashlib.sha256(att.app_compose.encode()).digest()
    if served != info.compose_hash:
        return fail("compose", "the app-compose.json served by the node is not the measured one")
    steps.append(Step("compose", True, "app-compose.json matches the measured compose_hash"))
    # (6)
    if chain is not None:
        if not chain.is_compose_hash_allowed(info.app_id, info.compose_hash):
            return fail(
                "chain", f"compose hash {info.compose_hash.hex()} is not allowed for app {info.app_id.hex()}"
            )
        from teecloud.peer import build_boot_info

        try:
            boot_info = build_boot_info(evidence)
        except PeerRejected as exc:
            return fail("chain", f"no boot_info to ask KmsAuth about: {exc.reason}")
        ok, reason = chain.is_app_allowed(boot_info)
        if not ok:
            return fail("chain", f"KmsAuth.isAppAllowed refuses this boot: {reason}")
        steps.append(Step("chain", True, "compose hash allowed on chain; KmsAuth.isAppAllowed = true"))
    verdict.ok = True
    return verdict


def verify_app(node_client: Any, ref: str, *, platform: Any, chain: Any | None) -> AppVerdict:
    """(1)-(6) for CVM `ref` on a node; `platform` supplies collateral and the dev root (SimulatedTdx)."""
    from teecloud.node.api import NodeApiError

    nonce = secrets.token_bytes(32)
    try:
        att = node_client.attestation(ref, nonce)
    except NodeApiError as exc:
        return AppVerdict(ok=False, steps=[Step("fetch", False, _fetch_reason(ref, exc))])
    now = int(time.time())
    return verify_attestation(
        att,
        nonce,
        collateral=platform.collateral(),
        dev_root_der=platform.dev_root_der(),
        chain=chain,
        now=now,
    )


def _fetch_reason(ref: str, exc: Any) -> str:
    """Why no quote could be fetched, as a sentence naming the app (the node's words kept after it)."""
    detail = str(exc).strip()
    if not detail or detail.startswith(("{", "[")):  # an empty or wordless body: the status is all it said
        detail = f"HTTP {exc.status}"
    if exc.status == 404:
        return f"no app {ref!r} on this node ({detail}): `teecloud ps` lists the apps by name and instance id"
    if exc.status == 409:
        return f"app {ref!r} is not running, so it cannot be attested ({detail}): start it first"
    if exc.status == 403:
        return f"app {ref!r} does not publish its attestation ({detail})"
    return f"cannot fetch a fresh quote of app {ref!r} from the node: {detail}"
