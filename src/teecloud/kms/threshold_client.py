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
      For a group with a root CA, in the same round (concurrently): the app CA certificate (`ca_error`).
      Both cover keys derived from the app-level output, the same at every boot of the app under an
      epoch: a node returns its kept copies inside its (3) answer, and the CVM uses one only when it checks
      against the key derived in (4) and the group's key from the chain (a node whose copy does not is
      named); only what is still missing is signed, and then handed to the nodes to keep
      (ThresholdKeepSignatures): every boot after an app's first is one attested round.

Transport: one boot, one RA-TLS credential (kms.client.BootCredential: one key, one quote) and one
kept-alive mutual-TLS connection per node for all of (2)-(5) (`_boot`); each node still applies its whole
key-release rule to every request (its evidence check is cached per certificate, nothing else is). Every
call to a node ends by its own wall-clock deadline (`call_timeout_s`, kms.deadline): a node that trickles
its answer fails as that node's fault and frees its fan-out thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from teecloud.appcompose import AppComposeError
from teecloud.attestation.errors import VerificationError
from teecloud.chain.errors import ChainError
from teecloud.errors import Error
from teecloud.keys import threshold as th
from teecloud.keys import threshold_certs as tc
from teecloud.keys import threshold_ecdh as tx
from teecloud.keys import threshold_ecdsa as te
from teecloud.keys.appkeys import AppKeys
from teecloud.keys.certs import cert_to_pem, key_to_pem
from teecloud.keys.errors import KeysError
from teecloud.keys.ratls import QuoteSource
from teecloud.keys.sigchain import k256_public_key, kms_issued_digest
from teecloud.kms import api
from teecloud.kms.challenge import MAX_TOKENS
from teecloud.kms.client import BootCredential, ComposeBook, KmsClient, vm_config_json
from teecloud.kms.errors import KmsClientError, KmsUsageError, SealingError
from teecloud.kms.rotation import KeyEpochs, key_epochs_of_text
from teecloud.kms.threshold import GROUP_FILE, DkgPlan, GroupRecord, ResharePlan, ThresholdShare
from teecloud.kms.threshold_carry import CarriedShares, RecordedKeys, carry_receive, check_carried_keys
from teecloud.kms.threshold_sign import app_key_signature_problem as _app_key_signature_problem

__all__ = [
    "NO_PRESIGNATURES",
    "PendingDkg",
    "RoundPending",
    "ThresholdGroup",
    "ThresholdKeyProvider",
    "fetch_env_public_key",
    "finish_dkg",
    "group_ca_record",
    "group_from_chain",
    "join_dkg",
    "join_reshare",
    "post_dkg_statement",
    "recorded_keys",
]

log = logging.getLogger("teecloud.kms.threshold")

# why a boot of a group that signs got no KMS signature when t nodes hold no common presignature
NO_PRESIGNATURES = "no presignatures, refill in progress"
BAD_SHARE = "the signature share does not verify against the presignature"
MAX_HAND_OVERS = 8  # keep hand-overs running at once in the background (one per recent first boot)
FAN_OUT_WORKERS = 64  # threads of a provider's calls to the nodes (reused across rounds and boots)
# one wall-clock deadline over each call to a node (kms.deadline): handshake, request and answer, however
# slowly the node sends them; past it the call fails as that node's fault and frees its fan-out thread
CALL_TIMEOUT_S = 15.0


_M = TypeVar("_M", bound=BaseModel)


class _FanOut:
    """A provider's one pool for its calls to the nodes: threads started once and reused across rounds and
    boots. A call the hedge abandons keeps its thread until its deadline (`call_timeout_s`, however slowly
    the node answers), so each node may hold at most `per_node` threads at once; past that, a call to it
    fails at once as that node's fault and the round asks another node (review 10, R10-1: one slow node must
    not take the pool from the others and stall every later boot beyond the hedge)."""

    def __init__(self, nodes: int, workers: int = FAN_OUT_WORKERS) -> None:
        self.per_node = max(1, workers // max(1, nodes))
        self._workers = workers
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._running: dict[int, int] = {}

    def submit(self, index: int, fn: Callable[[KmsClient], Any], client: KmsClient) -> Future[Any]:
        with self._lock:
            if self._running.get(index, 0) >= self.per_node:
                refused: Future[Any] = Future()
                refused.set_exception(
                    KmsClientError(
                        f"KMS node {index}: {self.per_node} earlier calls to it are still running (a slow or "
                        "silent node); not asked again until one of them ends"
                    )
                )
                return refused
            self._running[index] = self._running.get(index, 0) + 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="kms-fan-out")
            pool = self._pool
        future = pool.submit(fn, client)
        future.add_done_callback(lambda _f: self._release(index))  # also when cancelled before it started
        return future

    def _release(self, index: int) -> None:
        with self._lock:
            self._running[index] -= 1

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


@dataclass(frozen=True)
class ThresholdGroup:
    epoch: int
    t: int
    commitments: tuple[bytes, ...]
    nodes: Mapping[int, str]  # share index -> https URL
    # the group's secp256k1 signing key (33 bytes, from KmsGroup's record): what the KMS signature of an
    # app key verifies under (the GetKey chain's root); empty for a group that has no signing key
    signing_key: bytes = b""
    # the group's root CA certificate (PEM; its key is the group's P-256 CA key, from the ceremony's record):
    # what app CA certificates are signed under by t nodes; "" for a group without one (self-signed app CAs)
    ca_root_cert: str = ""

    def __post_init__(self) -> None:
        if self.signing_key and len(self.signing_key) != 33:
            raise KmsClientError("threshold group: the signing key is a 33-byte compressed secp256k1 key")
        if self.ca_root_cert:
            try:
                root = x509.load_pem_x509_certificate(self.ca_root_cert.encode())
                root.verify_directly_issued_by(root)
            except Exception as exc:  # ValueError, TypeError, InvalidSignature: a broken record
                raise KmsClientError(
                    f"threshold group: the root CA certificate does not verify: {exc}"
                ) from exc
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
    kms_group: Any,
    epoch: int,
    *,
    finality_depth: int = 0,
    local: GroupRecord | None = None,
    ca_root_cert: str | None = None,
) -> ThresholdGroup:
    """The group of root epoch `epoch` as KmsGroup (`kms_group`: teecloud.chain.kmsgroup.KmsGroup) records
    it at the block `finality_depth` blocks below the head (after the chain-id check; walked down by parent
    hash): the serving committee's t, Feldman commitments and node URLs, the epoch's signing key (none
    recorded: a group that does not sign) and its group CA record. `local`: this installation's group record
    (kms-nodes/group.json); when it is of this epoch and names another group key or another signing key than
    the chain — or a signing key the chain does not record — it is refused (KmsClientError): the file is the
    operator's, the chain is what every client checks. Its commitments may lag the chain's (after a reshare
    the serving committee is the chain's), so they are not compared.
    The root CA certificate (`ca_root_cert`, default the local record's of this epoch; the chain holds only
    its hash) is kept only if KmsGroup records this epoch's CA key and the sha256 of exactly this
    certificate's DER (keys.threshold_certs.check_group_root); a root the chain does not record, or records
    otherwise, is refused (KmsClientError). The chain recording a CA without a root given: a group without
    one (app CAs self-signed)."""
    try:
        at = kms_group.final_block(finality_depth)
        committee = kms_group.active(epoch, at=at)
        signing_key = kms_group.signing_key(epoch, at=at) if committee is not None else None
        group_ca = kms_group.group_ca(epoch, at=at) if committee is not None else None
    except (ChainError, ValueError) as exc:
        raise KmsClientError(f"the threshold group could not be read from KmsGroup: {exc}") from exc
    if committee is None:
        raise KmsClientError(
            f"KmsGroup names no committee serving root epoch {epoch} at block {at.number} "
            f"({finality_depth} blocks below the head)"
        )
    if ca_root_cert is None:
        ca_root_cert = local.ca_root_cert if local is not None and local.epoch == epoch else ""
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
    if ca_root_cert:
        if group_ca is None:
            raise KmsClientError(
                f"the group root CA certificate given is not on chain: KmsGroup records no group CA for "
                f"epoch {epoch}; refusing it"
            )
        try:
            root = x509.load_pem_x509_certificate(ca_root_cert.encode())
            tc.check_group_root(root, group_ca.ca_key, group_ca.root_cert_hash)
        except (ValueError, x509.InvalidVersion, KeysError) as exc:
            raise KmsClientError(
                f"the group root CA certificate given disagrees with the chain (epoch {epoch}): {exc}; "
                "refusing it"
            ) from exc
    return ThresholdGroup(
        committee.epoch,
        committee.t,
        committee.commitments,
        committee.urls,
        signing_key=signing_key or b"",
        ca_root_cert=ca_root_cert,
    )


