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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from teecloud.errors import Error
from teecloud.keys import threshold as th
from teecloud.keys.appkeys import AppKeys
from teecloud.keys.errors import KeysError
from teecloud.keys.ratls import QuoteSource
from teecloud.kms import api
from teecloud.kms.challenge import MAX_TOKENS
from teecloud.kms.client import ComposeBook, KmsClient, vm_config_json
from teecloud.kms.errors import KmsClientError, SealingError
from teecloud.kms.threshold import DkgPlan, ResharePlan, ThresholdShare

__all__ = ["ThresholdGroup", "ThresholdKeyProvider", "join_dkg", "join_reshare"]

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
        hedge_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`hedge_s`: a node silent for this long is not waited for once others can stand in for it (its
        call is abandoned, not cancelled: it ends at its client's own timeout)."""
        if set(clients) != set(group.nodes):
            raise KmsClientError("threshold key provider: one client per node of the group")
        self.group = group
        self._clients = dict(clients)
        self._clock = clock
        self._hedge_s = hedge_s
        self._public_shares = {i: th.public_share(group.commitments, i) for i in group.nodes}
        self._challenged: list[int] = sorted(group.nodes)
        self.faults: dict[int, str] = {}
        self.composes = ComposeBook()  # the GPU gate: bind_app_compose

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.group.group_public_key.hex(), "epoch": self.group.epoch}

    def _gather(
        self,
        indices: list[int],
        fn: Callable[[KmsClient], Any],
        accept: Callable[[int, Any], bool],
        *,
        need: int,
        all_first: bool,
    ) -> dict[int, Any]:
        """Call fn on nodes in parallel and return {index: result or exception} for the calls that ended.
        all_first: every node at once, then wait for all of them, or — after hedge_s — only until `need`
        results are accepted. Otherwise `need` nodes first, a replacement for each failure, and all the rest
        when hedge_s passes without `need` accepted results. Calls still running are abandoned."""
        pool = ThreadPoolExecutor(max_workers=max(1, len(indices)))
        queue = list(indices)
        futures: dict[Future[Any], int] = {}
        results: dict[int, Any] = {}
        accepted = 0

        def launch(k: int) -> None:
            for _ in range(max(0, k)):
                if queue:
                    i = queue.pop(0)
                    futures[pool.submit(fn, self._clients[i])] = i

        try:
            launch(len(queue) if all_first else need)
            hedge_at = time.monotonic() + self._hedge_s
            pending = set(futures)
            while pending or queue:
                if all_first and accepted >= need and time.monotonic() >= hedge_at:
                    break
                if not all_first and accepted >= need:
                    break
                timeout = max(0.0, hedge_at - time.monotonic()) if time.monotonic() < hedge_at else None
                if all_first and accepted >= need:
                    timeout = max(0.0, hedge_at - time.monotonic())
                done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = futures[fut]
                    try:
                        results[i] = fut.result()
                    except Exception as exc:  # each node's failure is that node's fault, named by the caller
                        results[i] = exc
                    accepted += accept(i, results[i])
                before = set(futures)
                if time.monotonic() >= hedge_at:
                    launch(len(queue))  # hedge: nobody waits on a silent node
                else:
                    launch(need - accepted - len(pending))  # replace failures
                pending |= set(futures) - before
                if not done and not pending and not queue:
                    break
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return results

    # (1)
    def boot_nonce(self) -> bytes:
        indices = sorted(self.group.nodes)
        answers = self._gather(
            indices,
            lambda c: c.boot_nonce(),
            lambda _i, a: isinstance(a, bytes),
            need=self.group.t,
            all_first=True,
        )
        ok = [i for i, a in sorted(answers.items()) if isinstance(a, bytes)]
        self.faults = {
            i: _describe(answers[i]) if i in answers else f"no answer within {self._hedge_s:g} s"
            for i in indices
            if i not in ok
        }
        if len(ok) < self.group.t:
            raise KmsClientError(
                f"only {len(ok)} of the {self.group.t} KMS nodes needed gave a boot challenge"
                + _fault_text(self.faults)
            )
        self._challenged = ok
        return b"".join(answers[i] for i in ok)

    def bind_app_compose(self, app_compose: str) -> None:
        """Send this normalized app-compose.json with every evaluation (the GPU gate; boot() calls it)."""
        self.composes.add(app_compose)

    # (2)-(4)
    def get_app_keys(self, tee: QuoteSource, app_id: bytes, instance_id: bytes) -> AppKeys:
        try:
            inputs = th.app_contexts(self.group.epoch, app_id, instance_id)
        except KeysError as exc:
            raise KmsClientError(f"cannot derive keys for this app: {exc}") from exc
        body = api.ThresholdEvaluateRequest(
            vm_config=vm_config_json(tee), app_compose=self.composes.for_tee(tee)
        ).model_dump()

        def ask(client: KmsClient) -> api.ThresholdEvaluateResponse:
            return client.attested_call(
                tee,
                api.PATH_THRESHOLD_EVALUATE,
                api.ThresholdEvaluateResponse,
                body=body,
                usage="app:kms-client",
                app_id=app_id,
            )

        # Ask t nodes first; another for each that fails, and all the rest if hedge_s passes first: an honest
        # run costs the cluster t evaluations, not n, and no silent node holds the boot up.
        faults = dict(self.faults)
        valid: dict[int, tuple[list[th.Partial], str, str]] = {}

        def accept(i: int, answer: Any) -> bool:
            if isinstance(answer, BaseException):
                faults[i] = _describe(answer)
                return False
            problem = self._check(i, answer, app_id, instance_id, inputs)
            if problem:
                faults[i] = problem
                log.warning("KMS node %d (%s) is skipped: %s", i, self.group.nodes[i], problem)
                return False
            partials = [
                th.Partial(i, bytes.fromhex(p.element), bytes.fromhex(p.proof)) for p in answer.partials
            ]
            valid[i] = (partials, answer.gateway_app_id, answer.os_image_hash)
            return True

        answered = self._gather(self._challenged, ask, accept, need=self.group.t, all_first=False)
        for i in self._challenged:
            if i not in answered and i not in valid and len(valid) < self.group.t:
                faults[i] = f"no answer within {self._hedge_s:g} s"
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


