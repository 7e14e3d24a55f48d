"""Threshold mode, client side: the key provider of a CVM whose keys come from t of n KMS nodes.

    ThresholdGroup          what the client trusts: root epoch, t, the group's Feldman commitments (C_0 is the
                            group public key) and each node's URL by share index — from the ceremony's
                            published record, never from a node's say-so
    ThresholdKeyProvider    teecloud.agent.keyprovider.KeyProvider over the nodes

Procedure:
  (1) boot_nonce(): one fresh challenge from each reachable node (teecloud.kms.challenge), concatenated in
      share-index order (at most MAX_TOKENS); fewer than t reachable nodes fail the boot here;
  (2) get_app_keys(): to t of the nodes that gave a challenge, in parallel, a ThresholdEvaluate request over
      mutual RA-TLS (each node's server certificate checked by its own connect_kms client), then to the
      others only if some of those failed; each node applies the whole key-release rule on its own and
      redeems only its own challenge;
  (3) each answer is checked: the node's index and epoch, our app and instance, the two VOPRF inputs the
      node evaluated equal the ones we compute, and each partial's DLEQ proof verifies against the node's
      public share Y_i = Σ i^j·C_j; a node failing any check is named (`faults`) and skipped;
  (4) any t valid answers combine (Lagrange at 0) into the two VOPRF outputs, from which the app's keys are
      derived inside this CVM (teecloud.keys.threshold.app_keys_from_outputs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from teecloud.errors import Error
from teecloud.keys import threshold as th
from teecloud.keys.appkeys import AppKeys
from teecloud.keys.errors import KeysError
from teecloud.keys.ratls import QuoteSource
from teecloud.kms import api
from teecloud.kms.challenge import MAX_TOKENS
from teecloud.kms.client import KmsClient, vm_config_json
from teecloud.kms.errors import KmsClientError

__all__ = ["ThresholdGroup", "ThresholdKeyProvider"]

log = logging.getLogger("teecloud.kms.threshold")


@dataclass(frozen=True)
class ThresholdGroup:
    epoch: int
    t: int
    commitments: tuple[bytes, ...]
    nodes: Mapping[int, str]  # share index -> https URL

    def __post_init__(self) -> None:
        n = len(self.nodes)
        if not 1 <= self.t <= n <= MAX_TOKENS or len(self.commitments) != self.t:
            raise KmsClientError(
                f"threshold group: need 1 <= t <= n <= {MAX_TOKENS} and t commitments "
                f"(t={self.t}, n={n}, {len(self.commitments)} commitments)"
            )
        if any(not 1 <= i <= th.MAX_NODES for i in self.nodes):
            raise KmsClientError("threshold group: share indices are 1..64")

    @property
    def group_public_key(self) -> bytes:
        return self.commitments[0]


class ThresholdKeyProvider:
    """KeyProvider over t-of-n KMS nodes. `clients` maps a share index to a verifying KmsClient (built with
    teecloud.kms.client.connect_kms). After get_app_keys, `faults` names every node that failed and why."""

    name = "kms-threshold"

    def __init__(
        self,
        group: ThresholdGroup,
        clients: Mapping[int, KmsClient],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if set(clients) != set(group.nodes):
            raise KmsClientError("threshold key provider: one client per node of the group")
        self.group = group
        self._clients = dict(clients)
        self._clock = clock
        self._public_shares = {i: th.public_share(group.commitments, i) for i in group.nodes}
        self._challenged: list[int] = sorted(group.nodes)
        self.faults: dict[int, str] = {}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.group.group_public_key.hex(), "epoch": self.group.epoch}

    def _fan_out(self, indices: list[int], fn: Callable[[KmsClient], Any]) -> dict[int, Any]:
        """fn on each node's client in parallel: {index: result or the exception it raised}."""
        out: dict[int, Any] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(indices))) as pool:
            futures = {i: pool.submit(fn, self._clients[i]) for i in indices}
            for i, fut in futures.items():
                try:
                    out[i] = fut.result()
                except Exception as exc:  # each node's failure is that node's fault, named below
                    out[i] = exc
        return out

    # (1)
    def boot_nonce(self) -> bytes:
        answers = self._fan_out(sorted(self.group.nodes), lambda c: c.boot_nonce())
        ok = [i for i, a in sorted(answers.items()) if isinstance(a, bytes)]
        self.faults = {i: _describe(a) for i, a in answers.items() if not isinstance(a, bytes)}
        if len(ok) < self.group.t:
            raise KmsClientError(
                f"only {len(ok)} of the {self.group.t} KMS nodes needed gave a boot challenge"
                + _fault_text(self.faults)
            )
        self._challenged = ok
        return b"".join(answers[i] for i in ok)

    # (2)-(4)
    def get_app_keys(self, tee: QuoteSource, app_id: bytes, instance_id: bytes) -> AppKeys:
        try:
            inputs = th.app_contexts(self.group.epoch, app_id, instance_id)
        except KeysError as exc:
            raise KmsClientError(f"cannot derive keys for this app: {exc}") from exc
        body = api.ThresholdEvaluateRequest(vm_config=vm_config_json(tee)).model_dump()

        def ask(client: KmsClient) -> api.ThresholdEvaluateResponse:
            return client.attested_call(
                tee,
                api.PATH_THRESHOLD_EVALUATE,
                api.ThresholdEvaluateResponse,
                body=body,
                usage="app:kms-client",
                app_id=app_id,
            )

        # Ask t nodes first; only if some of them fail, the others (a second round): an honest run costs
        # the cluster t evaluations, not n.
        faults = dict(self.faults)
        valid: dict[int, tuple[list[th.Partial], str, str]] = {}
        first, rest = self._challenged[: self.group.t], self._challenged[self.group.t :]
        for batch in (first, rest):
            if not batch or len(valid) >= self.group.t:
                break
            for i, answer in sorted(self._fan_out(batch, ask).items()):
                if isinstance(answer, BaseException):
                    faults[i] = _describe(answer)
                    continue
                problem = self._check(i, answer, app_id, instance_id, inputs)
                if problem:
                    faults[i] = problem
                    log.warning("KMS node %d (%s) is skipped: %s", i, self.group.nodes[i], problem)
                    continue
                partials = [
                    th.Partial(i, bytes.fromhex(p.element), bytes.fromhex(p.proof)) for p in answer.partials
                ]
                valid[i] = (partials, answer.gateway_app_id, answer.os_image_hash)
        self.faults = faults
        t = self.group.t
        if len(valid) < t:
            raise KmsClientError(
                f"only {len(valid)} valid partial evaluations, {t} needed" + _fault_text(faults)
            )
        chosen = sorted(valid)[:t]
        if len({valid[i][1:] for i in chosen}) != 1:
            raise KmsClientError("the KMS nodes disagree on the gateway app id or the measured OS image")
        outputs = [th.combine(inputs[k], [valid[i][0][k] for i in chosen], t) for k in range(len(inputs))]
        _, gateway_app_id, os_image_hex = valid[chosen[0]]
        return th.app_keys_from_outputs(
            outputs[0],
            outputs[1],
            app_id,
            now=int(self._clock()),
            key_provider_info=self.info(),
            gateway_app_id=gateway_app_id,
            os_image_hash=bytes.fromhex(os_image_hex),
        )

    def _check(
        self,
        i: int,
        answer: api.ThresholdEvaluateResponse,
        app_id: bytes,
        instance_id: bytes,
        inputs: tuple[bytes, bytes],
    ) -> str:
        """'' when node i's answer is right, else what is wrong with it."""
        if answer.index != i or answer.epoch != self.group.epoch:
            return f"answered as share {answer.index} of epoch {answer.epoch}"
        if answer.app_id != app_id.hex() or answer.instance_id != instance_id.hex():
            return "answered for another app or instance"
        if len(answer.partials) != len(inputs):
            return f"returned {len(answer.partials)} partials, not {len(inputs)}"
        try:
            bytes.fromhex(answer.os_image_hash)
            for p, x in zip(answer.partials, inputs, strict=True):
                if bytes.fromhex(p.input) != x:
                    return "evaluated another input than this app's context"
                partial = th.Partial(i, bytes.fromhex(p.element), bytes.fromhex(p.proof))
                if not th.verify_partial(self._public_shares[i], x, partial):
                    return "a partial evaluation's DLEQ proof does not verify against the node's public share"
        except ValueError:
            return "a malformed partial evaluation"
        return ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Error):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _fault_text(faults: Mapping[int, str]) -> str:
    if not faults:
        return ""
    return "; failed nodes: " + "; ".join(f"node {i}: {why}" for i, why in sorted(faults.items()))
