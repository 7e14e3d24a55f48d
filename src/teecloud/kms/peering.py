"""Threshold mode: the channel between RUNNING KMS nodes (networked presigning, later per-app key rounds).

A running node's quotes are not boot-time evidence, and the key-release rule gives nothing to evidence that
is not (teecloud.peer.require_boot_time: a quote taken after boot may come from a quote oracle). So a node
makes its peer identity AT BOOT, inside its TEE, and proves possession of it later:

    PeerIdentity.at_boot(tee, share)   before finish_kms_boot: a fresh P-256 key that never leaves this
                                       process's memory (never sealed: a restart makes a new one), a quote
                                       over ratls_report_data(its SPKI) taken at the boot measurement, the
                                       event log at that point, and a membership proof (below)
    PeerIdentity.client_cert(...)      that boot-time quote packaged in a short-lived client certificate for
                                       one peer's temporary CA (the quote binds the key, not the certificate)
    membership_input(epoch, i, spki)   the VOPRF input of a membership proof: node i's partial evaluation of
                                       it (Z = s_i·H(input), RFC 9497 DLEQ proof against Y_i) shows that the
                                       holder of share i of this committee vouches for exactly this key

THE RULE (`PeerAdmission.admit`; docs/kms.md "The channel between running nodes"): a running node is
accepted as committee member i iff
  (1) its RA-TLS certificate verifies under the shared peer verifier (teecloud.peer: quote, collateral,
      event-log replay, report_data binding of the certificate's key, policy) and its OS-image registers
      are the image's reference — kms.authz.Authorizer.attest, as for every attested caller; the TLS
      handshake proved it holds that key now;
  (2) the quote is boot-time evidence (require_boot_time: RTMR3 is exactly the boot grammar's value);
  (3) KmsAuth.isKmsAllowed(boot_info), through the chain gate at its finality depth;
  (4) it proves membership: a DLEQ-proved partial evaluation, under public share Y_i of THIS node's own
      committee (the Feldman commitments of the share this node serves; same epoch), of
      membership_input(epoch, i, sha256(SPKI of the certificate of step 1)). Only a process holding share i
      — sealed to an allowed KMS measurement — can make it, and it names this key only;
  (5) one live process per share index: when KmsGroup records a current peer key for member i of this
      (active) committee, the certificate's key is that key (a copy of node i's disk boots with another
      key: it is refused everywhere, with the reason).
Both directions apply it: the server's TLS certificate carries the same boot-time key and quote
(make_server_identity with the peer identity) and every peer answer carries the server's membership proof.
There is no first-use window (unlike onboarding's FirstUseLedger): running nodes talk for days; what a
captured boot quote lacks is step (4), which needs the share.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from teecloud.attestation.models import EventLogEntry
from teecloud.keys import threshold as th
from teecloud.keys.certs import key_to_pem, spki_der
from teecloud.keys.ratls import make_ratls_cert, ratls_report_data
from teecloud.kms import api
from teecloud.kms.authz import ChainAuthorizer, boot_info_to_json, require_boot_time
from teecloud.kms.bootstrap import KMS_APP_ID
from teecloud.kms.client import KmsClient, read_answer
from teecloud.kms.errors import AccessDenied, KmsClientError, KmsDenied
from teecloud.peer import AttestedPeer
from teecloud.tee.base import TeePlatform

__all__ = [
    "PEER_CERT_USAGE",
    "AdmittedNode",
    "BootEvidence",
    "Committee",
    "PeerAdmission",
    "PeerClient",
    "PeerIdentity",
    "membership_input",
    "record_current_peer_keys",
    "served_key_id",
]

PEER_CERT_USAGE = "kms:peer"
PEER_CERT_LIFETIME_S = 600
_MEMBER_PREFIX = b"teecloud-kms-v1/peer\x00"
_M = TypeVar("_M", bound=BaseModel)


def membership_input(epoch: int, index: int, spki: bytes) -> bytes:
    """The VOPRF input node `index` evaluates to vouch for its peer key (domain-separated from app inputs,
    which start "teecloud-kms-v1/app\\0" and "teecloud-kms-v1/instance\\0")."""
    if not 0 <= epoch < 1 << 32 or not 1 <= index <= th.MAX_NODES:
        raise ValueError("membership: epoch or index out of range")
    return (
        _MEMBER_PREFIX + epoch.to_bytes(4, "big") + index.to_bytes(2, "big") + hashlib.sha256(spki).digest()
    )


@dataclass(frozen=True)
class BootEvidence:
    """A QuoteSource that replays one quote taken at boot: it answers only for the report_data it was taken
    over (the peer key's), with the event log as it was then."""

    report_data: bytes
    boot_quote: bytes
    boot_event_log: tuple[EventLogEntry, ...]

    def quote(self, report_data: bytes) -> bytes:
        if report_data != self.report_data:
            raise ValueError("the boot-time quote binds the peer key only")
        return self.boot_quote

    def event_log(self) -> list[EventLogEntry]:
        return list(self.boot_event_log)


@dataclass(frozen=True)
class Committee:
    """The committee this node serves in: its epoch, n and Feldman commitments (from its own sealed share)."""

    epoch: int
    n: int
    commitments: tuple[bytes, ...]


@dataclass(frozen=True)
class PeerIdentity:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    evidence: BootEvidence = field(repr=False)
    member: api.PeerMember

    @property
    def index(self) -> int:
        return self.member.index

    @classmethod
    def at_boot(cls, tee: TeePlatform, *, epoch: int, index: int, share: int) -> PeerIdentity:
        """Call at the boot measurement (before finish_kms_boot), with this node's VOPRF share."""
        key = ec.generate_private_key(ec.SECP256R1())
        spki = spki_der(key.public_key())
        rd = ratls_report_data(spki)
        evidence = BootEvidence(rd, tee.quote(rd), tuple(tee.event_log()))
        partial = th.partial_evaluate(index, share, membership_input(epoch, index, spki))
        member = api.PeerMember(
            epoch=epoch, index=index, element=partial.element.hex(), proof=partial.proof.hex()
        )
        return cls(key, evidence, member)

    def client_cert(
        self, issuer_cert: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, *, now: int
    ) -> tuple[str, str]:
        """(key PEM, certificate PEM): the boot-time quote in a certificate under a peer's temporary CA."""
        cert = make_ratls_cert(
            self.evidence,
            self.key,
            issuer_key=issuer_key,
            issuer_cert=issuer_cert,
            subject="teecloud KMS peer",
            usage=PEER_CERT_USAGE,
            not_before=now - 30,
            not_after=now - 30 + PEER_CERT_LIFETIME_S,
            app_id=KMS_APP_ID,
            server_auth=False,
            client_auth=True,
        )
        return key_to_pem(self.key), cert.public_bytes(serialization.Encoding.PEM).decode()


_SEAL = object()


@dataclass(frozen=True)
class AdmittedNode:
    """A running KMS node that passed PeerAdmission.admit: member `index` of this node's committee."""

    index: int
    boot_info: dict[str, Any]
    reason: str
    key_id: str  # sha256 (hex) of the SPKI of its boot-time peer key: tells two processes of one share apart
    _seal: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._seal is not _SEAL:
            raise TypeError("only kms.peering.PeerAdmission makes an AdmittedNode")


def _spki_of(cert_der: bytes) -> bytes:
    try:
        key = x509.load_der_x509_certificate(cert_der).public_key()
    except ValueError as exc:
        raise AccessDenied(f"the peer certificate does not parse: {exc}", step="peer") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AccessDenied("the peer certificate's key is not an EC key", step="peer")
    return spki_der(key)


class PeerAdmission:
    """The rule for a running node (module docstring, steps (1)-(4)); one function, `admit`."""

    def __init__(
        self,
        attest: Callable[[bytes | None], AttestedPeer],
        chain: ChainAuthorizer,
        committee: Callable[[], Committee | None],
        *,
        still_active: Callable[[Committee], None] | None = None,
        registered_key: Callable[[Committee, int], str | None] | None = None,
    ) -> None:
        """`attest`: kms.authz.Authorizer.attest (the shared peer verifier, then the OS-image registers);
        `chain`: the KMS's chain gate; `committee`: this node's current committee (None once its share is
        retired: it then admits nobody); `still_active` raises AccessDenied when the chain (KmsGroup) names
        another committee as the active one of that epoch (R4-6: a superseded committee admits nobody);
        `registered_key(committee, i)` is the hex sha256(SPKI) of member i's current boot-time peer key as
        KmsGroup records it for that (active) committee, None when none is recorded (step (5))."""
        self._attest = attest
        self._chain = chain
        self._committee = committee
        self._still_active = still_active
        self._registered_key = registered_key

    def admit(self, cert_der: bytes | None, member: api.PeerMember | None) -> AdmittedNode:
        committee = self._committee()
        if committee is None:
            raise AccessDenied("this node serves no committee (no share, or retired)", step="mode")
        # (1) the shared peer verifier and the OS-image registers
        peer = self._attest(cert_der)
        bi = boot_info_to_json(peer.boot_info)
        # (2) boot-time evidence only: a running node's later quotes are never enough
        try:
            require_boot_time(peer)
        except AccessDenied as exc:
            exc.boot_info = bi
            raise
        # (3) an allowed KMS build
        try:
            reason = self._chain.kms_allowed(peer.boot_info)
        except AccessDenied as exc:
            exc.boot_info = bi
            raise
        # (4) a member of this committee — still the one KmsGroup names for its epoch — vouching for this
        # certificate's key
        if self._still_active is not None:
            try:
                self._still_active(committee)
            except AccessDenied as exc:
                exc.boot_info = bi
                raise
        assert cert_der is not None  # attest refused None
        spki = _spki_of(cert_der)
        self._check_member(committee, member, spki, bi)
        assert member is not None
        key_id = hashlib.sha256(spki).hexdigest()
        # (5) one live process per share index: the key KmsGroup records as member i's current one
        if self._registered_key is not None:
            try:
                registered = self._registered_key(committee, member.index)
            except AccessDenied as exc:
                exc.boot_info = bi
                raise
            if registered is not None and registered != key_id:
                denied = AccessDenied(
                    f"another process of share {member.index}: KmsGroup records member {member.index}'s "
                    f"current peer key as {registered[:16]}…, not this process's {key_id[:16]}… (one live "
                    "process per share index; a copy of a node, or a process its operator replaced)",
                    step="membership",
                )
                denied.boot_info = bi
                raise denied
        return AdmittedNode(member.index, bi, reason, key_id, _SEAL)

    @staticmethod
    def _check_member(
        committee: Committee, member: api.PeerMember | None, spki: bytes, bi: dict[str, Any]
    ) -> None:
        def refuse(reason: str) -> AccessDenied:
            denied = AccessDenied(reason, step="membership")
            denied.boot_info = bi
            return denied

        if member is None:
            raise refuse("no membership proof: a running node proves it holds a share of this committee")
        if member.epoch != committee.epoch:
            raise refuse(
                f"membership proof for epoch {member.epoch}; this committee serves {committee.epoch}"
            )
        if not 1 <= member.index <= committee.n:
            raise refuse(f"share index {member.index} is not a member of this {committee.n}-node committee")
        try:
            partial = th.Partial(member.index, bytes.fromhex(member.element), bytes.fromhex(member.proof))
            y_i = th.public_share(committee.commitments, member.index)
        except ValueError as exc:
            raise refuse(f"membership proof malformed: {exc}") from exc
        if not th.verify_partial(y_i, membership_input(committee.epoch, member.index, spki), partial):
            raise refuse(
                f"the membership proof does not verify for share {member.index} of this committee and this "
                "certificate's key (not a member, another committee, or a proof made for another key)"
            )


class PeerClient(KmsClient):
    """This node calling member `expected_index` over mutual RA-TLS: the server must pass the rule (steps
    (1)-(3) on its certificate before anything is sent, (4) before any request but the proof itself), and
    this node presents its boot-time identity.

    Step (4) first (review 4, R4-3): on every newly pinned server certificate (the first call, or a server
    whose certificate changed) the client sends a PeerHello — nothing but this node's own public proof —
    and checks the membership proof in its answer against that pinned certificate before it sends any
    other request on it. Before that proof, the pin carries only the proof's prerequisites: the GET of the
    server's (public) temporary CA, without a client certificate, and the PeerHello itself."""

    name = "kms-peer"

    def __init__(
        self,
        url: str,
        *,
        identity: PeerIdentity,
        admission: PeerAdmission,
        expected_index: int,
        clock: Callable[[], float] = time.time,
        timeout: float = 30.0,
    ) -> None:
        self._admission = admission
        self._identity = identity
        self.expected_index = expected_index
        self._proven: bytes | None = None  # the pinned certificate whose membership (step 4) was checked
        self._proving = threading.local()
        self._prove_lock = threading.Lock()
        super().__init__(url, server_check=self._check_server, clock=clock, timeout=timeout)

    def _check_server(self, cert_der: bytes) -> None:
        try:
            self._admission.admit(cert_der, self._identity.member)  # (1)-(3); (4) by _prove
        except AccessDenied as exc:
            if exc.step != "membership":
                raise KmsClientError(
                    f"peer {self.expected_index} at {self.url} refused: {exc.reason}"
                ) from exc

    def _pin(self, *, renew: bool = False, deadline: float | None = None) -> bytes:
        """The pinned, checked server certificate, with step (4) proven on it before it is returned to any
        request but the proof's own."""
        pinned = super()._pin(renew=renew, deadline=deadline)
        if pinned == self._proven or getattr(self._proving, "on", False):
            return pinned
        with self._prove_lock:
            if pinned != self._proven:
                self._proving.on = True
                try:
                    self._prove(pinned)
                except BaseException:
                    self._forget(pinned)
                    raise
                finally:
                    self._proving.on = False
                self._proven = pinned
        return pinned

    def _forget(self, pinned: bytes) -> None:
        """Drop an unproven or unreachable pin and the temporary CA fetched through it (review 5, R5-5): the
        next call probes the URL afresh, so a server that failed its proof leaves nothing behind that would
        keep the member behind that URL unreachable once the URL leads back to it."""
        with self._pin_lock:
            if self._pinned == pinned:
                self._pinned = None
            self._temp_ca = None

    def _prove(self, pinned: bytes) -> None:
        """A PeerHello on exactly `pinned` (never renewed here); its answer must prove membership as
        `expected_index` for that certificate's key."""
        answer = self._send(api.PATH_PEER_HELLO, api.PeerHelloResponse, {}, pinned)
        self._check_answer(pinned, answer.member)

    def _send(self, path: str, model: type[_M], body: dict[str, Any], pinned: bytes | None = None) -> _M:
        temp_cert, temp_key = self._temp_ca_pair()
        client = self._identity.client_cert(temp_cert, temp_key, now=int(self._clock()))
        full = {**body, "member": self._identity.member.model_dump()}
        try:
            if pinned is None:
                return self._call("POST", path, model, body=full, client_cert=client)
            return self._call_on(pinned, path, model, full, client)
        except KmsDenied as exc:
            raise KmsDenied(f"peer {self.expected_index} refused: {exc.reason}", step=exc.step) from exc

    def _call_on(
        self, pinned: bytes, path: str, model: type[_M], body: dict[str, Any], client: tuple[str, str]
    ) -> _M:
        deadline = time.monotonic() + self._timeout
        try:
            answer = self._request("POST", path, body, client, pinned, deadline=deadline)
        except ssl.SSLCertVerificationError as exc:
            self._forget(pinned)  # the next call re-pins, as KmsClient._call does at once
            raise KmsClientError(f"the node at {self.url} is not the server that was checked: {exc}") from exc
        if answer.server_der != pinned:
            raise KmsClientError("the node's certificate changed during the request")
        return read_answer(answer.status, answer.content, model, who="the node")

    def _check_answer(self, pinned: bytes, member: api.PeerMember | None) -> None:
        try:
            admitted = self._admission.admit(pinned, member)
        except AccessDenied as exc:
            raise KmsClientError(f"peer {self.expected_index} at {self.url}: {exc.reason}") from exc
        if admitted.index != self.expected_index:
            raise KmsClientError(
                f"the node at {self.url} proved membership as share {admitted.index}, "
                f"not {self.expected_index}"
            )

    def peer_call(self, path: str, model: type[_M], body: dict[str, Any]) -> _M:
        """POST `body` (with this node's membership proof) to a server whose membership was proven on the
        pinned certificate, and check the answer's `member` proves it again. Raises KmsClientError /
        KmsDenied naming the peer."""
        answer = self._send(path, model, body)
        pinned = self._pinned
        assert pinned is not None  # _call pinned (and proved) it
        self._check_answer(pinned, getattr(answer, "member", None))
        return answer


def served_key_id(url: str, *, timeout: float = 10.0) -> str:
    """sha256 (hex) of the SPKI of the certificate a KMS node serves at `url` (a threshold member serves its
    boot-time peer key): what its operator records on KmsGroup as member i's current key. No trust is drawn
    from it here — the members check the key through the whole rule when the process calls them."""
    u = httpx.URL(url)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((u.host, u.port or 443), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=u.host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError) as exc:
        raise KmsClientError(f"cannot read the peer key served at {url}: {exc}") from exc
    if not der:
        raise KmsClientError(f"the node at {url} presented no certificate")
    try:
        return hashlib.sha256(_spki_of(der)).hexdigest()
    except AccessDenied as exc:
        raise KmsClientError(f"the node at {url}: {exc.reason}") from exc


def record_current_peer_keys(kms_group: Any, committee: Any) -> dict[int, bytes]:
    """The operator's step for one live process per share index: read the key each member of `committee`
    (teecloud.chain.kmsgroup.Committee) serves at its recorded URL now and record on KmsGroup those that
    differ from the record (a restarted member's new key replaces its old one). Returns what is recorded.
    Raises KmsClientError naming a member that does not answer (nothing is recorded then)."""
    keys = {i: bytes.fromhex(served_key_id(url)) for i, url in sorted(committee.urls.items())}
    changed = {i: k for i, k in keys.items() if committee.peer_keys.get(i) != k}
    if changed:
        kms_group.record_peer_keys(committee.committee_id, changed)
    return keys


def peer_clients(
    urls: dict[int, str], identity: PeerIdentity, admission: PeerAdmission
) -> dict[int, PeerClient]:
    return {
        i: PeerClient(u, identity=identity, admission=admission, expected_index=i)
        for i, u in sorted(urls.items())
        if i != identity.index
    }