def group_ca_record(ca_root_cert: str) -> tuple[bytes, bytes]:
    """What KmsGroup records of a group root CA certificate (PEM): its P-256 key (SEC1 compressed) and the
    sha256 of its DER (KmsGroup.record_ca's arguments)."""
    root = x509.load_pem_x509_certificate(ca_root_cert.encode())
    key = root.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KmsClientError("the group root CA certificate has no EC key")
    der = root.public_bytes(serialization.Encoding.DER)
    point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    return point, hashlib.sha256(der).digest()


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
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        """`hedge_s`: a node silent for this long is not waited for once others can stand in for it (its
        call is abandoned, not cancelled: it ends by its deadline). `call_timeout_s`: every call to a node
        (boot challenge, evaluation, signature shares, env partial, keep) ends this long after it starts,
        however slowly the node answers (kms.deadline). `epochs`: the groups of the
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
        self._call_s = call_timeout_s
        self._public_shares = {
            e: {i: th.public_share(g.commitments, i) for i in g.nodes} for e, g in self.groups.items()
        }
        self._challenged: list[int] = sorted(group.nodes)
        self.faults: dict[int, str] = {}
        self.signature_error = ""  # why the last get_app_keys got no KMS signature ('' when it did)
        self.ca_error = ""  # why the last get_app_keys got no app CA certificate under the group root
        self.env_epoch = 0  # the root epoch whose env key opened the last bound env (0: none bound)
        self.composes = ComposeBook()  # the GPU gate: bind_app_compose
        # per boot thread (one provider serves every CVM of a worker): the bound env and its secret
        self._env = threading.local()
        self._local = threading.local()  # per boot thread: the keep hand-over its boot leaves (`_keep`)
        self._hand_overs: list[threading.Thread] = []
        self._hand_overs_lock = threading.Lock()
        self._fan = _FanOut(len(group.nodes))  # `_gather`

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.group.group_public_key.hex(), "epoch": self.group.epoch}

    def node_certificate(self, index: int) -> bytes:
        """Node `index`'s TLS certificate (DER) as its client checked (KmsAuth.isKmsAllowed) and pinned it:
        the node pins a qemu guest is given (KmsClient.server_certificate). KmsClientError for an index
        outside the group or a node that cannot be reached or fails the check."""
        client = self._clients.get(index)
        if client is None:
            raise KmsClientError(f"KMS node {index} is not in the group (nodes {sorted(self._clients)})")
        return client.server_certificate()

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
        queue = list(indices)
        futures: dict[Future[Any], int] = {}
        results: dict[int, Any] = {}
        accepted = 0

        def launch(k: int) -> None:
            for _ in range(max(0, k)):
                if queue:
                    i = queue.pop(0)
                    futures[self._fan.submit(i, fn, self._clients[i])] = i

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
            for fut in futures:
                fut.cancel()  # not started yet: never started (one still running is abandoned)
        return results

    # (1)
    def boot_nonce(self) -> bytes:
        indices = sorted(self.group.nodes)
        answers = self._gather(
            indices,
            lambda c: c.boot_nonce(deadline=time.monotonic() + self._call_s),
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
        """The app's keys under its current root epoch (its measured app-compose's `kms_key_epoch`); with an
        encrypted env bound (`bind_encrypted_env`), also its env's shared secret (`env_shared_secret`),
        asked at the same boot-time point."""
        group = self._group_of(self._key_epochs(tee).current)
        with self._boot(tee, app_id):
            keys = self._app_keys(tee, app_id, instance_id, group)
            self._env.secret = None
            if getattr(self._env, "blob", None):
                self._env.secret = self._bound_env_secret(tee, app_id, group)
        return keys

    @contextmanager
    def _boot(self, tee: QuoteSource, app_id: bytes) -> Iterator[None]:
        """One RA-TLS credential for this boot's attested calls to every node (one quote), and one
        kept-alive connection per node (opened at its first call), closed when the scope ends — or, when
        the boot signed something for the nodes to keep (`_keep`), handed to a background thread that sends
        it and then closes them (`_hand_over`): the boot's keys are returned without waiting for that."""
        credential = BootCredential(tee, usage="app:kms-client", app_id=app_id, clock=self._clock)
        bound = [c for c in self._clients.values() if c.bind_boot(tee, credential)]
        self._local.keep = None
        try:
            yield
        finally:
            keep, self._local.keep = self._local.keep, None
            if keep is not None and not bound:  # an outer binding owns the connections: sent now, in it
                try:
                    self._hand_over(tee, *keep)
                except Exception as exc:  # as in the background: logged, never raised into a boot
                    log.warning("the keep hand-over failed: %s", _describe(exc))
                keep = None
            if keep is not None and not self._hand_over_later(tee, bound, *keep):
                keep = None  # not started: the next boot of this app signs again
            if keep is None:
                for client in bound:
                    client.unbind_boot(tee)

    def _hand_over_later(
        self,
        tee: QuoteSource,
        bound: list[KmsClient],
        app_id: bytes,
        body: dict[str, Any],
        challenged: list[int],
    ) -> bool:
        """Start the keep hand-over on a daemon thread (at most MAX_HAND_OVERS at once), on this boot's
        connections moved to a holder that cannot quote: a call for `tee` after this returns gets a
        credential and quote of its own, so nothing after the boot uses its boot-time evidence except this
        hand-over. False (nothing started, the connections stay with `tee`) when too many are running."""
        with self._hand_overs_lock:
            self._hand_overs = [th_ for th_ in self._hand_overs if th_.is_alive()]
            if len(self._hand_overs) >= MAX_HAND_OVERS:
                log.warning(
                    "the keep hand-over is skipped (%d running): the next boot signs again", MAX_HAND_OVERS
                )
                return False
            holder = _EndedBoot()
            moved = [c for c in bound if c.hand_over_boot(tee, holder)]
            for client in bound:
                if client not in moved:
                    client.unbind_boot(tee)

            def run() -> None:
                try:
                    self._hand_over(holder, app_id, body, challenged)
                except Exception as exc:  # a background thread: logged, never raised into a boot
                    log.warning("the keep hand-over failed: %s", _describe(exc))
                finally:
                    for client in moved:
                        client.unbind_boot(holder)

            thread = threading.Thread(target=run, name="kms-keep-hand-over", daemon=True)
            self._hand_overs.append(thread)
            thread.start()
            return True

    def wait_for_hand_overs(self, timeout_s: float = 30.0) -> bool:
        """Wait until every keep hand-over started so far has ended (tests, benchmarks, a clean stop);
        False when some still run after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._hand_overs_lock:
            threads = list(self._hand_overs)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def _bound_env_secret(self, tee: QuoteSource, app_id: bytes, group: ThresholdGroup) -> bytes:
        """The bound env's X25519 secret under the app's current epoch; while the app migrates
        (`kms_key_epoch_previous` in its measured compose), an env still encrypted under the previous
        epoch's env key (its owner has not re-encrypted it yet) is read with the previous epoch's partials:
        when the current epoch's partials fail (no node holds an env key of that epoch for the app yet) or
        their secret does not open the env (AES-GCM), the previous epoch's are asked, at the same boot-time
        point, under the same rule on every node (its compose names that epoch). `env_epoch` says which
        epoch's key opened it. Nothing here holds x: each epoch's secret is x·P, combined from t partials."""
        from teecloud.keys.envcrypt import decrypt_env_with_shared_secret

        blob: bytes = self._env.blob
        previous = self._key_epochs(tee).previous
        self.env_epoch = group.epoch
        faults = dict(self.faults)
        try:
            secret: bytes | None = self._env_secret(tee, app_id, group)
            failure: KmsClientError | None = None
        except KmsClientError as exc:
            if previous is None:
                raise
            secret, failure = None, exc
        if previous is None:
            assert secret is not None
            return secret
        if secret is not None:
            try:
                decrypt_env_with_shared_secret(secret, blob)
                return secret
            except KeysError:
                pass  # not under the current epoch's key: maybe under the previous one
        before = self.faults
        self.faults = (
            faults  # the current epoch's refusals are not node faults when the previous one opens it
        )
        try:
            old = self._env_secret(tee, app_id, self._group_of(previous))
            decrypt_env_with_shared_secret(old, blob)
        except (KmsClientError, KeysError) as exc:
            self.faults = {**before, **self.faults}
            if secret is not None:
                return secret  # the guest reports that the env does not decrypt
            assert failure is not None
            raise KmsClientError(f"{failure}; under the previous root epoch {previous}: {exc}") from exc
        self.env_epoch = previous
        log.info(
            "the env is still encrypted under root epoch %d: its owner re-encrypts it to epoch %d's env key "
            "(docs/kms.md, Rotation)",
            previous,
            group.epoch,
        )
        return old

    def bind_encrypted_env(self, blob: bytes | None) -> None:
        """The CVM's encrypted env (dstack format), for this thread's next get_app_keys, which then gets the
        partials for its ephemeral key (guest.boot_guest calls this before boot, with None for no env)."""
        self._env.blob = bytes(blob) if blob else None
        self._env.secret = None

    @property
    def env_shared_secret(self) -> bytes | None:
        """The X25519 shared secret of the env bound in this thread, after get_app_keys (else None)."""
        secret = getattr(self._env, "secret", None)
        return secret if isinstance(secret, bytes) else None

    def _env_secret(self, tee: QuoteSource, app_id: bytes, group: ThresholdGroup) -> bytes:
        """The X25519 shared secret of the bound env: D_i = x_i·P from t nodes (each applies the whole
        key-release rule and takes the app from our evidence), each Chaum–Pedersen proof checked against the
        app's env commitments that t nodes agree on; a node whose proof fails or whose commitments differ
        is named in `faults` and skipped; any t combine (keys.threshold_ecdh)."""
        blob: bytes = self._env.blob
        try:
            point = tx.ephemeral_point(blob)
        except tx.ThresholdEcdhError as exc:
            raise KmsClientError(f"the encrypted env: {exc}") from exc
        body = api.ThresholdEnvPartialRequest(
            vm_config=vm_config_json(tee),
            app_compose=self.composes.for_tee(tee),
            epoch=group.epoch,
            ephemeral_key=blob[:32].hex(),
        ).model_dump()
        faults = self.faults
        valid: dict[int, tuple[tuple[bytes, ...], tx.EcdhPartial]] = {}

        ask = _attested(
            tee, app_id, api.PATH_THRESHOLD_ENV_PARTIAL, api.ThresholdEnvPartialResponse, body, self._call_s
        )

        def accept(i: int, answer: Any) -> bool:
            if isinstance(answer, BaseException):
                faults[i] = "env partial: " + _describe(answer)
                return False
            try:
                if answer.index != i or answer.app_id != app_id.hex() or answer.epoch != group.epoch:
                    raise ValueError("answered as another share, app or epoch")
                commitments = tuple(bytes.fromhex(c) for c in answer.commitments)
                if len(commitments) != group.t:
                    raise ValueError(f"{len(commitments)} env commitments, {group.t} expected")
                partial = tx.EcdhPartial(i, bytes.fromhex(answer.element), bytes.fromhex(answer.proof))
                if not tx.verify_partial(commitments, app_id, point, partial):
                    raise ValueError("the env partial's proof does not verify")
            except (ValueError, KeysError) as exc:
                faults[i] = f"env partial: {exc}"
                log.warning("KMS node %d (%s) is skipped: %s", i, self.group.nodes[i], faults[i])
                return False
            valid[i] = (commitments, partial)
            return True

        self._gather(self._challenged, ask, accept, need=group.t, all_first=False)
        by_key: dict[tuple[bytes, ...], list[int]] = {}
        for i, (c, _) in valid.items():
            by_key.setdefault(c, []).append(i)
        if not by_key or max(len(v) for v in by_key.values()) < group.t:
            rest = [i for i in self._challenged if i not in valid and i not in faults]
            self._gather(rest, ask, accept, need=len(rest), all_first=True)
            by_key = {}
            for i, (c, _) in valid.items():
                by_key.setdefault(c, []).append(i)
        best = max(by_key.values(), key=len, default=[])
        if len(best) < group.t:
            raise KmsClientError(
                f"fewer than {group.t} KMS nodes gave a valid env partial for one env key"
                + _fault_text(faults)
            )
        for i in valid:
            if i not in best:
                faults[i] = "env partial: under other env-key commitments than the other nodes"
        commitments = valid[best[0]][0]
        try:
            return tx.combine(commitments, app_id, point, [valid[i][1] for i in sorted(best)[: group.t]])
        except KeysError as exc:
            raise KmsClientError(f"the env partials do not combine: {exc}") from exc

    def get_previous_app_keys(self, tee: QuoteSource, app_id: bytes, instance_id: bytes) -> AppKeys | None:
        """While an app migrates (`kms_key_epoch_previous` in its measured app-compose): its keys under the
        previous epoch, to re-wrap its volume (teecloud.agent.storage); None when it does not migrate."""
        previous = self._key_epochs(tee).previous
        if previous is None:
            return None
        with self._boot(tee, app_id):
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

        ask = _attested(
            tee, app_id, api.PATH_THRESHOLD_EVALUATE, api.ThresholdEvaluateResponse, body, self._call_s
        )

        # Ask t nodes first; another for each that fails, and all the rest if hedge_s passes first: an honest
        # run costs the cluster t evaluations, not n, and no silent node holds the boot up.
        faults = dict(self.faults)
        valid: dict[int, tuple[list[th.Partial], str, str]] = {}
        offered: dict[int, list[str]] = {}
        offered_ca: dict[int, list[str]] = {}
        kept_key: dict[int, api.KeptAppKey] = {}
        kept_ca: dict[int, api.KeptAppCa] = {}

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
            offered_ca[i] = list(answer.ca_presignatures)
            if answer.kept_app_key is not None:
                kept_key[i] = answer.kept_app_key
            if answer.kept_app_ca is not None:
                kept_ca[i] = answer.kept_app_ca
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

        # (5): both signatures cover keys derived from the combined outputs: a node's kept copy (from an
        # earlier boot of this app, in its evaluate answer) when one checks against the keys derived here
        # and the group's keys from the chain; otherwise one signing round, both requests at once, and what
        # it made handed to the nodes to keep (the next boot is one round)
        app_pub = k256_public_key(th.app_k256_key(outputs[0]))
        ca_key_pem = ""
        if sign and self.group.ca_root_cert:
            ca_key_pem = key_to_pem(th.app_ca_key(outputs[0]))  # the key only: no certificate made for it
        k256_kept = (
            self._kept_app_key(app_id, app_pub, kept_key, faults) if sign and self.group.signing_key else None
        )
        ca_kept = self._kept_app_ca(app_id, ca_key_pem, kept_ca, faults) if ca_key_pem else None

        def app_key_signature() -> bytes:
            return self._sign_app_key(tee, app_id, offered, app_pub, faults)

        def app_ca_certificate() -> str:
            return self._sign_app_ca(tee, app_id, offered_ca, ca_key_pem, faults)

        k256_signature = b""
        ca_cert_pem = ""
        self.signature_error = ""
        self.ca_error = ""
        need_key = sign and bool(self.group.signing_key) and k256_kept is None
        need_ca = bool(ca_key_pem) and ca_kept is None
        signature, ca_cert = _together(
            app_key_signature if need_key else None, app_ca_certificate if need_ca else None
        )
        if isinstance(signature, KmsClientError):
            # The app's keys do not depend on the signature: the boot goes on, and GetKey (which needs
            # the chain) answers with the reason. An exhausted pool must not stop every boot.
            self.signature_error = str(signature)
            log.warning("no KMS signature of the app key: %s", signature)
        elif signature is not None:
            k256_signature = signature
        if isinstance(ca_cert, KmsClientError):
            # as for the k256 signature: the boot goes on with a self-signed app CA, and says why
            self.ca_error = str(ca_cert)
            log.warning("no app CA certificate under the group root: %s", ca_cert)
        elif ca_cert is not None:
            ca_cert_pem = ca_cert
        if k256_signature or ca_cert_pem:
            self._keep(
                tee,
                app_id,
                group.epoch,
                app_pub,
                k256_signature or k256_kept or b"",
                ca_key_pem,
                ca_cert_pem or ca_kept or "",
            )
        k256_signature = k256_signature or k256_kept or b""
        ca_cert_pem = ca_cert_pem or ca_kept or ""
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
            ca_cert_pem=ca_cert_pem,
        )

    # (5)
    def _sign_app_key(
        self,
        tee: QuoteSource,
        app_id: bytes,
        offered: Mapping[int, list[str]],
        app_pub: bytes,
        faults: dict[int, str],
    ) -> bytes:
        """The KMS signature of this app's k256 key from t nodes (keys.threshold_ecdsa): one presignature
        that t of them hold, a share from each (each node judges the request on its own again and builds the
        message from our verified app_id), every share checked, combined, and the result checked to recover
        to the group's signing key as the chain records it (never a node's say-so)."""

        def body(session: str) -> dict[str, Any]:
            return api.ThresholdSignRequest(
                vm_config=vm_config_json(tee),
                app_compose=self.composes.for_tee(tee),
                app_public_key=app_pub.hex(),
                session=session,
            ).model_dump()

        return _group_signature(
            self,
            tee,
            app_id,
            offered,
            faults,
            path=api.PATH_THRESHOLD_SIGN,
            body=body,
            digest=kms_issued_digest(app_id, app_pub),
            group_key=self.group.signing_key,
            curve=te.SECP256K1.name,
            what="",
        )

    # (6)
    def _sign_app_ca(
        self,
        tee: QuoteSource,
        app_id: bytes,
        offered: Mapping[int, list[str]],
        app_ca_key_pem: str,
        faults: dict[int, str],
    ) -> str:
        """The app CA certificate under the group's root CA (ca_root_cert, checked against KmsGroup's record
        by group_from_chain): the TBS built here exactly as each node builds it (keys.threshold_certs, from
        the root, our app_id and our app CA key), t nodes' shares over it (each judging the request itself),
        combined and checked under the root's key. (A certificate a node kept from an earlier boot comes in
        its evaluate answer instead: `_kept_app_ca`.)"""
        root, to_sign, pub33 = self._app_ca_tbs(app_id, app_ca_key_pem)
        root_key = root.public_key()
        assert isinstance(root_key, ec.EllipticCurvePublicKey)

        def body(session: str) -> dict[str, Any]:
            return api.ThresholdSignAppCaRequest(
                vm_config=vm_config_json(tee),
                app_compose=self.composes.for_tee(tee),
                app_ca_public_key=pub33.hex(),
                session=session,
            ).model_dump()

        sig = _group_signature(
            self,
            tee,
            app_id,
            offered,
            faults,
            path=api.PATH_THRESHOLD_SIGN_APP_CA,
            body=body,
            digest=to_sign.digest,
            group_key=root_key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
            ),
            curve=te.P256.name,
            what="app CA ",
        )
        try:
            pem = cert_to_pem(tc.assemble_certificate(to_sign, sig, root_key))
        except KeysError as exc:
            raise KmsClientError(
                f"the app CA certificate does not verify under the group root: {exc}"
            ) from exc
        return pem

    def _kept_app_key(
        self, app_id: bytes, app_pub: bytes, kept: Mapping[int, api.KeptAppKey], faults: dict[int, str]
    ) -> bytes | None:
        """The first node's kept app-key signature that is the group's signature (the chain's signing key)
        of exactly the key derived here for this app; a node whose kept one is not is named in `faults`
        (its partials stay valid: they were checked on their own). None when no node kept a good one."""
        for i, item in sorted(kept.items()):
            sig = bytes.fromhex(item.signature)
            if item.app_public_key != app_pub.hex():
                problem = "it is for another app public key than the one derived from the partials"
            else:
                problem = _app_key_signature_problem(app_id, app_pub, sig, self.group.signing_key)
            if not problem:
                return sig
            faults[i] = f"kept app-key signature refused: {problem}"
            log.warning("KMS node %d (%s): %s", i, self.group.nodes[i], faults[i])
        return None

    def _kept_app_ca(
        self, app_id: bytes, app_ca_key_pem: str, kept: Mapping[int, api.KeptAppCa], faults: dict[int, str]
    ) -> str | None:
        """The first node's kept app CA certificate that is exactly the TBS built here (from the chain's
        group root, our app_id and the app CA key derived here) and verifies under the root, re-assembled
        from that TBS and its signature (only the signature is taken from the answer); a node whose kept
        one is not is named in `faults`. None when no node kept a good one."""
        if not kept:
            return None
        root, to_sign, pub33 = self._app_ca_tbs(app_id, app_ca_key_pem)
        root_key = root.public_key()
        assert isinstance(root_key, ec.EllipticCurvePublicKey)
        for i, item in sorted(kept.items()):
            try:
                if item.app_ca_public_key != pub33.hex():
                    raise ValueError("it is for another app CA key than the one derived from the partials")
                given = x509.load_pem_x509_certificate(item.certificate.encode())
                return cert_to_pem(tc.canonical_certificate(to_sign, given, root_key))
            except (ValueError, x509.InvalidVersion, KeysError) as exc:
                faults[i] = f"kept app CA certificate refused: {exc}"
                log.warning("KMS node %d (%s): %s", i, self.group.nodes[i], faults[i])
        return None

    def _app_ca_tbs(
        self, app_id: bytes, app_ca_key_pem: str
    ) -> tuple[x509.Certificate, tc.CertToSign, bytes]:
        """The group root (the chain's), the app CA TBS every node builds for this app and key, and the
        key (SEC1 compressed)."""
        root = x509.load_pem_x509_certificate(self.group.ca_root_cert.encode())
        key = serialization.load_pem_private_key(app_ca_key_pem.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KmsClientError("the app CA key is not an EC key")
        pub = key.public_key()
        pub33 = pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
        return root, tc.app_ca_to_sign(root, app_id, pub), pub33

    def _keep(
        self,
        tee: QuoteSource,
        app_id: bytes,
        epoch: int,
        app_pub: bytes,
        signature: bytes,
        app_ca_key_pem: str,
        certificate: str,
    ) -> None:
        """After a signing round: hand the app-key signature and the app CA certificate this boot holds to
        every challenged node to keep (ThresholdKeepSignatures, attested and judged like an evaluation), so
        that the next boot of this app is one round. The request is built here, inside the boot; it is sent
        after the boot's keys are returned (`_boot`, `_hand_over`), off the boot's path."""
        pub33 = self._app_ca_tbs(app_id, app_ca_key_pem)[2] if certificate else b""
        body = api.ThresholdKeepRequest(
            vm_config=vm_config_json(tee),
            app_compose=self.composes.for_tee(tee),
            epoch=epoch,
            app_public_key=app_pub.hex() if signature else "",
            signature=signature.hex(),
            app_ca_public_key=pub33.hex(),
            certificate=certificate,
        ).model_dump()
        self._local.keep = (app_id, body, list(self._challenged))

    def _hand_over(
        self, holder: QuoteSource, app_id: bytes, body: dict[str, Any], challenged: list[int]
    ) -> None:
        """Send a boot's keep request to every node it challenged on the boot's connections (`holder`: they
        present its boot-time credential; each node judges the request by its whole rule). A node that
        does not keep them only costs a signing round at the next boot: its failure is logged, not a
        fault."""
        keep = _attested(
            holder, app_id, api.PATH_THRESHOLD_KEEP_SIGNATURES, api.ThresholdKeepResponse, body, self._call_s
        )

        def kept(i: int, answer: Any) -> bool:
            if isinstance(answer, BaseException):
                log.warning("KMS node %d did not keep the app's signatures: %s", i, _describe(answer))
                return False
            return True

        self._gather(challenged, keep, kept, need=len(challenged), all_first=True)

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


def fetch_env_public_key(
    clients: Mapping[int, KmsClient],
    app_id: bytes,
    *,
    t: int,
    signing_key: bytes,
    epoch: int | None = None,
) -> tuple[bytes, dict[int, str]]:
    """The app's threshold env public key (teecloud.kms.threshold_env), as `teecloud deploy` takes it: the
    lowest reachable node first (its first request runs the app's ceremony), then every other node; each
    answer's two signatures must recover to the group's signing key (the trusted record's, never a node's
    say-so), and t nodes must agree on the key. Returns (key, faults): every node that failed or disagreed,
    by index, with the reason. Raises KmsClientError when no key has t agreeing nodes."""
    from teecloud.keys.appkeys import env_encrypt_pubkey_digest
    from teecloud.keys.sigchain import recover_k256
    from teecloud.kms.threshold_env import legacy_digest

    body: dict[str, Any] = {"app_id": app_id.hex(), **({"epoch": epoch} if epoch else {})}
    faults: dict[int, str] = {}
    keys: dict[int, bytes] = {}

    def ask(i: int) -> None:
        try:
            ans = clients[i]._call(
                "POST", api.PATH_GET_APP_ENV_ENCRYPT_PUBKEY, api.EnvEncryptPubKeyResponse, body=body
            )
            pub = bytes.fromhex(ans.public_key)
            if len(pub) != 32:
                raise ValueError("the public key is not 32 bytes")
            for sig, digest in (
                (ans.signature_v1, env_encrypt_pubkey_digest(app_id, pub, ans.timestamp)),
                (ans.signature, legacy_digest(app_id, pub)),
            ):
                if recover_k256(digest, bytes.fromhex(sig)) != signing_key:
                    raise ValueError("a signature does not recover to the group's signing key")
            keys[i] = pub
        except (KmsClientError, ValueError, KeysError, VerificationError, Error) as exc:
            faults[i] = _describe(exc)

    order = sorted(clients)
    for first in order:  # the first answer makes the key (one ceremony), the rest only read it
        ask(first)
        if first in keys:
            break
    rest = [i for i in order if i not in keys and i not in faults]
    with ThreadPoolExecutor(max_workers=max(1, len(rest))) as pool:
        list(pool.map(ask, rest))
    counts: dict[bytes, list[int]] = {}
    for i, k in keys.items():
        counts.setdefault(k, []).append(i)
    best = max(counts.values(), key=len, default=[])
    if len(best) < t:
        raise KmsClientError(
            f"fewer than {t} KMS nodes agree on the app's env public key" + _fault_text(faults)
        )
    for i, k in keys.items():
        if i not in best:
            faults[i] = f"returned another env public key ({k.hex()}) than the {len(best)} others"
    return keys[best[0]], faults


def _group_signature(
    provider: ThresholdKeyProvider,
    tee: QuoteSource,
    app_id: bytes,
    offered: Mapping[int, list[str]],
    faults: dict[int, str],
    *,
    path: str,
    body: Callable[[str], dict[str, Any]],
    digest: bytes,
    group_key: bytes,
    curve: str,
    what: str,
) -> bytes:
    """One signature of the group over `digest` (the key `group_key` on `curve`) from t nodes' shares
    over one presignature they all hold; every share checked, a node that lies named in `faults`. (A
    function of the provider, not a method: the k256 and app CA signatures share it.)"""
    t = provider.group.t
    holders: dict[str, list[int]] = {}
    for i, sessions in offered.items():
        for sess in sessions:
            holders.setdefault(sess, []).append(i)
    usable = sorted((s for s, who in holders.items() if len(who) >= t), key=lambda s: (-len(holders[s]), s))
    if not usable:
        raise KmsClientError(
            f"{NO_PRESIGNATURES}: no {what}presignature is held by {t} of the answering KMS nodes (their "
            "pools are exhausted; `teecloud up` refills a pool that falls below its low watermark, else run "
            "`teecloud kms presign`)" + _fault_text(faults)
        )
    session = usable[0]
    request = body(session)
    got: dict[int, tuple[te.Presignature, te.SignatureShare]] = {}

    ask = _attested(tee, app_id, path, api.ThresholdSignResponse, request, provider._call_s)

    def accept(i: int, answer: Any, *, check_share: bool) -> bool:
        if isinstance(answer, BaseException):
            faults[i] = f"{what}signature share: " + _describe(answer)
            return False
        try:
            if answer.index != i or answer.session != session or answer.app_id != app_id.hex():
                raise ValueError("answered for another share, presignature or app")
            presig = te.Presignature(
                index=i,
                t=t,
                session=bytes.fromhex(session),
                big_r=bytes.fromhex(answer.big_r),
                group_public_key=group_key,
                kinv_share=None,
                sigma_share=0,
                kinv_commitments=tuple(bytes.fromhex(c) for c in answer.kinv_commitments),
                sigma_commitments=tuple(bytes.fromhex(c) for c in answer.sigma_commitments),
                curve=curve,
            )
            share = te.SignatureShare(i, int(answer.s, 16))
            if len(presig.kinv_commitments) != t or len(presig.sigma_commitments) != t:
                raise ValueError("presignature commitments of another threshold")
            if check_share and not te.verify_signature_share(presig, digest, share):
                raise ValueError(BAD_SHARE)
        except (ValueError, KeysError) as exc:
            faults[i] = f"{what}signature share: {exc}"
            log.warning("KMS node %d (%s) is skipped: %s", i, provider.group.nodes[i], faults[i])
            return False
        got[i] = (presig, share)
        return True

    def combine(*, optimistic: bool) -> bytes | None:
        """The signature from the largest set of at least t nodes that agree on the presignature's public
        part (a node off it is named), or None. Optimistic: t shares combined unchecked; a failure (some
        share is wrong) returns None at once, for the caller to check each share."""
        by_public: dict[tuple[bytes, tuple[bytes, ...], tuple[bytes, ...]], list[int]] = {}
        for i, (p, _) in got.items():
            by_public.setdefault((p.big_r, p.kinv_commitments, p.sigma_commitments), []).append(i)
        for members in sorted(by_public.values(), key=len, reverse=True):
            if len(members) < t:
                break
            chosen = sorted(members)[:t] if optimistic else members
            try:
                sig = te.combine_signature(
                    got[members[0]][0], digest, [got[i][1] for i in chosen], check_shares=not optimistic
                )
            except KeysError as exc:
                if optimistic:
                    return None
                faults[members[0]] = f"{what}signature: {exc}"
                continue
            for i in got:
                if i not in members:
                    faults[i] = f"{what}signature share for another presignature than the other nodes"
            return sig
        return None

    # the holders first; then nodes that were challenged but not asked to evaluate (their pools, made in
    # the same presigning rounds, normally hold the same session)
    candidates = holders[session] + [i for i in provider._challenged if i not in offered]
    # (a) t shares combined optimistically: the result's check under the group key decides
    answered = provider._gather(
        candidates, ask, lambda i, a: accept(i, a, check_share=False), need=t, all_first=False
    )
    sig = combine(optimistic=True)
    if sig is not None:
        return sig
    # (b) some share was wrong (or too few agree): each share checked, a liar named and dropped, and the
    # nodes not asked yet asked for theirs (each checked as it comes)
    for i, (p, share) in list(got.items()):
        if not te.verify_signature_share(p, digest, share):
            faults[i] = f"{what}signature share: {BAD_SHARE}"
            log.warning("KMS node %d (%s) is skipped: %s", i, provider.group.nodes[i], faults[i])
            del got[i]
    rest = [i for i in candidates if i not in answered]
    provider._gather(
        rest, ask, lambda i, a: accept(i, a, check_share=True), need=max(0, t - len(got)), all_first=False
    )
    sig = combine(optimistic=False)
    if sig is not None:
        return sig
    raise KmsClientError(
        f"fewer than {t} KMS nodes gave a valid {what}signature share"
        + ("" if what else " for the app key")
        + _fault_text(faults)
    )


def _together(
    first: Callable[[], bytes] | None, second: Callable[[], str] | None
) -> tuple[bytes | KmsClientError | None, str | KmsClientError | None]:
    """Run the given calls at the same time (a thread for the second when both are given); each result is
    its value, its KmsClientError, or None when the call was not given. Any other exception propagates."""

    def run(fn: Callable[[], Any] | None) -> Any:
        if fn is None:
            return None
        try:
            return fn()
        except KmsClientError as exc:
            return exc

    if first is None or second is None:
        return run(first), run(second)
    with ThreadPoolExecutor(max_workers=1) as pool:
        later = pool.submit(run, second)
        now = run(first)
        return now, later.result()


class _EndedBoot:
    """The holder of a boot's connections after its scope (KmsClient.hand_over_boot): it takes no quote,
    so a call on it can only present the boot's own credential."""

    def quote(self, report_data: bytes) -> bytes:
        raise KmsClientError("the boot has ended: no quote is taken for its hand-over")

    def event_log(self) -> list[Any]:
        raise KmsClientError("the boot has ended: no quote is taken for its hand-over")


def _attested(
    tee: QuoteSource, app_id: bytes, path: str, model: type[_M], body: dict[str, Any], timeout_s: float
) -> Callable[[KmsClient], _M]:
    """The one shape of a boot's request to a node, for `_gather`: `body` posted to `path` over the boot's
    attested connection (the app's RA-TLS credential, usage app:kms-client), the answer parsed as `model`;
    the whole call ends `timeout_s` after it starts (kms.deadline), a trickling node included."""

    def call(client: KmsClient) -> _M:
        deadline = time.monotonic() + timeout_s
        return client.attested_call(
            tee, path, model, body=body, usage="app:kms-client", app_id=app_id, deadline=deadline
        )

    return call


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
    carried: dict[int, list[api.CarriedSubshare]] | None = None,
    board_tokens: dict[int, bytes] | None = None,
    *,
    deadline: float | None = None,
) -> list[th.Dealing]:
    """From every dealer of a round: its commitments and this node's sub-share (over mutual RA-TLS, with this
    node's boot-time evidence), and every page of the sharings it carries (`carried`). Any dealer failing
    fails the round (named); nothing is returned before every page of every dealer is in. `deadline` (a
    time.monotonic() instant): every call ends by then (kms.deadline), however slowly a dealer answers."""
    if set(dealers) != set(dealer_ids):
        raise KmsClientError("one client per dealer of the round")

    def call(i: int, offset: int) -> api.ReshareDealResponse:
        body = api.ReshareDealRequest(
            session=session.hex(),
            index=index,
            member_token=member_token.hex() if member_token else None,
            offset=offset,
        ).model_dump()
        resp = dealers[i].attested_call(
            tee,
            api.PATH_RESHARE_DEAL,
            api.ReshareDealResponse,
            body=body,
            usage="kms:reshare",
            app_id=app_id,
            deadline=deadline,
        )
        if resp.dealer != i or resp.session != session.hex() or resp.offset != offset:
            raise KmsClientError(f"answered as dealer {resp.dealer} of another round (or another page)")
        return resp

    def ask(i: int) -> tuple[api.ReshareDealResponse, list[api.CarriedSubshare]]:
        first = call(i, 0)
        got = list(first.carried)
        while len(got) < first.carried_total:
            page = call(i, len(got))
            if page.carried_total != first.carried_total or page.commitments != first.commitments:
                raise KmsClientError("its pages differ (another total or other commitments)")
            if not page.carried or page.subshare:
                raise KmsClientError(f"sent a malformed page at offset {len(got)}")
            got += page.carried
        if len(got) != first.carried_total:
            raise KmsClientError(f"sent {len(got)} carried sharings, not the {first.carried_total} it counts")
        return first, got

    with ThreadPoolExecutor(max_workers=len(dealer_ids)) as pool:
        futures = {i: pool.submit(ask, i) for i in dealer_ids}
    dealings: list[th.Dealing] = []
    faults: dict[int, str] = {}
    for i, fut in sorted(futures.items()):
        try:
            resp, got = fut.result()
            commitments = tuple(bytes.fromhex(c) for c in resp.commitments)
            subshare = int.from_bytes(bytes.fromhex(resp.subshare), "little")
            if len(commitments) != t_new:
                raise KmsClientError(f"sent {len(commitments)} commitments, not t = {t_new}")
            if board_tokens is not None:
                if not resp.board_token:
                    raise KmsClientError("handed out no board token (its round has no complaint phase)")
                board_tokens[i] = bytes.fromhex(resp.board_token)
        except (Error, ValueError) as exc:
            faults[i] = _describe(exc)
            continue
        dealings.append(th.Dealing(i, commitments, {index: subshare}))
        if carried is not None:
            carried[i] = got
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


def recorded_keys(kms_group: Any, epoch: int, *, finality_depth: int = 0) -> RecordedKeys:
    """The signing key and CA key KmsGroup (`kms_group`: teecloud.chain.kmsgroup.KmsGroup) records for
    `epoch` at the block `finality_depth` blocks below the head. A chain that cannot be read fails closed
    (KmsClientError): a reshare's new member takes no carried key it could not check."""
    try:
        at = kms_group.final_block(finality_depth)
        signing_key = kms_group.signing_key(epoch, at=at)
        group_ca = kms_group.group_ca(epoch, at=at)
    except (ChainError, ValueError) as exc:
        raise KmsClientError(
            f"cannot read epoch {epoch}'s signing and CA keys from KmsGroup: {exc}; refusing to join"
        ) from exc
    return RecordedKeys(signing_key, group_ca.ca_key if group_ca is not None else None)


def join_reshare(
    plan: ResharePlan,
    index: int,
    tee: QuoteSource,
    dealers: Mapping[int, KmsClient],
    *,
    app_id: bytes,
    member_token: bytes | None = None,
    carried_out: CarriedShares | None = None,
    kms_group: Any = None,
    finality_depth: int = 0,
    timeout_s: float | None = None,
) -> ThresholdShare:
    """A joining KMS node's side of a reshare round, run at its boot (the dealers release sub-shares to
    boot-time evidence only). Each dealing is checked (C_0 is the dealer's old public share, the sub-share
    matches the commitments); then s'_index = Σ λ_i·f_i(index). Any failing dealer fails the round (named):
    every new node must sum the same dealings, so a partial round is never completed. `carried_out` receives
    this node's shares of the other sharings the dealers carried (kms.threshold_carry: env keys, the group's
    signing and CA keys), each checked the same way, and the signing and CA keys checked against what
    `kms_group` (required with `carried_out`) records for the epoch at `finality_depth`: the chain is read
    before any dealer is asked (a dealer hands each page out once), and a key the chain does not name fails
    the round before `carried_out` is filled. Every dealer call, and so the whole collection, ends within
    `timeout_s` (default RESHARE_TIMEOUT_S; wall-clock, kms.deadline): a dealer that trickles its answer
    fails the round by then, named."""
    deadline = time.monotonic() + (RESHARE_TIMEOUT_S if timeout_s is None else timeout_s)
    recorded: RecordedKeys | None = None
    if carried_out is not None:
        if kms_group is None:
            raise ValueError("a reshare that carries keys checks them against KmsGroup: pass kms_group")
        recorded = recorded_keys(kms_group, plan.epoch, finality_depth=finality_depth)
    answers: dict[int, list[api.CarriedSubshare]] = {}
    dealings = _collect(
        plan.session,
        plan.dealers,
        index,
        tee,
        dealers,
        plan.t_new,
        app_id,
        member_token,
        answers,
        deadline=deadline,
    )
    if carried_out is not None and recorded is not None:
        got = carry_receive(answers, index=index, t_new=plan.t_new, n_new=plan.n_new)
        check_carried_keys(got, recorded, epoch=plan.epoch, dealers=plan.dealers)
        carried_out.env, carried_out.signing_key, carried_out.ca_key = got.env, got.signing_key, got.ca_key
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


DKG_BOARD_TIMEOUT_S = 300.0  # every member's statement (and confirmation) must be in by then
RESHARE_TIMEOUT_S = 300.0  # a joining member's whole collection of the dealers' sub-shares
_BOARD_POLL_S = 0.25


def _dkg_digest(session: bytes, outcome: th.DkgOutcome) -> bytes:
    """What every member confirms: the round, QUAL and the group commitments it computed."""
    h = hashlib.sha256(b"teecloud-dkg-confirm-v1\x00" + session)
    h.update(bytes(outcome.qual) + b"\x00")
    for c in outcome.commitments:
        h.update(c)
    return h.digest()


def _board_round(
    plan: DkgPlan,
    index: int,
    tee: QuoteSource,
    dealers: Mapping[int, KmsClient],
    board_tokens: Mapping[int, bytes],
    *,
    app_id: bytes,
    post: dict[str, Any],
    done: Callable[[api.DkgBoardResponse], bool],
    deadline: float,
) -> dict[int, api.DkgBoardResponse]:
    """Post `post` (a statement or a confirmation) to every dealer's board, then read each board until
    `done(board)` or the deadline (a time.monotonic() instant), which also ends every call (kms.deadline:
    a board that trickles its answer is cut off there). A dealer whose board cannot be read, or that answers
    for another round or as another dealer, fails the round (named): the members would otherwise decide on
    different views."""

    def call(i: int, extra: dict[str, Any]) -> api.DkgBoardResponse:
        body = {"session": plan.session.hex(), "index": index, "board_token": board_tokens[i].hex(), **extra}
        resp = dealers[i].attested_call(
            tee,
            api.PATH_DKG_BOARD,
            api.DkgBoardResponse,
            body=body,
            usage="kms:reshare",
            app_id=app_id,
            deadline=deadline,
        )
        if resp.dealer != i or resp.session != plan.session.hex():
            raise KmsClientError(f"answered as dealer {resp.dealer} of another round")
        return resp

    failed = threading.Event()  # one board failing fails the round: the others stop waiting

    def follow(i: int) -> api.DkgBoardResponse:
        try:
            board = call(i, post)
            while not done(board):
                if time.monotonic() > deadline:
                    raise KmsClientError("its board was not complete in time (a member did not post)")
                if failed.wait(_BOARD_POLL_S):
                    raise KmsClientError("not read to the end: another dealer's board failed")
                board = call(i, {})
            return board
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=len(plan.dealers)) as pool:
        futures = {i: pool.submit(follow, i) for i in plan.dealers}
    boards, faults = {}, {}
    for i, fut in sorted(futures.items()):
        try:
            boards[i] = fut.result()
        except Error as exc:
            faults[i] = _describe(exc)
    if faults:
        raise KmsClientError("the DKG round failed; no share was made" + _fault_text(faults))
    return boards


