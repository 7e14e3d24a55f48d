"""Request and response models of the KMS HTTP API (the KMS's contract; clients import only this).

Public listener (HTTPS, RA-TLS server certificate, client certificates requested):

    GET  /prpc/KMS.GetMeta                 -> KmsMeta                   public
    GET  /prpc/KMS.GetTempCaCert           -> TempCaCertResponse        public (docs/kms.md: no trust)
    POST /prpc/KMS.GetAppEnvEncryptPubKey  -> EnvEncryptPubKeyResponse  public
    POST /prpc/KMS.GetAppKey               -> AppKeyResponse            attested app (mutual RA-TLS)
    POST /prpc/KMS.SignCert                -> SignCertResponse          attested app (mutual RA-TLS)
    POST /prpc/KMS.GetKmsKey               -> KmsKeyResponse            attested KMS (mutual RA-TLS)

Admin listener (separate port, 127.0.0.1, bearer token): GET /status -> StatusResponse,
GET /audit?limit=N -> AuditResponse. No admin route returns key material.

Every refusal is HTTP 403 with a `Denied` body; malformed requests are 400/422 with a `Denied` body too.
Byte strings travel as lowercase hex without 0x (app ids may be sent with or without 0x).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from teecloud.appcompose import MAX_APP_COMPOSE_BYTES

__all__ = [
    "PATH_GET_APP_ENV_ENCRYPT_PUBKEY",
    "PATH_GET_APP_KEY",
    "PATH_GET_BOOT_CHALLENGE",
    "PATH_GET_KMS_KEY",
    "PATH_GET_META",
    "PATH_GET_TEMP_CA_CERT",
    "PATH_PEER_HELLO",
    "PATH_PEER_ROUND",
    "PATH_RESHARE_DEAL",
    "PATH_SIGN_CERT",
    "PATH_THRESHOLD_APP_CA_CACHED",
    "PATH_THRESHOLD_APP_CA_STORE",
    "PATH_THRESHOLD_EVALUATE",
    "PATH_THRESHOLD_KEEP_SIGNATURES",
    "PATH_THRESHOLD_SIGN_APP_CA",
    "AppCaCachedRequest",
    "AppCaCachedResponse",
    "AppKeyResponse",
    "AuditRecord",
    "AuditResponse",
    "BootChallengeResponse",
    "CaRootInstallRequest",
    "CaRootShareRequest",
    "Denied",
    "DkgOpenRequest",
    "EnvEncryptPubKeyRequest",
    "EnvEncryptPubKeyResponse",
    "GetAppKeyRequest",
    "GetKmsKeyRequest",
    "KeptAppCa",
    "KeptAppKey",
    "KmsKeyResponse",
    "KmsMeta",
    "PeerHelloRequest",
    "PeerHelloResponse",
    "PeerMember",
    "PeerRoundRequest",
    "PeerRoundResponse",
    "PoolResponse",
    "ReshareDealRequest",
    "ReshareDealResponse",
    "ReshareOpenRequest",
    "ReshareOpenResponse",
    "RetireShareResponse",
    "RoundAdvanceRequest",
    "RoundOpenRequest",
    "RoundPublic",
    "RoundValue",
    "RoundViewRequest",
    "RoundViewResponse",
    "SignCertRequest",
    "SignCertResponse",
    "StatusResponse",
    "TempCaCertResponse",
    "ThresholdEvaluateRequest",
    "ThresholdEvaluateResponse",
    "ThresholdKeepRequest",
    "ThresholdKeepResponse",
    "ThresholdPartial",
    "ThresholdSignAppCaRequest",
    "ThresholdSignRequest",
    "ThresholdSignResponse",
]

PATH_GET_META = "/prpc/KMS.GetMeta"
PATH_GET_TEMP_CA_CERT = "/prpc/KMS.GetTempCaCert"
PATH_GET_APP_ENV_ENCRYPT_PUBKEY = "/prpc/KMS.GetAppEnvEncryptPubKey"
PATH_GET_APP_KEY = "/prpc/KMS.GetAppKey"
PATH_SIGN_CERT = "/prpc/KMS.SignCert"
PATH_GET_KMS_KEY = "/prpc/KMS.GetKmsKey"
PATH_GET_BOOT_CHALLENGE = "/prpc/KMS.GetBootChallenge"
PATH_THRESHOLD_EVALUATE = "/prpc/KMS.ThresholdEvaluate"
PATH_RESHARE_DEAL = "/prpc/KMS.ReshareDeal"
PATH_THRESHOLD_SIGN = "/prpc/KMS.ThresholdSignAppKey"
PATH_THRESHOLD_SIGN_APP_CA = "/prpc/KMS.ThresholdSignAppCa"
PATH_THRESHOLD_APP_CA_CACHED = "/prpc/KMS.ThresholdAppCaCached"
PATH_THRESHOLD_APP_CA_STORE = "/prpc/KMS.ThresholdAppCaStore"
PATH_THRESHOLD_KEEP_SIGNATURES = "/prpc/KMS.ThresholdKeepSignatures"
PATH_PEER_HELLO = "/prpc/KMS.PeerHello"
PATH_PEER_ROUND = "/prpc/KMS.PeerRoundShares"

# A reshare's carried sharings (kms.threshold_carry) go in pages: at most MAX_CARRIED_PAGE per ReshareDeal
# answer (and under the client's 1 MiB), MAX_CARRIED_TOTAL of an epoch in all (an input bound on a dealer's
# word, about 24 days of the node-wide env ceremony budget; docs/kms.md)
MAX_CARRIED_PAGE = 1024
MAX_CARRIED_TOTAL = 1 << 20


class Denied(BaseModel):
    """The body of every refusal: which check failed and why. Never key material."""

    error: str = "denied"
    reason: str
    step: str = ""


class KmsMeta(BaseModel):
    """Public facts about this KMS: its root public keys (as published on chain) and mode."""

    ca_cert: str = Field(description="KMS root CA certificate (PEM)")
    ca_pubkey: str = Field(description="KMS root CA public key, SubjectPublicKeyInfo DER, hex")
    k256_pubkey: str = Field(description="KMS root secp256k1 public key, SEC1 compressed, hex")
    dev_mode: bool
    tee: str
    mr_aggregated: str = Field(description="this KMS's boot-time mr_aggregated, hex")
    gateway_app_id: str = ""
    kms_contract: str = ""
    # threshold node: the group's root CA (PEM; its key is the group's P-256 CA key, and app CAs are signed
    # under it by t nodes). Informational: clients trust the ceremony's group record, not a node's say-so
    group_ca_cert: str = ""


class TempCaCertResponse(BaseModel):
    """dstack-style temporary CA: clients sign their RA-TLS certificates with it so that the TLS layer of the
    standard library accepts them. The key is public on purpose; trust comes from the quote in the leaf."""

    temp_ca_cert: str
    temp_ca_key: str


class BootChallengeResponse(BaseModel):
    """A challenge a booting CVM measures into RTMR3 as its boot-nonce (teecloud.kms.challenge): this KMS
    releases keys only to a boot that measured one of its challenges, within `window_s` of issuing it."""

    challenge: str = Field(description="hex, 65 bytes")
    window_s: int


class EnvEncryptPubKeyRequest(BaseModel):
    app_id: str = Field(min_length=1, max_length=66)
    # threshold mode: the root epoch whose per-app env key is wanted (the app's `kms_key_epoch`; default 1)
    epoch: int | None = Field(default=None, ge=1, lt=1 << 32)


class EnvEncryptPubKeyResponse(BaseModel):
    """dstack `GetAppEnvEncryptPubKey` response (hex fields)."""

    public_key: str
    signature: str = Field(description="legacy: k256 over keccak256(prefix ‖ ':' ‖ app_id ‖ public_key)")
    timestamp: int
    signature_v1: str = Field(
        description="k256 over keccak256('dstack-env-encrypt-pubkey:' ‖ app_id ‖ u64_be(ts) ‖ public_key)"
    )


class GetAppKeyRequest(BaseModel):
    """Nothing the caller says is trusted: app_id and instance_id come from its replayed event log. The
    VmConfig (JSON: os_image_hash, cpu_count, memory_size, ...) only selects which RTMR0 reference the
    measured RTMR0 must equal; it is required when the KMS checks OS images (docs/kms.md step 6)."""

    api_version: int = 1
    vm_config: str = Field(default="", max_length=65536, description="the CVM's VmConfig (JSON)")
    # --- gpu gate
    app_compose: str = Field(
        default="",
        max_length=MAX_APP_COMPOSE_BYTES,
        description="the CVM's normalized app-compose.json; believed only when its sha256 is the measured "
        "compose-hash, then read for `gpu_attestation` (docs/ai.md, the GPU gate)",
    )


class AppKeyResponse(BaseModel):
    """The app's keys (dstack `GetAppKey` fields plus the app CA key and the KMS k256 public key)."""

    app_id: str
    instance_id: str
    ca_key: str = Field(description="app CA private key (PEM, PKCS#8)")
    ca_cert: str = Field(description="app CA certificate (PEM)")
    disk_crypt_key: str
    env_crypt_key: str
    k256_key: str
    k256_signature: str
    kms_k256_pubkey: str
    gateway_app_id: str
    os_image_hash: str


