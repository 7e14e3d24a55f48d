"""Authorization: from a TLS peer's certificate to an `AuthorizedApp` / `AuthorizedKms`, failing closed.

    Authorizer.authorize_app(cert, vm_config)  -> AuthorizedApp    (GetAppKey, SignCert)
    Authorizer.authorize_kms(cert)             -> AuthorizedKms    (GetKmsKey)

Every key-releasing handler receives only one of these objects, which only the Authorizer makes, so a new
endpoint cannot skip a step. The steps: the RA-TLS peer verifier (teecloud.peer: quote, event log, policy,
boot_info); the OS image the event log claims is the one that booted (MRTD, RTMR1, RTMR2, and RTMR0 for the
VM shape an app states); the boot-time rule (the quoted RTMR3 is exactly the boot grammar's value: keys only
while a CVM boots); for GetAppKey, the GPU gate (a measured compose requiring GPU attestation needs a
measured gpu-evidence event); then the chain; for apps, last, the boot-nonce (one of this KMS's fresh
challenges).

    require_boot_time(peer)           RTMR3 == the boot grammar's replay (teecloud.attestation.boottime)
    ChainAuthorizer.app_allowed(bi)   KmsAuth.isAppAllowed through the chain gate (teecloud.peer.ChainGate)
    ChainAuthorizer.kms_allowed(bi)   KmsAuth.isKmsAllowed, same cache rule
    ChainAuthorizer.app_deployed(id)  KmsAuth.deployed_apps: the threshold env-key gate (docs/kms.md)

Every failure to get a clear "yes" from the chain — unreachable RPC, revert, wrong chain, an unexpected
exception — is a denial (`AccessDenied(step="chain")`): the KMS never releases keys on a guess.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from teecloud import appcompose, vmconfig
from teecloud.attestation.boottime import BootMeasurement
from teecloud.attestation.models import VerifiedEvidence
from teecloud.chain.api import BootInfo
from teecloud.kms.challenge import BootChallenges, FirstUseLedger
from teecloud.kms.errors import AccessDenied
from teecloud.peer import AttestedPeer, AuthChain, ChainGate, FreshBlockNumber, PeerRejected, PeerVerifier
from teecloud.peer import require_boot_time as peer_require_boot_time

__all__ = [
    "IMAGE_REGISTERS",
    "SHAPE_REGISTERS",
    "AuthChain",
    "AuthorizedApp",
    "AuthorizedKms",
    "Authorizer",
    "ChainAuthorizer",
    "FreshBlockNumber",
    "OsImageReference",
    "boot_info_to_json",
    "parse_vm_config",
    "require_boot_time",
]


def require_boot_time(peer: AttestedPeer) -> BootMeasurement:
    """The boot-time rule (teecloud.peer.require_boot_time: the quoted RTMR3 is exactly the boot grammar's
    value for the peer's identity), as the KMS's AccessDenied."""
    try:
        return peer_require_boot_time(peer)
    except PeerRejected as exc:  # carries the peer's boot_info
        raise _denied(exc) from exc


def _denied(exc: PeerRejected) -> AccessDenied:
    """A refusal of the shared peer layer as the KMS's AccessDenied, with the boot_info it carries (audit)."""
    denied = AccessDenied(exc.reason, step=exc.step)
    if exc.boot_info is not None:
        denied.boot_info = boot_info_to_json(exc.boot_info)
    return denied


def boot_info_to_json(boot_info: BootInfo) -> dict[str, Any]:
    """Hex strings for bytes; used in audit records and logs (contains no secrets)."""
    out: dict[str, Any] = {}
    for key, value in asdict(boot_info).items():
        if isinstance(value, bytes | bytearray):
            out[key] = bytes(value).hex()
        elif isinstance(value, tuple):
            out[key] = list(value)
        else:
            out[key] = value
    return out


def _rtmr0_log(evidence: VerifiedEvidence) -> tuple[bytes, ...]:
    return evidence.app_info.rtmr0_log if evidence.app_info is not None else ()


class ChainAuthorizer(ChainGate):
    """The chain gate (teecloud.peer.ChainGate: KmsAuth, cached for at most one block) as the KMS's
    AccessDenied(step="chain")."""

    def _ask(self, kind: str, subject: BootInfo | bytes) -> str:
        try:
            return super()._ask(kind, subject)
        except PeerRejected as exc:
            raise _denied(exc) from exc


class OsImageReference(Protocol):
    """An OS image's reference measurements: `ref(os_image_hash)` -> {register name: value}, None for an
    unknown image. Without a VM shape it must give the registers that depend on the image only (mrtd:
    firmware, rtmr1: kernel, rtmr2: command line + initrd); with `cpu_count` and `memory_size` (the shape
    an app CVM states in its vm_config) it must give rtmr0 (firmware configuration, ACPI tables) as well.
    With the shape the KMS also passes the whole parsed `vm_config` (QEMU version: MRTD's page order) and
    `rtmr0_log`, the caller's RTMR0 event digests as its quote-replayed log gives them (real images take
    the ACPI events from there: teecloud.kms.os_images); a reference may ignore both. A reference may
    raise AccessDenied (step os_image) to refuse with its own reason."""

    def __call__(
        self,
        os_image_hash: bytes,
        *,
        cpu_count: int | None = None,
        memory_size: int | None = None,
        vm_config: vmconfig.VmConfig | None = None,
        rtmr0_log: Sequence[bytes] = (),
    ) -> Mapping[str, bytes] | None: ...


IMAGE_REGISTERS = ("mrtd", "rtmr1", "rtmr2")
SHAPE_REGISTERS = ("mrtd", "rtmr0", "rtmr1", "rtmr2")
# An app's MRTD depends on the QEMU that launched it (one-pass or two-pass page order, both in the image's
# measurement file): it is compared in _check_vm_shape, which always runs for apps when references are
# configured, against the candidate for the QEMU version its vm_config states (review 3, R3-2).
APP_IMAGE_REGISTERS = ("rtmr1", "rtmr2")
_COMPARED_REGISTERS = ("mrtd", "rtmr0", "rtmr1", "rtmr2")
# The caller's vm_config is dstack's VmConfig (teecloud.vmconfig, its one home): the KMS reads the image it
# claims and the shape (CPU count, memory size) RTMR0 depends on.
VmShape = vmconfig.VmConfig


def parse_vm_config(vm_config: object) -> vmconfig.VmConfig:
    """The caller's vm_config, checked for size and types. Raises AccessDenied at step `os_image`: without it
    RTMR0 cannot be checked."""
    try:
        return vmconfig.parse(vm_config)
    except vmconfig.VmConfigError as exc:
        raise AccessDenied(str(exc), step="os_image") from exc


_SEAL = object()  # only the Authorizer constructs authorized objects


@dataclass(frozen=True)
class AuthorizedApp:
    """An app CVM that passed every step: attested, booting, on its measured OS image and VM shape, and
    allowed by KmsAuth. `reason` is the chain's answer, for the audit record."""

    peer: AttestedPeer
    vm_config: vmconfig.VmConfig | None
    reason: str
    _seal: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._seal is not _SEAL:
            raise TypeError("only kms.authz.Authorizer makes an AuthorizedApp")

    @property
    def boot_info(self) -> BootInfo:
        return self.peer.boot_info


@dataclass(frozen=True)
class AuthorizedKms:
    """A KMS CVM that passed attestation, the OS-image check and KmsAuth.isKmsAllowed."""

    peer: AttestedPeer
    reason: str
    _seal: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._seal is not _SEAL:
            raise TypeError("only kms.authz.Authorizer makes an AuthorizedKms")

    @property
    def boot_info(self) -> BootInfo:
        return self.peer.boot_info


class Authorizer:
    """The KMS's authorization steps, independent of HTTP and of the keys."""

    def __init__(
        self,
        peers: PeerVerifier,
        chain: ChainAuthorizer,
        *,
        os_image_reference: OsImageReference | None,
        dev_mode: bool,
        challenges: BootChallenges | None = None,
        require_app_compose: bool = False,
        onboarding: FirstUseLedger | None = None,
    ) -> None:
        # --- gpu gate: True refuses GetAppKey without the app-compose (so that every app's GPU requirement
        # is read); False trusts an absent one to require nothing, for callers that do not send it yet
        self.require_app_compose = require_app_compose
        self.peers = peers
        self.chain = chain
        self.challenges = challenges if challenges is not None else BootChallenges()
        self.onboarding = onboarding if onboarding is not None else FirstUseLedger(None)
        self.os_image_reference = os_image_reference
        self.dev_mode = dev_mode

    def authorize_app(
        self,
        cert_der: bytes | None,
        vm_config: object,
        *,
        ctx: dict[str, Any] | None = None,
        app_compose: str = "",
    ) -> AuthorizedApp:
        """`ctx`, when given, receives the peer's boot_info (JSON) as soon as it is known (audit).
        `app_compose` (GetAppKey) is read for the GPU gate (`_check_gpu_gate`)."""
        peer = self.attest(cert_der, image_registers=APP_IMAGE_REGISTERS)
        if ctx is not None:
            ctx["boot_info"] = boot_info_to_json(peer.boot_info)
        measured = require_boot_time(peer)
        self._check_gpu_gate(measured, app_compose)
        self._require_os_image_reference()
        shape = self._check_vm_shape(peer.boot_info, peer.evidence, vm_config)
        reason = self.chain.app_allowed(peer.boot_info)
        # Last, so that only a request that passed every other step counts against its boot's challenge.
        self.challenges.redeem(measured.boot_nonce)
        return AuthorizedApp(peer, shape, reason, _SEAL)

    def _check_gpu_gate(self, measured: BootMeasurement, app_compose: str) -> None:
        """(1) the caller's app-compose is believed only when sha256 of it is the measured compose-hash (a
        fact of the register the quote signs); (2) when it requires GPU attestation, the boot measurement
        holds a gpu-evidence event (the guest measures one only after the GPU evidence verified, before
        boot-mr-done; teecloud.agent.boot)."""
        if not app_compose:
            if self.require_app_compose:
                raise AccessDenied(
                    "this KMS reads every app's GPU requirement from its app-compose, and none was sent",
                    step="app_compose",
                )
            return
        # (1)
        raw = app_compose.encode("utf-8", "surrogatepass")
        if len(raw) > appcompose.MAX_APP_COMPOSE_BYTES:
            raise AccessDenied("the app-compose sent is too large", step="app_compose")
        if hashlib.sha256(raw).digest() != measured.compose_hash:
            raise AccessDenied(
                "the app-compose sent is not the measured one (its sha256 is not the compose-hash in RTMR3)",
                step="app_compose",
            )
        try:
            required = appcompose.gpu_attestation_required(appcompose.parse_app_compose(raw))
        except appcompose.AppComposeError as exc:
            raise AccessDenied(str(exc), step="app_compose") from None
        # (2)
        if required and measured.gpu_evidence is None:
            raise AccessDenied(
                "the measured compose requires GPU attestation and the boot measurement has no "
                "gpu-evidence event (the GPU gate did not run before boot-mr-done)",
                step="gpu_evidence",
            )

    def authorize_kms(self, cert_der: bytes | None, *, ctx: dict[str, Any] | None = None) -> AuthorizedKms:
        peer = self.attest(cert_der)
        if ctx is not None:
            ctx["boot_info"] = boot_info_to_json(peer.boot_info)
        require_boot_time(peer)
        reason = self.chain.kms_allowed(peer.boot_info)
        # Last: only a request that passed every other step counts against its evidence's first use.
        self.onboarding.redeem(peer.evidence.report_data)
        return AuthorizedKms(peer, reason, _SEAL)

    def attest(
        self,
        cert_der: bytes | None,
        *,
        image_registers: tuple[str, ...] = IMAGE_REGISTERS,
        peers: PeerVerifier | None = None,
    ) -> AttestedPeer:
        """Steps (1)-(5) of the module docstring (the shared RA-TLS peer verifier, teecloud.peer), then the
        OS-image registers every attested caller must match (`image_registers`: an app's MRTD waits for its
        VM shape). `peers`: the same verifier under another certificate lifetime (running KMS nodes'
        certificates, teecloud.kms.peering). Raises AccessDenied with the failing step."""
        try:
            peer = (peers or self.peers).verify_cert(cert_der)
        except PeerRejected as exc:
            raise _denied(exc) from exc
        try:
            self._check_os_image(peer.boot_info, peer.evidence, image_registers)
        except AccessDenied as exc:
            exc.boot_info = boot_info_to_json(peer.boot_info)  # audited: which image was claimed, by whom
            raise
        return peer

    def _require_os_image_reference(self) -> None:
        """App keys need the OS image bound to what booted. The os-image-hash event is written by the guest
        itself, so without reference measurements (`os_image_reference`) a TD booted from any
        firmware/kernel could claim an allowed image. A production KMS without them releases no app keys
        (fail closed); dev mode keeps the skip (its evidence is forgeable by the host anyway). Onboarding is
        unaffected: KmsAuth pins the whole measurement (mr_aggregated) of a KMS."""
        if self.os_image_reference is None and not self.dev_mode:
            raise AccessDenied(
                "no reference measurements for OS images are configured, so the os-image-hash event "
                "cannot be checked against what booted; a production KMS releases no app keys without them",
                step="os_image",
            )

    def _check_os_image(
        self, boot_info: BootInfo, evidence: VerifiedEvidence, registers: tuple[str, ...] = IMAGE_REGISTERS
    ) -> None:
        """The os-image-hash event is written by the guest's boot code; it is believed only when the measured
        firmware (MRTD), kernel (RTMR1) and command line + initrd (RTMR2) are that image's reference values
        (dstack recomputes them with dstack-mr). Every attested caller, KMS onboarding included; app
        endpoints then compare RTMR0 too, for the VM shape the caller states (`_check_vm_shape`)."""
        if self.os_image_reference is None:
            return
        expected = self.os_image_reference(boot_info.os_image_hash)
        deferred = tuple(r for r in IMAGE_REGISTERS if r not in registers)
        self._compare_reference(
            boot_info.os_image_hash.hex(), expected, evidence, registers, deferred=deferred
        )

    def _check_vm_shape(
        self, boot_info: BootInfo, evidence: VerifiedEvidence, vm_config: object
    ) -> vmconfig.VmConfig | None:
        """RTMR0 (firmware configuration: ACPI tables built from the CPU count and memory size) against the
        image's reference for the shape the caller's vm_config states — dstack's approach. Naming a false
        shape gains nothing: RTMR0 must still equal that shape's reference exactly. A missing or malformed
        vm_config, or one naming another image than the measured os-image-hash event, is refused."""
        if self.os_image_reference is None:
            return None  # dev mode without references (_require_os_image_reference refuses production)
        shape = parse_vm_config(vm_config)
        image = boot_info.os_image_hash.hex()
        if shape.os_image_hash != boot_info.os_image_hash:
            raise AccessDenied(
                f"vm_config names OS image {shape.os_image_hash.hex()}, but the measured os-image-hash "
                f"event is {image}",
                step="os_image",
            )
        try:
            expected = self.os_image_reference(
                boot_info.os_image_hash,
                cpu_count=shape.cpu_count,
                memory_size=shape.memory_size,
                vm_config=shape,
                rtmr0_log=_rtmr0_log(evidence),
            )
        except TypeError as exc:
            raise AccessDenied(
                f"the reference function cannot give OS image {image}'s RTMR0 for a VM shape ({exc}); "
                "it must accept cpu_count= and memory_size= (misconfigured reference function)",
                step="os_image",
            ) from exc
        self._compare_reference(
            image,
            expected,
            evidence,
            SHAPE_REGISTERS,
            shape=f" for {shape.cpu_count} CPUs and {shape.memory_size} bytes of memory",
        )
        return shape

    def _compare_reference(
        self,
        image: str,
        expected: object,
        evidence: VerifiedEvidence,
        required: tuple[str, ...],
        *,
        shape: str = "",
        deferred: tuple[str, ...] = (),
    ) -> None:
        """Every register of `required` must be in the reference; every compared register the reference
        gives must equal the quoted one, except `deferred` ones (compared later, with the VM shape)."""
        if expected is None:
            raise AccessDenied(f"no reference measurements for OS image {image}{shape}", step="os_image")
        if not isinstance(expected, Mapping):
            raise AccessDenied(
                f"the reference measurements for OS image {image} are not a register map "
                "(misconfigured reference function)",
                step="os_image",
            )
        missing = [r.upper() for r in required if not isinstance(expected.get(r), bytes)]
        if missing:
            raise AccessDenied(
                f"the reference measurements for OS image {image}{shape} lack {', '.join(missing)}, so the "
                "os-image-hash event cannot be checked against what booted",
                step="os_image",
            )
        differing = [
            r.upper()
            for r in _COMPARED_REGISTERS
            if r in expected and r not in deferred and evidence.measurements.get(r) != expected[r]
        ]
        if differing:
            raise AccessDenied(
                f"the measured {', '.join(differing)} {'is' if len(differing) == 1 else 'are'} not OS image "
                f"{image}'s reference value{shape} (the os-image-hash event does not match the "
                "firmware/kernel/initrd or VM configuration that booted)",
                step="os_image",
            )