def _decide(
    plan: DkgPlan,
    index: int,
    boards: Mapping[int, api.DkgBoardResponse],
    dealings: list[th.Dealing],
    complaints: Sequence[int],
) -> th.DkgOutcome:
    """Steps (1)-(3) of _complaint_phase on boards that hold every member's statement."""
    n = plan.n_new
    # (1): every board shows every member's statement, the same everywhere
    views = {i: {int(j): tuple(a) for j, a in b.complaints.items()} for i, b in boards.items()}
    statements = views[plan.dealers[0]]
    differing = sorted(i for i, v in views.items() if v != statements)
    if (
        differing
        or set(statements) != set(range(1, n + 1))
        or statements.get(index) != tuple(sorted(complaints))
    ):
        raise KmsClientError(
            "the DKG round failed; no share was made: the dealers' boards disagree on the members' "
            f"statements (boards of dealers {differing or list(plan.dealers)})"
        )
    # (2): each dealer's answers, from its own board
    try:
        answers = {
            i: {int(j): int.from_bytes(bytes.fromhex(v), "little") for j, v in b.answers.items()}
            for i, b in boards.items()
        }
        # (3): QUAL and this member's share
        received = {d.dealer: d.shares[index] for d in dealings}
        outcome = th.gjkr_qualify(
            dealings, index, received, {j: list(a) for j, a in statements.items()}, answers, plan.t_new
        )
    except (KeysError, ValueError) as exc:
        raise KmsClientError(f"the DKG round failed; no share was made: {exc}") from exc
    if outcome.disqualified:
        log.warning(
            "DKG round %s: dealers disqualified: %s",
            plan.session.hex()[:8],
            "; ".join(f"{i}: {why}" for i, why in sorted(outcome.disqualified.items())),
        )
    return outcome