class SignCertRequest(BaseModel):
    csr: str = Field(min_length=1, max_length=16384, description="PKCS#10 CSR (PEM)")
    vm_config: str = Field(default="", max_length=65536, description="the CVM's VmConfig (JSON)")
    # --- gpu gate
    app_compose: str = Field(
        default="",
        max_length=MAX_APP_COMPOSE_BYTES,
        description="the CVM's normalized app-compose.json, as for GetAppKey (the GPU gate)",
    )


class SignCertResponse(BaseModel):
    certificate_chain: list[str] = Field(
        description="PEM certificates, leaf first, ending at the KMS root CA"
    )


class GetKmsKeyRequest(BaseModel):
    api_version: int = 1
    vm_config: str = Field(default="", max_length=65536)


class KmsKeyResponse(BaseModel):
    """Root key material; returned only to an attested KMS that the chain's KmsAuth allows."""

    ca_key: str
    ca_cert: str
    k256_key: str
    temp_ca_key: str
    temp_ca_cert: str


class AuditRecord(BaseModel):
    ts: int
    request_id: str
    endpoint: str
    peer: str = ""
    cert_sha256: str = ""
    decision: str
    reason: str
    step: str = ""
    boot_info: dict[str, Any] | None = None


class AuditResponse(BaseModel):
    records: list[AuditRecord]