def _collect(
    session: bytes,
    dealer_ids: tuple[int, ...],
    index: int,
    tee: QuoteSource,
    dealers: Mapping[int, KmsClient],
    t_new: int,
    app_id: bytes,
) -> list[th.Dealing]:
    """From every dealer of a round: its commitments and this node's sub-share (over mutual RA-TLS, with this
    node's boot-time evidence). Any dealer failing fails the round (named)."""
    if set(dealers) != set(dealer_ids):
        raise KmsClientError("one client per dealer of the round")
    body = api.ReshareDealRequest(session=session.hex(), index=index).model_dump()

    def ask(i: int) -> api.ReshareDealResponse:
        return dealers[i].attested_call(
            tee, api.PATH_RESHARE_DEAL, api.ReshareDealResponse, body=body, usage="kms:reshare", app_id=app_id
        )

    with ThreadPoolExecutor(max_workers=len(dealer_ids)) as pool:
        futures = {i: pool.submit(ask, i) for i in dealer_ids}
    dealings: list[th.Dealing] = []
    faults: dict[int, str] = {}
    for i, fut in sorted(futures.items()):
        try:
            resp = fut.result()
            if resp.dealer != i or resp.session != session.hex():
                raise KmsClientError(f"answered as dealer {resp.dealer} of another round")
            commitments = tuple(bytes.fromhex(c) for c in resp.commitments)
            subshare = int.from_bytes(bytes.fromhex(resp.subshare), "little")
            if len(commitments) != t_new:
                raise KmsClientError(f"sent {len(commitments)} commitments, not t = {t_new}")
        except (Error, ValueError) as exc:
            faults[i] = _describe(exc)
            continue
        dealings.append(th.Dealing(i, commitments, {index: subshare}))
    if faults:
        raise KmsClientError("the round failed; no share was made" + _fault_text(faults))
    return dealings


def _complaint(dealers: list[int]) -> KmsClientError:
    return KmsClientError(
        "the round failed; no share was made"
        + _fault_text(
            {i: "its dealing does not match its commitments (or its old public share)" for i in dealers}
        )
    )


def join_reshare(
    plan: ResharePlan,
    index: int,
    tee: QuoteSource,
    dealers: Mapping[int, KmsClient],
    *,
    app_id: bytes,
) -> ThresholdShare:
    """A joining KMS node's side of a reshare round, run at its boot (the dealers release sub-shares to
    boot-time evidence only). Each dealing is checked (C_0 is the dealer's old public share, the sub-share
    matches the commitments); then s'_index = Σ λ_i·f_i(index). Any failing dealer fails the round (named):
    every new node must sum the same dealings, so a partial round is never completed."""
    dealings = _collect(plan.session, plan.dealers, index, tee, dealers, plan.t_new, app_id)
    received = {d.dealer: d.shares[index] for d in dealings}
    try:
        share, complaints = th.reshare_receive(plan.old_commitments, dealings, index, received)
        if complaints:
            raise _complaint(complaints)
        return ThresholdShare(
            plan.epoch, index, plan.t_new, plan.n_new, share, th.reshare_commitments(dealings)
        )
    except (KeysError, SealingError) as exc:
        raise KmsClientError(f"the reshare round failed: {exc}") from exc


def join_dkg(
    plan: DkgPlan,
    index: int,
    tee: QuoteSource,
    dealers: Mapping[int, KmsClient],
    *,
    app_id: bytes,
) -> ThresholdShare:
    """A new KMS node's side of a Joint-Feldman DKG round, at its boot: every dealer's sub-share is checked
    against that dealer's commitments (a failing dealer is a complaint, and — without GJKR's answer round —
    fails the round); the share is the sum, the group commitments the sums of the dealers'."""
    dealings = _collect(plan.session, plan.dealers, index, tee, dealers, plan.t_new, app_id)
    try:
        total, complaints = th.joint_feldman(dealings, index, {d.dealer: d.shares[index] for d in dealings})
        if complaints:
            raise _complaint(complaints)
        return ThresholdShare(plan.epoch, index, plan.t_new, plan.n_new, total, th.sum_commitments(dealings))
    except (KeysError, SealingError) as exc:
        raise KmsClientError(f"the DKG round failed: {exc}") from exc