def _complaint_phase(
    plan: DkgPlan,
    index: int,
    tee: QuoteSource,
    dealers: Mapping[int, KmsClient],
    dealings: list[th.Dealing],
    board_tokens: Mapping[int, bytes],
    complaints: list[int],
    *,
    app_id: bytes,
    timeout_s: float,
    deadline: float | None = None,
) -> th.DkgOutcome:
    """GJKR's complaint phase (Gennaro, Jarecki, Krawczyk, Rabin, J. Cryptology 20(1) 2007, Fig. 2 steps
    1(b)-(c), 2, 3), the dealers' boards standing in for the broadcast channel:
      (1) post this member's statement (`complaints`, possibly none) to every dealer and wait until every
          board holds all n members' statements, and the boards agree on them;
      (2) read each accused dealer's answers (the sub-shares it reveals) from its own board;
      (3) decide QUAL and the share (th.gjkr_qualify: the same decision at every member);
      (4) post the digest of (round, QUAL, group commitments) to every board and wait for every member's:
          all equal, or the round fails — a dealer that showed members different answers splits nobody.
    Every step ends by `deadline` (a time.monotonic() instant; default: `timeout_s` from now)."""
    if deadline is None:
        deadline = time.monotonic() + timeout_s
    n = plan.n_new
    boards = _board_round(
        plan,
        index,
        tee,
        dealers,
        board_tokens,
        app_id=app_id,
        post={"complaints": complaints},
        done=lambda b: len(b.complaints) == n,
        deadline=deadline,
    )
    outcome = _decide(plan, index, boards, dealings, complaints)
    # (4): every member confirms the same QUAL and group key
    digest = _dkg_digest(plan.session, outcome).hex()
    boards = _board_round(
        plan,
        index,
        tee,
        dealers,
        board_tokens,
        app_id=app_id,
        post={"confirm": digest},
        done=lambda b: len(b.confirms) == n,
        deadline=deadline,
    )
    others = sorted(
        {int(j) for b in boards.values() for j, c in b.confirms.items() if c != digest}
        | {j for j in range(1, n + 1) if any(str(j) not in b.confirms for b in boards.values())}
    )
    if others:
        raise KmsClientError(
            "the DKG round failed; no share was made: members "
            f"{others} computed another QUAL or group key than this member's"
        )
    return outcome