class StatusResponse(BaseModel):
    status: str
    dev_mode: bool
    tee: str
    ca_pubkey: str
    k256_pubkey: str
    mr_aggregated: str
    public_url: str = ""
    requests_allowed: int = 0
    requests_denied: int = 0
    chain: str = ""


class ThresholdEvaluateRequest(BaseModel):
    """Threshold mode (docs/kms.md): like GetAppKey, nothing the caller says selects what is evaluated —
    the node builds the VOPRF inputs from the caller's verified boot_info."""

    api_version: int = 1
    vm_config: str = Field(default="", max_length=65536, description="the CVM's VmConfig (JSON)")
    # --- gpu gate
    app_compose: str = Field(
        default="",
        max_length=MAX_APP_COMPOSE_BYTES,
        description="the CVM's normalized app-compose.json, as for GetAppKey (the GPU gate)",
    )
    # --- rotation: the root epoch to evaluate under (None: the app's current one); a node evaluates only
    # epochs the app's measured app-compose names (teecloud.kms.rotation)
    epoch: int | None = Field(default=None, ge=1, lt=1 << 32)


class ThresholdPartial(BaseModel):
    input: str = Field(max_length=8192, description="the VOPRF input the node evaluated (hex)")
    element: str = Field(max_length=64, description="Z_i = s_i·H(input), ristretto255 (hex)")
    proof: str = Field(max_length=128, description="RFC 9497 DLEQ proof c ‖ s against Y_i (hex)")


_Point33 = Annotated[str, StringConstraints(pattern="^0[23][0-9a-f]{64}$")]  # SEC1 compressed, hex


class KeptAppKey(BaseModel):
    """The group's signature of an app's k256 key that a node kept (public data: it is in the app's GetKey
    chain)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    app_public_key: _Point33
    signature: str = Field(pattern="^[0-9a-f]{130}$", description="r ‖ s ‖ v (hex, 65 bytes)")


class KeptAppCa(BaseModel):
    """The group-signed app CA certificate a node kept for an app (public: in every RA-TLS chain it
    serves)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    app_ca_public_key: _Point33
    certificate: str = Field(min_length=1, max_length=4096, description="PEM")


