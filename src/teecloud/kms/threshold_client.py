"""Threshold mode, client side: the key provider of a CVM whose keys come from t of n KMS nodes.

    ThresholdGroup          what the client trusts: root epoch, t, the group's Feldman commitments (C_0 is the
                            group public key), each node's URL by share index and the group's signing key —
                            from the chain (group_from_chain: KmsGroup at a finality depth), never from a
                            node's say-so
    group_from_chain        KmsGroup's record of an epoch at a finality depth; a local group.json that
                            disagrees with it (group key, signing key) is refused
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
      derived inside this CVM (teecloud.keys.threshold.app_keys_from_outputs);
  (5) for a group with a signing key: the KMS signature of the app's k256 key (the GetKey chain's root
      signature) from t nodes' signature shares over one presignature they all hold
      (teecloud.keys.threshold_ecdsa; each share checked, the result checked against the group's key).
      Without t valid shares the boot goes on without it (`signature_error`): GetKey then refuses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from teecloud.appcompose import AppComposeError
from teecloud.chain.errors import ChainError
from teecloud.errors import Error
from teecloud.keys import threshold as th
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.appkeys import AppKeys
from teecloud.keys.errors import KeysError
from teecloud.keys.ratls import QuoteSource
from teecloud.keys.sigchain import k256_public_key, kms_issued_digest
from teecloud.kms import api
from teecloud.kms.challenge import MAX_TOKENS
from teecloud.kms.client import ComposeBook, KmsClient, vm_config_json
from teecloud.kms.errors import KmsClientError, SealingError
from teecloud.kms.rotation import KeyEpochs, key_epochs_of_text
from teecloud.kms.threshold import GROUP_FILE, DkgPlan, GroupRecord, ResharePlan, ThresholdShare

__all__ = [
    "NO_PRESIGNATURES",
    "ThresholdGroup",
    "ThresholdKeyProvider",
    "group_from_chain",
    "join_dkg",
    "join_reshare",
]

log = logging.getLogger("teecloud.kms.threshold")

# why a boot of a group that signs got no KMS signature when t nodes hold no common presignature
NO_PRESIGNATURES = "no presignatures, refill in progress"


@dataclass(frozen=True)
class ThresholdGroup:
    epoch: int
    t: int
    commitments: tuple[bytes, ...]
    nodes: Mapping[int, str]  # share index -> https URL
    # the group's secp256k1 signing key (33 bytes, from KmsGroup's record): what the KMS signature of an
    # app key verifies under (the GetKey chain's root); empty for a group that has no signing key
    signing_key: bytes = b""

    def __post_init__(self) -> None:
        if self.signing_key and len(self.signing_key) != 33:
            raise KmsClientError("threshold group: the signing key is a 33-byte compressed secp256k1 key")
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


def group_from_chain(
    kms_group: Any, epoch: int, *, finality_depth: int = 0, local: GroupRecord | None = None
) -> ThresholdGroup:
    """The group of root epoch `epoch` as KmsGroup (`kms_group`: teecloud.chain.kmsgroup.KmsGroup) records
    it at the block `finality_depth` blocks below the head (after the chain-id check; walked down by parent
    hash): the serving committee's t, Feldman commitments and node URLs, and the epoch's signing key (none
    recorded: a group that does not sign). `local`: this installation's group record (kms-nodes/group.json);
    when it is of this epoch and names another group key or another signing key than the chain — or a
    signing key the chain does not record — it is refused (KmsClientError): the file is the operator's,
    the chain is what every client checks. Its commitments may lag the chain's (after a reshare the serving
    committee is the chain's), so they are not compared."""
    try:
        at = kms_group.final_block(finality_depth)
        committee = kms_group.active(epoch, at=at)
        signing_key = kms_group.signing_key(epoch, at=at) if committee is not None else None
    except (ChainError, ValueError) as exc:
        raise KmsClientError(f"the threshold group could not be read from KmsGroup: {exc}") from exc
    if committee is None:
        raise KmsClientError(
            f"KmsGroup names no committee serving root epoch {epoch} at block {at.number} "
            f"({finality_depth} blocks below the head)"
        )
    if local is not None and local.epoch == epoch:
        differs = f"{GROUP_FILE} disagrees with the chain: its"
        chain_key = signing_key.hex() if signing_key else "none"
        if local.commitments[0] != committee.group_public_key:
            raise KmsClientError(
                f"{differs} group key {local.commitments[0].hex()} is not the one KmsGroup records for epoch "
                f"{epoch} ({committee.group_public_key.hex()}); refusing it"
            )
        if local.signing_key and local.signing_key != signing_key:
            raise KmsClientError(
                f"{differs} signing key {local.signing_key.hex()} is not the one KmsGroup records for epoch "
                f"{epoch} ({chain_key}); refusing it"
            )
    return ThresholdGroup(
        committee.epoch, committee.t, committee.commitments, committee.urls, signing_key=signing_key or b""
    )


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
        epochs: Mapping[int, ThresholdGroup] | None = None,
    ) -> None:
        """`hedge_s`: a node silent for this long is not waited for once others can stand in for it (its
        call is abandoned, not cancelled: it ends at its client's own timeout). `epochs`: the groups of the
        other root epochs this client trusts (after a rotation, teecloud.kms.rotation), served by the same
        nodes; an app's measured app-compose picks its epoch."""
        if set(clients) != set(group.nodes):
            raise KmsClientError("threshold key provider: one client per node of the group")
        self.group = group
        self.groups = {group.epoch: group, **dict(epochs or {})}
        if any(g.epoch != e or dict(g.nodes) != dict(group.nodes) for e, g in self.groups.items()):
            raise KmsClientError(
                "threshold key provider: each epoch's group is under its epoch and on the same nodes"
            )
        self._clients = dict(clients)
        self._clock = clock
        self._hedge_s = hedge_s
        self._public_shares = {
            e: {i: th.public_share(g.commitments, i) for i in g.nodes} for e, g in self.groups.items()
        }
        self._challenged: list[int] = sorted(group.nodes)
        self.faults: dict[int, str] = {}
        self.signature_error = ""  # why the last get_app_keys got no KMS signature ('' when it did)
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

    def _key_epochs(self, tee: QuoteSource) -> KeyEpochs:
        """The root epochs of the booting app, from its measured app-compose (bound by boot()); without one,
        this provider's group's epoch."""
        text = self.composes.for_tee(tee)
        if not text:
            return KeyEpochs(self.group.epoch)
        try:
            return key_epochs_of_text(text)
        except AppComposeError as exc:
            raise KmsClientError(str(exc)) from exc

    def _group_of(self, epoch: int) -> ThresholdGroup:
        group = self.groups.get(epoch)
        if group is None:
            raise KmsClientError(
                f"the app's measured app-compose names root epoch {epoch}, and this client trusts no group "
                f"for it (epochs {', '.join(map(str, sorted(self.groups)))}; see `teecloud kms group "
                f"--epoch {epoch}`)"
            )
        return group

    # (2)-(4)
    def get_app_keys(self, tee: QuoteSource, app_id: bytes, instance_id: bytes) -> AppKeys:
        """The app's keys under its current root epoch (its measured app-compose's `kms_key_epoch`)."""
        return self._app_keys(tee, app_id, instance_id, self._group_of(self._key_epochs(tee).current))

    def get_previous_app_keys(self, tee: QuoteSource, app_id: bytes, instance_id: bytes) -> AppKeys | None:
        """While an app migrates (`kms_key_epoch_previous` in its measured app-compose): its keys under the
        previous epoch, to re-wrap its volume (teecloud.agent.storage); None when it does not migrate."""
        previous = self._key_epochs(tee).previous
        if previous is None:
            return None
        return self._app_keys(tee, app_id, instance_id, self._group_of(previous), sign=False)

    def _app_keys(
        self, tee: QuoteSource, app_id: bytes, instance_id: bytes, group: ThresholdGroup, *, sign: bool = True
    ) -> AppKeys:
        try:
            inputs = th.app_contexts(group.epoch, app_id, instance_id)
        except KeysError as exc:
            raise KmsClientError(f"cannot derive keys for this app: {exc}") from exc
        body = api.ThresholdEvaluateRequest(
            vm_config=vm_config_json(tee), app_compose=self.composes.for_tee(tee), epoch=group.epoch
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
        offered: dict[int, list[str]] = {}

        def accept(i: int, answer: Any) -> bool:
            if isinstance(answer, BaseException):
                faults[i] = _describe(answer)
                return False
            problem = self._check(i, answer, app_id, instance_id, inputs, group.epoch)
            if problem:
                faults[i] = problem
                log.warning("KMS node %d (%s) is skipped: %s", i, self.group.nodes[i], problem)
                return False
            partials = [
                th.Partial(i, bytes.fromhex(p.element), bytes.fromhex(p.proof)) for p in answer.partials
            ]
            valid[i] = (partials, answer.gateway_app_id, answer.os_image_hash)
            offered[i] = list(answer.presignatures)
            return True

        answered = self._gather(self._challenged, ask, accept, need=group.t, all_first=False)
        for i in self._challenged:
            if i not in answered and i not in valid and len(valid) < group.t:
                faults[i] = f"no answer within {self._hedge_s:g} s"
        self.faults = faults
        t = group.t
        if len(valid) < t:
            raise KmsClientError(
                f"only {len(valid)} valid partial evaluations, {t} needed" + _fault_text(faults)
            )
        chosen = sorted(valid)[:t]
        if len({valid[i][1:] for i in chosen}) != 1:
            raise KmsClientError("the KMS nodes disagree on the gateway app id or the measured OS image")
        outputs = [th.combine(inputs[k], [valid[i][0][k] for i in chosen], t) for k in range(len(inputs))]
        _, gateway_app_id, os_image_hex = valid[chosen[0]]
        k256_signature = b""
        self.signature_error = ""
        if sign and self.group.signing_key:
            try:
                k256_signature = self._sign_app_key(tee, app_id, offered, th.app_k256_key(outputs[0]), faults)
            except KmsClientError as exc:
                # The app's keys do not depend on the signature: the boot goes on, and GetKey (which needs
                # the chain) answers with the reason. An exhausted pool must not stop every boot.
                self.signature_error = str(exc)
                log.warning("no KMS signature of the app key: %s", exc)
        return th.app_keys_from_outputs(
            outputs[0],
            outputs[1],
            app_id,
            now=int(self._clock()),
            key_provider_info={**self.info(), "id": group.group_public_key.hex(), "epoch": group.epoch},
            gateway_app_id=gateway_app_id,
            os_image_hash=bytes.fromhex(os_image_hex),
            k256_signature=k256_signature,
            # the group's key whenever the group signs, also when this boot got no signature: GetKey then
            # tells "no presignatures" (a retry after a refill, 503) from "no signing key" (400)
            kms_k256_pubkey=self.group.signing_key if sign else b"",
        )

    # (5)
    def _sign_app_key(
        self,
        tee: QuoteSource,
        app_id: bytes,
        offered: Mapping[int, list[str]],
        app_k256: bytes,
        faults: dict[int, str],
    ) -> bytes:
        """The KMS signature of this app's k256 key from t nodes (keys.threshold_ecdsa): one presignature
        that t of them hold, a share from each (each node judges the request on its own again and builds the
        message from our verified app_id), every share checked, combined, and the result checked to recover
        to the group's signing key as the chain records it (never a node's say-so)."""
        t = self.group.t
        app_pub = k256_public_key(app_k256)
        digest = kms_issued_digest(app_id, app_pub)
        holders: dict[str, list[int]] = {}
        for i, sessions in offered.items():
            for sess in sessions:
                holders.setdefault(sess, []).append(i)
        usable = sorted(
            (s for s, who in holders.items() if len(who) >= t), key=lambda s: (-len(holders[s]), s)
        )
        if not usable:
            raise KmsClientError(
                f"{NO_PRESIGNATURES}: no presignature is held by {t} of the answering KMS nodes (their pools "
                "are exhausted; `teecloud up` refills a pool that falls below its low watermark, else run "
                "`teecloud kms presign`)" + _fault_text(faults)
            )
        session = usable[0]
        body = api.ThresholdSignRequest(
            vm_config=vm_config_json(tee),
            app_compose=self.composes.for_tee(tee),
            app_public_key=app_pub.hex(),
            session=session,
        ).model_dump()
        got: dict[int, tuple[te.Presignature, te.SignatureShare]] = {}

        def ask(client: KmsClient) -> api.ThresholdSignResponse:
            return client.attested_call(
                tee,
                api.PATH_THRESHOLD_SIGN,
                api.ThresholdSignResponse,
                body=body,
                usage="app:kms-client",
                app_id=app_id,
            )

        def accept(i: int, answer: Any) -> bool:
            if isinstance(answer, BaseException):
                faults[i] = "signature share: " + _describe(answer)
                return False
            try:
                if answer.index != i or answer.session != session or answer.app_id != app_id.hex():
                    raise ValueError("answered for another share, presignature or app")
                presig = te.Presignature(
                    index=i,
                    t=t,
                    session=bytes.fromhex(session),
                    big_r=bytes.fromhex(answer.big_r),
                    group_public_key=self.group.signing_key,
                    kinv_share=None,
                    sigma_share=0,
                    kinv_commitments=tuple(bytes.fromhex(c) for c in answer.kinv_commitments),
                    sigma_commitments=tuple(bytes.fromhex(c) for c in answer.sigma_commitments),
                )
                share = te.SignatureShare(i, int(answer.s, 16))
                if len(presig.kinv_commitments) != t or len(presig.sigma_commitments) != t:
                    raise ValueError("presignature commitments of another threshold")
                if not te.verify_signature_share(presig, digest, share):
                    raise ValueError("the signature share does not verify against the presignature")
            except (ValueError, KeysError) as exc:
                faults[i] = f"signature share: {exc}"
                log.warning("KMS node %d (%s) is skipped: %s", i, self.group.nodes[i], faults[i])
                return False
            got[i] = (presig, share)
            return True

        # the holders first; then nodes that were challenged but not asked to evaluate (their pools, made in
        # the same presigning rounds, normally hold the same session)
        candidates = holders[session] + [i for i in self._challenged if i not in offered]
        self._gather(candidates, ask, accept, need=t, all_first=False)
        # the nodes that agree on the presignature's public part; a node off the majority is named
        by_public: dict[tuple[bytes, tuple[bytes, ...], tuple[bytes, ...]], list[int]] = {}
        for i, (p, _) in got.items():
            by_public.setdefault((p.big_r, p.kinv_commitments, p.sigma_commitments), []).append(i)
        for members in sorted(by_public.values(), key=len, reverse=True):
            if len(members) < t:
                break
            try:
                sig = te.combine_signature(got[members[0]][0], digest, [got[i][1] for i in members])
            except KeysError as exc:
                faults[members[0]] = f"signature: {exc}"
                continue
            for i in got:
                if i not in members:
                    faults[i] = "signature share for another presignature than the other nodes"
            return sig
        raise KmsClientError(
            f"fewer than {t} KMS nodes gave a valid signature share for the app key" + _fault_text(faults)
        )

    def _check(
        self,
        i: int,
        answer: api.ThresholdEvaluateResponse,
        app_id: bytes,
        instance_id: bytes,
        inputs: tuple[bytes, bytes],
        epoch: int,
    ) -> str:
        """'' when node i's answer is right, else what is wrong with it."""
        if answer.index != i or answer.epoch != epoch:
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
                if not th.verify_partial(self._public_shares[epoch][i], x, partial):
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
    member_token: bytes | None = None,
) -> list[th.Dealing]:
    """From every dealer of a round: its commitments and this node's sub-share (over mutual RA-TLS, with this
    node's boot-time evidence). Any dealer failing fails the round (named)."""
    if set(dealers) != set(dealer_ids):
        raise KmsClientError("one client per dealer of the round")
    body = api.ReshareDealRequest(
        session=session.hex(), index=index, member_token=member_token.hex() if member_token else None
    ).model_dump()

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
    member_token: bytes | None = None,
) -> ThresholdShare:
    """A joining KMS node's side of a reshare round, run at its boot (the dealers release sub-shares to
    boot-time evidence only). Each dealing is checked (C_0 is the dealer's old public share, the sub-share
    matches the commitments); then s'_index = Σ λ_i·f_i(index). Any failing dealer fails the round (named):
    every new node must sum the same dealings, so a partial round is never completed."""
    dealings = _collect(plan.session, plan.dealers, index, tee, dealers, plan.t_new, app_id, member_token)
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
    member_token: bytes | None = None,
) -> ThresholdShare:
    """A new KMS node's side of a Joint-Feldman DKG round, at its boot: every dealer's sub-share is checked
    against that dealer's commitments (a failing dealer is a complaint, and — without GJKR's answer round —
    fails the round); the share is the sum, the group commitments the sums of the dealers'. `member_token`:
    this member's token, for a round opened with member token hashes (a rotation's)."""
    dealings = _collect(plan.session, plan.dealers, index, tee, dealers, plan.t_new, app_id, member_token)
    try:
        total, complaints = th.joint_feldman(dealings, index, {d.dealer: d.shares[index] for d in dealings})
        if complaints:
            raise _complaint(complaints)
        return ThresholdShare(plan.epoch, index, plan.t_new, plan.n_new, total, th.sum_commitments(dealings))
    except (KeysError, SealingError) as exc:
        raise KmsClientError(f"the DKG round failed: {exc}") from exc