def join_dkg(
    plan: DkgPlan,
    index: int,
    tee: QuoteSource,
    dealers: Mapping[int, KmsClient],
    *,
    app_id: bytes,
    member_token: bytes | None = None,
    timeout_s: float = DKG_BOARD_TIMEOUT_S,
) -> ThresholdShare:
    """A new KMS node's side of a Joint-Feldman DKG round, at its boot: every dealer's sub-share is checked
    against that dealer's commitments. In a round with a complaint phase (`plan.complaint_round`: every
    member joins together, within `timeout_s`) a failing dealer gets a complaint and the round goes on as
    GJKR's (_complaint_phase): the share and the group commitments are the sums over QUAL, and the round
    fails, nothing made, only with fewer than t qualified dealers or boards that disagree. Without it a
    complaint fails the round. `member_token`: this member's token, for a round opened with member token
    hashes (a rotation's, `teecloud up`'s). The whole round, every call included, ends within `timeout_s`
    (wall-clock: kms.deadline)."""
    tokens: dict[int, bytes] | None = {} if plan.complaint_round else None
    deadline = time.monotonic() + timeout_s  # the whole ceremony, each call included (kms.deadline)
    dealings = _collect(
        plan.session,
        plan.dealers,
        index,
        tee,
        dealers,
        plan.t_new,
        app_id,
        member_token,
        None,
        tokens,
        deadline=deadline,
    )
    try:
        total, complaints = th.joint_feldman(dealings, index, {d.dealer: d.shares[index] for d in dealings})
        if tokens is not None:
            outcome = _complaint_phase(
                plan,
                index,
                tee,
                dealers,
                dealings,
                tokens,
                complaints,
                app_id=app_id,
                timeout_s=timeout_s,
                deadline=deadline,
            )
            return ThresholdShare(
                plan.epoch, index, plan.t_new, plan.n_new, outcome.share, outcome.commitments
            )
        if complaints:
            raise _complaint(complaints)
        return ThresholdShare(plan.epoch, index, plan.t_new, plan.n_new, total, th.sum_commitments(dealings))
    except (KeysError, SealingError) as exc:
        raise KmsClientError(f"the DKG round failed: {exc}") from exc