class ThresholdEvaluateResponse(BaseModel):
    """One node's partial evaluations for the attested app instance: [per app, per instance]."""

    app_id: str
    instance_id: str
    epoch: int
    index: int
    partials: list[ThresholdPartial] = Field(max_length=2)
    gateway_app_id: str = ""
    os_image_hash: str = ""
    # --- threshold signatures: unused presignature sessions of this node (hex), for ThresholdSignAppKey
    presignatures: list[str] = Field(default_factory=list, max_length=16)
    # --- the group's P-256 CA key: unused presignature sessions (hex), for ThresholdSignAppCa
    ca_presignatures: list[str] = Field(default_factory=list, max_length=16)
    # --- kept signatures (issue 19, one round per repeat boot): what this node keeps for (epoch, app_id)
    # from an earlier boot (ThresholdKeepSignatures); the CVM uses them only after checking them against the
    # keys it derives from the combined partials and the group's keys from the chain
    kept_app_key: KeptAppKey | None = None
    kept_app_ca: KeptAppCa | None = None


class ThresholdSignRequest(BaseModel):
    """Threshold mode: this node's share of the KMS signature over keccak256("dstack-kms-issued:" ‖ app_id ‖
    app_public_key). The node takes app_id from the caller's verified boot_info and builds the message itself;
    the caller names only its app k256 public key (derived in the CVM) and the presignature to use."""

    api_version: int = 1
    vm_config: str = Field(default="", max_length=65536, description="the CVM's VmConfig (JSON)")
    app_compose: str = Field(default="", max_length=MAX_APP_COMPOSE_BYTES)
    app_public_key: str = Field(min_length=66, max_length=66, description="compressed secp256k1 (hex)")
    session: str = Field(min_length=32, max_length=32, description="the presignature's session (hex)")


class ThresholdSignResponse(BaseModel):
    """One node's signature share and the presignature's public part (to check the share)."""

    app_id: str
    index: int
    session: str
    big_r: str = Field(max_length=66)
    kinv_commitments: list[str] = Field(max_length=64)
    sigma_commitments: list[str] = Field(max_length=64)
    s: str = Field(max_length=64, description="s_i = (k^-1)_i·e + σ_i·r (hex, 32 bytes)")


class ReshareOpenRequest(BaseModel):
    """Admin: open a reshare round on this (old) node (teecloud.kms.threshold.ResharePlan)."""

    session: str = Field(min_length=32, max_length=32, description="16 random bytes naming the round (hex)")
    epoch: int = Field(ge=0, lt=1 << 32)
    old_commitments: list[str] = Field(min_length=1, max_length=64)
    dealers: list[int] = Field(min_length=1, max_length=64)
    t_new: int = Field(ge=1, le=64)
    n_new: int = Field(ge=1, le=64)
    member_token_hashes: dict[str, str] = Field(
        min_length=1,
        max_length=64,
        description="new share index -> sha256 of the one-time token only that new member holds (hex): a "
        "dealer hands index j's sub-share only to a caller presenting member j's token",
    )


class ReshareOpenResponse(BaseModel):
    dealer: int
    commitments: list[str]


class ReshareDealRequest(BaseModel):
    """A joining KMS node (boot-time RA-TLS evidence of an allowed KMS build) asks for its sub-share."""

    session: str = Field(min_length=32, max_length=32)
    index: int = Field(ge=1, le=64, description="the new share index this node will hold")
    member_token: str | None = Field(
        default=None, min_length=64, max_length=64, description="reshare rounds: this member's token (hex)"
    )
    offset: int = Field(
        default=0,
        ge=0,
        le=MAX_CARRIED_TOTAL,
        description="the first carried sharing of the page asked for (0: the first page, with the sub-share)",
    )


class CarriedSubshare(BaseModel):
    """A dealer's sub-share of one more sharing it holds of the epoch (kms.threshold_carry): an app's env
    key ("env", edwards25519, scalar little-endian), the group's signing key ("sigkey", secp256k1) or CA key
    ("ca-sigkey", P-256) (scalars big-endian)."""

    kind: str = Field(pattern="^(env|sigkey|ca-sigkey)$")
    app_id: str = Field(pattern="^([0-9a-f]{40})?$")
    old_commitments: list[str] = Field(max_length=64)
    commitments: list[str] = Field(max_length=64)
    subshare: str = Field(pattern="^[0-9a-f]{64}$")


class ReshareDealResponse(BaseModel):
    """One page of a dealer's answer: the root sub-share (the page at offset 0 only; "" on later pages), and
    the carried sharings from `offset` (at most MAX_CARRIED_PAGE of them) of `carried_total` in all."""

    session: str
    dealer: int
    commitments: list[str] = Field(max_length=64)
    subshare: str = Field(max_length=64)
    carried: list[CarriedSubshare] = Field(default_factory=list, max_length=MAX_CARRIED_PAGE)
    offset: int = Field(default=0, ge=0, le=MAX_CARRIED_TOTAL)
    carried_total: int = Field(default=0, ge=0, le=MAX_CARRIED_TOTAL)


class RetireShareResponse(BaseModel):
    index: int
    epoch: int
    sealed_copy_erased: bool


class DkgOpenRequest(BaseModel):
    """Admin: open a Joint-Feldman DKG round on this share-less node, as dealer `dealer`."""

    session: str = Field(min_length=32, max_length=32)
    epoch: int = Field(ge=0, lt=1 << 32)
    dealer: int = Field(ge=1, le=64)
    dealers: list[int] = Field(min_length=1, max_length=64)
    t: int = Field(ge=1, le=64)
    n: int = Field(ge=1, le=64)
    member_token_hashes: dict[str, str] | None = Field(
        default=None,
        max_length=64,
        description="as for a reshare (a rotation's round sets them): share j's sub-share only to the boot "
        "presenting member j's token",
    )


# --- threshold mode: the channel between running nodes (teecloud.kms.peering)


# The channel between running nodes and its rounds parse strictly (review 4, R4-1/R4-2): JSON integers
# only (no "1", true or 2.0), no field the API does not define, lowercase hex of the exact length, so a
# handler never sees a value `bytes.fromhex` refuses and no two encodings read as the same value.
_STRICT = ConfigDict(strict=True, extra="forbid")
_Session = Annotated[str, StringConstraints(pattern="^[0-9a-f]{32}$")]  # 16 bytes, lowercase hex
_Hash = Annotated[str, StringConstraints(pattern="^[0-9a-f]{64}$")]  # 32 bytes, lowercase hex


class PeerMember(BaseModel):
    """A running node's membership proof (teecloud.kms.peering): its partial evaluation, with share `index`
    of the committee of `epoch`, of the VOPRF input naming its boot-time peer key, and the DLEQ proof."""

    model_config = _STRICT

    epoch: int = Field(ge=0, lt=1 << 32)
    index: int = Field(ge=1, le=64)
    element: str = Field(pattern="^[0-9a-f]{64}$")
    proof: str = Field(pattern="^[0-9a-f]{128}$")


class PeerHelloRequest(BaseModel):
    """A running node checks the channel to another (both sides apply kms.peering's rule)."""

    model_config = _STRICT

    member: PeerMember | None = None


class PeerHelloResponse(BaseModel):
    index: int = Field(description="the caller's share index, as the rule admitted it")
    member: PeerMember


# --- threshold mode: signing-key DKG and presigning rounds among running nodes (teecloud.kms.threshold_net)

# SEC1 compressed or a 32-byte scalar ("" for none), lowercase hex
_Point = Annotated[str, StringConstraints(max_length=66, pattern="^[0-9a-f]*$")]
MAX_ROUND_BATCH = 32


# a share index as a JSON object key, in its one canonical spelling (review 5, R5-4: int() merged "01", "+1")
_ShareIndexKey = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]?$")]


class RoundValue(BaseModel):
    """One broadcast value of one sender for one presignature (or the signing-key dealing): points are
    33-byte SEC1 compressed (hex), scalars 32 bytes (hex). Which fields a stage uses: kms.threshold_net."""

    model_config = _STRICT

    c: list[_Point] = Field(default_factory=list, max_length=64)  # sigkey / reduce commitments; result
    k: list[_Point] = Field(default_factory=list, max_length=64)
    a: list[_Point] = Field(default_factory=list, max_length=64)
    z: list[_Point] = Field(default_factory=list, max_length=64)
    w: str = Field(default="", max_length=64, pattern="^[0-9a-f]*$")
    proof: str = Field(default="", max_length=128, pattern="^[0-9a-f]*$")