class RoundPending(KmsClientError):
    """A rolling round's first pass is done at this member (its statement is on every board): it finishes
    at its next boot, once every member has posted (post_dkg_statement / finish_dkg)."""


_PENDING_FORMAT = "teecloud-dkg-pending-v1"


@dataclass(frozen=True)
class PendingDkg:
    """A member of a rolling DKG round (`kms rotate`: its nodes restart one at a time) between its two
    boots: the round, every dealer's commitments and this member's sub-share from it, the board tokens and
    the statement it posted. Secret (the sub-shares, the tokens): the launcher keeps it sealed like a
    share."""

    session: bytes
    epoch: int
    index: int
    dealings: tuple[th.Dealing, ...]
    board_tokens: Mapping[int, bytes]
    complaints: tuple[int, ...]

    def to_json_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": _PENDING_FORMAT,
                "session": self.session.hex(),
                "epoch": self.epoch,
                "index": self.index,
                "dealings": {
                    str(d.dealer): {
                        "commitments": [c.hex() for c in d.commitments],
                        "subshare": d.shares[self.index].to_bytes(32, "little").hex(),
                    }
                    for d in self.dealings
                },
                "board_tokens": {str(i): t.hex() for i, t in sorted(self.board_tokens.items())},
                "complaints": list(self.complaints),
            }
        ).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> PendingDkg:
        try:
            doc = json.loads(data)
            if doc.get("format") != _PENDING_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}")
            index = int(doc["index"])
            return cls(
                bytes.fromhex(doc["session"]),
                int(doc["epoch"]),
                index,
                tuple(
                    th.Dealing(
                        int(i),
                        tuple(bytes.fromhex(c) for c in d["commitments"]),
                        {index: int.from_bytes(bytes.fromhex(d["subshare"]), "little")},
                    )
                    for i, d in doc["dealings"].items()
                ),
                {int(i): bytes.fromhex(t) for i, t in doc["board_tokens"].items()},
                tuple(int(j) for j in doc["complaints"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SealingError(f"a pending DKG round's state is malformed: {exc}") from exc


def post_dkg_statement(
    plan: DkgPlan,
    index: int,
    tee: QuoteSource,
    dealers: Mapping[int, KmsClient],
    *,
    app_id: bytes,
    member_token: bytes | None = None,
    timeout_s: float = DKG_BOARD_TIMEOUT_S,
) -> PendingDkg:
    """A rolling round's first pass at member `index`'s boot (GJKR's steps 1(a)-(b) only): fetch and check
    every dealer's sub-share (as join_dkg) and post this member's statement — the dealers whose sub-share
    fails their commitments, possibly none — to every dealer's board, without waiting for the others (they
    restart after this one). Returns what finish_dkg needs at the member's next boot; any dealer failing
    fails the round, named. Every call ends within `timeout_s`."""
    if not plan.complaint_round:
        raise KmsUsageError("a rolling round has a complaint phase")
    deadline = time.monotonic() + timeout_s
    tokens: dict[int, bytes] = {}
    dealings = _collect(
        plan.session,
        plan.dealers,
        index,
        tee,
        dealers,
        plan.t_new,
        app_id,
        member_token,
        None,
        tokens,
        deadline=deadline,
    )
    try:
        _, complaints = th.joint_feldman(dealings, index, {d.dealer: d.shares[index] for d in dealings})
    except (KeysError, SealingError) as exc:
        raise KmsClientError(f"the DKG round failed: {exc}") from exc
    _board_round(
        plan,
        index,
        tee,
        dealers,
        tokens,
        app_id=app_id,
        post={"complaints": complaints},
        done=lambda _b: True,
        deadline=deadline,
    )
    if complaints:
        log.warning("DKG round %s: complained against dealers %s", plan.session.hex()[:8], complaints)
    return PendingDkg(plan.session, plan.epoch, index, tuple(dealings), tokens, tuple(sorted(complaints)))


def finish_dkg(
    plan: DkgPlan,
    index: int,
    tee: QuoteSource,
    dealers: Mapping[int, KmsClient],
    pending: PendingDkg,
    *,
    app_id: bytes,
    timeout_s: float = DKG_BOARD_TIMEOUT_S,
) -> ThresholdShare:
    """A rolling round's second pass at member `index`'s next boot (GJKR's steps 1(c), 2, 3): every member
    has posted its statement by now, so each board holds them all and the accused dealers' answers; read
    them (the boards must agree), decide QUAL and this member's share (the sums over QUAL), and post the
    confirmation digest to every board. The members' agreement is checked where the epoch is recorded
    (`kms rotate-finish`: every node states the same commitments, or nothing is recorded): a member does
    not wait for the others' confirmations, which come after it restarts. A board that does not yet hold
    every statement within `timeout_s` fails the round, naming the dealers."""
    if (pending.session, pending.epoch, pending.index) != (plan.session, plan.epoch, index):
        raise KmsUsageError("the pending state is of another round or member")
    deadline = time.monotonic() + timeout_s
    n = plan.n_new
    boards = _board_round(
        plan,
        index,
        tee,
        dealers,
        pending.board_tokens,
        app_id=app_id,
        post={},
        done=lambda b: len(b.complaints) == n,
        deadline=deadline,
    )
    outcome = _decide(plan, index, boards, list(pending.dealings), pending.complaints)
    _board_round(
        plan,
        index,
        tee,
        dealers,
        pending.board_tokens,
        app_id=app_id,
        post={"confirm": _dkg_digest(plan.session, outcome).hex()},
        done=lambda _b: True,
        deadline=deadline,
    )
    try:
        return ThresholdShare(plan.epoch, index, plan.t_new, plan.n_new, outcome.share, outcome.commitments)
    except SealingError as exc:
        raise KmsClientError(f"the DKG round failed: {exc}") from exc