class RoundOpenRequest(BaseModel):
    """Admin: open a round on this member. `kind` "sigkey" (Joint-Feldman of the group's secp256k1 signing
    key among all n members) or "presign" (`count` presignatures among `participants`, >= 2t-1)."""

    model_config = _STRICT

    session: _Session
    kind: str = Field(pattern="^(ca-)?(sigkey|presign)$")  # "ca-": the group's P-256 CA key
    count: int = Field(default=1, ge=1, le=MAX_ROUND_BATCH)
    participants: list[int] = Field(min_length=1, max_length=64)
    peers: dict[_ShareIndexKey, str] = Field(
        max_length=64, description="share index -> that member's public URL"
    )


class RoundPublic(BaseModel):
    """This member's broadcast values for the next stage (one per presignature), or the round's result."""

    session: str
    index: int
    stage: str
    values: list[RoundValue] = Field(max_length=MAX_ROUND_BATCH)


class RoundViewRequest(BaseModel):
    """Admin: every participant's values of `stage`, as the operator relays them to each member."""

    model_config = _STRICT

    session: _Session
    stage: str = Field(pattern="^(deal|mul|reduce)$")
    broadcast: dict[_ShareIndexKey, list[RoundValue]] = Field(max_length=64)


class PoolResponse(BaseModel):
    """Admin: this member's unused presignatures and its group signing key (hex; "" without one); the same
    for the group's P-256 CA key, and whether this member holds the group root CA certificate."""

    unused: int
    signing_key: str
    ca_unused: int = 0
    ca_key: str = ""
    ca_root: bool = False


class ThresholdSignAppCaRequest(BaseModel):
    """Threshold mode: this node's share of the app CA certificate's signature under the group's root CA
    (teecloud.keys.threshold_certs). The node builds the TBS itself from the caller's verified app_id, the
    group root's validity and the app CA key named here (derived in the CVM)."""

    model_config = _STRICT

    api_version: int = 1
    vm_config: str = Field(default="", max_length=65536, description="the CVM's VmConfig (JSON)")
    app_compose: str = Field(default="", max_length=MAX_APP_COMPOSE_BYTES)
    app_ca_public_key: str = Field(pattern="^0[23][0-9a-f]{64}$", description="compressed P-256 (hex)")
    session: _Session


MAX_APP_CA_PEM = 4096  # a group-signed app CA certificate is ~700 characters of PEM


class AppCaCachedRequest(BaseModel):
    """Threshold mode: the group-signed app CA certificate this node keeps for (epoch, app_id, app CA key), if
    any (public data: the certificate is in every RA-TLS chain the app serves). With `certificate`
    (ThresholdAppCaStore): keep this one, which the node checks is exactly the TBS it builds for that app and
    key under its root, signed by the group's CA key."""

    model_config = _STRICT

    epoch: int = Field(ge=1, lt=1 << 32)
    app_id: str = Field(pattern="^(?:[0-9a-f]{2}){1,64}$")
    app_ca_public_key: str = Field(pattern="^0[23][0-9a-f]{64}$", description="compressed P-256 (hex)")
    certificate: str = Field(default="", max_length=MAX_APP_CA_PEM)


class ThresholdKeepRequest(BaseModel):
    """Threshold mode, at the end of a boot that ran a signing round: keep the group's signature of this
    app's k256 key and/or its app CA certificate, for the next boot's ThresholdEvaluate answer. Attested and
    judged like ThresholdEvaluate (the node takes app_id from the caller's verified boot_info and the epoch
    by the same rule); the node keeps only what verifies under the group's keys for exactly that app."""

    model_config = _STRICT

    api_version: int = 1
    vm_config: str = Field(default="", max_length=65536, description="the CVM's VmConfig (JSON)")
    app_compose: str = Field(default="", max_length=MAX_APP_COMPOSE_BYTES)
    epoch: int | None = Field(default=None, ge=1, lt=1 << 32)
    app_public_key: str = Field(default="", pattern="^(0[23][0-9a-f]{64})?$")
    signature: str = Field(default="", pattern="^([0-9a-f]{130})?$", description="r ‖ s ‖ v (hex)")
    app_ca_public_key: str = Field(default="", pattern="^(0[23][0-9a-f]{64})?$")
    certificate: str = Field(default="", max_length=MAX_APP_CA_PEM)


class ThresholdKeepResponse(BaseModel):
    kept_app_key: bool = False
    kept_app_ca: bool = False


class AppCaCachedResponse(BaseModel):
    certificate: str = Field(default="", max_length=MAX_APP_CA_PEM, description="PEM, '' when none is kept")
    stored: bool = False


class CaRootShareRequest(BaseModel):
    """Admin: this member's share of the group root CA's self-signature, valid from `not_before`, with
    presignature `session` of the P-256 CA key (the member builds the TBS itself)."""

    model_config = _STRICT

    session: _Session
    not_before: int = Field(ge=0, lt=2**34)


class CaRootInstallRequest(BaseModel):
    """Admin: the group root CA certificate (PEM) for this member to keep; refused unless it is exactly this
    group's root, signed by the group's P-256 key."""

    model_config = _STRICT

    certificate: str = Field(max_length=8192)


class RoundViewResponse(BaseModel):
    view_hash: str


class RoundAdvanceRequest(BaseModel):
    model_config = _STRICT

    session: _Session
    stage: str = Field(pattern="^(deal|mul|reduce)$")


class PeerRoundRequest(BaseModel):
    """A running member fetches its sub-shares of `stage` from this member (mutual RA-TLS, kms.peering's
    rule). `view_hash` hashes the broadcast it was relayed: a dealer answers only when it saw the same."""

    model_config = _STRICT

    session: _Session
    stage: str = Field(pattern="^(deal|reduce)$")
    view_hash: _Hash
    member: PeerMember | None = None


class PeerRoundResponse(BaseModel):
    session: str
    stage: str
    dealer: int
    shares: list[list[_Point]] = Field(max_length=MAX_ROUND_BATCH)
    member: PeerMember


# --- threshold mode: per-app env keys (teecloud.kms.threshold_env)

PATH_THRESHOLD_ENV_PARTIAL = "/prpc/KMS.ThresholdEnvPartial"
PATH_PEER_ENV_DKG = "/prpc/KMS.PeerEnvDkg"
PATH_PEER_ENV_SHARE = "/prpc/KMS.PeerEnvShare"
PATH_PEER_ENV_SIGN = "/prpc/KMS.PeerEnvSign"
PATH_PEER_ENV_RECOVER = "/prpc/KMS.PeerEnvRecover"
PATH_PEER_ENV_PIECE = "/prpc/KMS.PeerEnvPiece"
_Ed = Annotated[str, StringConstraints(pattern="^[0-9a-f]{64}$")]  # an edwards25519 point / X25519 key
_AppIdHex = Annotated[str, StringConstraints(pattern="^[0-9a-f]{40}$")]


class ThresholdEnvPartialRequest(BaseModel):
    """A booting CVM asks for D_i = x_i·P, P the ephemeral key of its own encrypted env (its first 32
    bytes, hex). The app (and so x) comes from the caller's verified evidence, never from this body."""

    model_config = ConfigDict(extra="forbid")

    api_version: int = 1
    vm_config: str = Field(default="", max_length=65536)
    app_compose: str = Field(default="", max_length=MAX_APP_COMPOSE_BYTES)
    epoch: int | None = Field(default=None, ge=1, lt=1 << 32)
    ephemeral_key: str = Field(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")


class ThresholdEnvPartialResponse(BaseModel):
    app_id: str
    epoch: int
    index: int
    element: str = Field(pattern="^[0-9a-f]{64}$")
    proof: str = Field(pattern="^[0-9a-f]{128}$")
    commitments: list[str] = Field(max_length=64)


class PeerEnvDkgRequest(BaseModel):
    """A running member drives one stage of an app's env-key DKG on this member (kms.threshold_env)."""

    model_config = _STRICT

    # held: does this member hold a sealed sharing (no dealing); recover: obtain this member's missing share
    # of an existing sharing by share recovery; confirm: settle this member's tentative share (promoted only
    # when it sees t members hold the same commitments, itself included; dropped when superseded: R7-1), or
    # poll its confirmed one again (dropped only when another sharing superseded it: R8-2)
    stage: str = Field(pattern="^(deal|view|finish|commit|confirm|abort|held|recover)$")
    session: _Session
    epoch: int = Field(ge=1, lt=1 << 32)
    app_id: _AppIdHex
    peers: dict[_ShareIndexKey, str] = Field(default_factory=dict, max_length=64)
    view: dict[_ShareIndexKey, list[_Ed]] = Field(default_factory=dict, max_length=64)
    commitments: list[_Ed] = Field(default_factory=list, max_length=64)
    member: PeerMember | None = None


class PeerEnvDkgResponse(BaseModel):
    index: int
    stage: str
    held: bool = False  # this member already holds a sealed sharing of the app (its commitments follow)
    tentative: bool = False  # ... sealed by a commit, not yet confirmed held by t members (review 7, R7-1)
    commitments: list[_Ed] = Field(default_factory=list, max_length=64)
    view_hash: str = ""
    # finish: this member's finish failed because THIS dealer's sub-share did not come or did not verify
    # against its commitments (the coordinator leaves it out of the next try: review 8, R8-1)
    accused: int | None = Field(default=None, strict=True, ge=1, le=64)
    member: PeerMember | None = None


class PeerEnvShareRequest(BaseModel):
    model_config = _STRICT

    session: _Session
    view_hash: _Hash
    member: PeerMember | None = None


class PeerEnvShareResponse(BaseModel):
    session: str
    dealer: int
    share: _Ed
    member: PeerMember


class PeerEnvRecoverRequest(BaseModel):
    """The caller (an admitted member: the recovery's target is always the caller's own index) asks this
    helper for a step of share recovery of its share of an app's env sharing (kms.threshold_env)."""

    model_config = _STRICT

    stage: str = Field(pattern="^(split|view|sum)$")
    session: _Session
    epoch: int = Field(ge=1, lt=1 << 32)
    app_id: _AppIdHex
    helpers: list[int] = Field(min_length=1, max_length=64)
    # sum: every helper's split commitments D_{i,j} (helper i -> helper j -> point)
    table: dict[_ShareIndexKey, dict[_ShareIndexKey, _Ed]] = Field(default_factory=dict, max_length=64)
    peers: dict[_ShareIndexKey, str] = Field(default_factory=dict, max_length=64)
    member: PeerMember | None = None


class PeerEnvRecoverResponse(BaseModel):
    index: int
    stage: str
    commitments: list[_Ed] = Field(default_factory=list, max_length=64)  # the app's sharing, as held here
    split: dict[_ShareIndexKey, _Ed] = Field(default_factory=dict, max_length=64)
    sum: str = Field(default="", pattern="^([0-9a-f]{64})?$")  # sum: τ_j, 32 bytes little-endian
    view_hash: str = Field(default="", pattern="^([0-9a-f]{64})?$")
    member: PeerMember | None = None


class PeerEnvPieceRequest(BaseModel):
    """Helper j asks helper i for its piece δ_{i,j} of a share recovery (same view of the table only)."""

    model_config = _STRICT

    session: _Session
    view_hash: _Hash
    member: PeerMember | None = None


class PeerEnvPieceResponse(BaseModel):
    session: str
    helper: int
    piece: _Ed
    member: PeerMember


class PeerEnvSignRequest(BaseModel):
    """Signature shares over the env public key's two dstack digests, which this member builds itself from
    its own sealed sharing of the app (legacy: no timestamp; v1: `timestamp`, within 60 s of its clock)."""

    model_config = _STRICT

    epoch: int = Field(ge=1, lt=1 << 32)
    app_id: _AppIdHex
    timestamp: int = Field(ge=0, lt=1 << 63)
    # two presignatures to sign with; none: a probe, answered with this member's unused presignatures
    sessions: list[_Session] = Field(min_length=0, max_length=2)
    member: PeerMember | None = None


class EnvSignShare(BaseModel):
    session: str
    big_r: str = Field(max_length=66)
    kinv_commitments: list[str] = Field(max_length=64)
    sigma_commitments: list[str] = Field(max_length=64)
    s: str = Field(pattern="^[0-9a-f]{64}$")


class PeerEnvSignResponse(BaseModel):
    index: int
    public_key: str
    shares: list[EnvSignShare] = Field(max_length=2)
    unused: list[str] = Field(default_factory=list, max_length=512)
    member: PeerMember


class EnvPeersRequest(BaseModel):
    """Admin: the public URL of every other member of this node's committee (env-key ceremonies)."""

    model_config = _STRICT

    peers: dict[_ShareIndexKey, str] = Field(max_length=64)
