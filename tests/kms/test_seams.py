"""The KMS's seams: only the Authorizer makes authorized objects, issuing takes nothing else, and the root
keys are reached only through a RootKeyHolder (a threshold holder plugs in here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from teecloud.kms.authz import AuthorizedApp, AuthorizedKms
from teecloud.kms.rootkeys import LocalRootKeys
from teecloud.kms.service import KmsService
from tests.kms.conftest import COMPOSE_V1, World, client_cert, make_app, make_kms, vm_config


def test_authorized_objects_cannot_be_forged(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1)
    _, der = client_cert(kms, app)
    peer = kms.service.attest(der)
    with pytest.raises(TypeError, match=r"only kms\.authz\.Authorizer"):
        AuthorizedApp(peer, None, "forged")
    with pytest.raises(TypeError, match=r"only kms\.authz\.Authorizer"):
        AuthorizedKms(peer, "forged")
    with pytest.raises(TypeError):
        kms.service.issuer.app_keys(peer)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        kms.service.issuer.kms_keys(peer)  # type: ignore[arg-type]


class CountingHolder(LocalRootKeys):
    def __init__(self, state: Any) -> None:
        super().__init__(state)
        self.calls: list[str] = []

    def derive_app_keys(self, app_id: bytes, instance_id: bytes, **kw: Any) -> Any:
        self.calls.append("derive")
        return super().derive_app_keys(app_id, instance_id, **kw)

    def sign_under_app_ca(self, app_id: bytes, instance_id: bytes, public_key: Any, **kw: Any) -> Any:
        self.calls.append("sign_under_app_ca")
        return super().sign_under_app_ca(app_id, instance_id, public_key, **kw)


def test_keys_come_from_the_injected_root_key_holder(teecloud_home: Path, world: World) -> None:
    base = make_kms(teecloud_home, world.chain)
    s = base.service
    holder = CountingHolder(s.state)
    service = KmsService(
        state=s.state,
        identity=s.identity,
        tee=s.tee,
        chain=world.chain,
        collateral=s.collateral,
        audit=s.audit,
        config=s.config,
        dev_root_der=s.dev_root_der,
        block_number=world.chain.block_number,
        os_image_reference=s.os_image_reference,
        root_keys=holder,
        challenges=s.challenges,
    )
    app = make_app(teecloud_home, world.register(COMPOSE_V1), COMPOSE_V1)
    _, der = client_cert(base, app)
    keys = service.get_app_key(der, vm_config=vm_config(app))
    assert holder.calls == ["derive"] and len(bytes.fromhex(keys.disk_crypt_key)) == 32
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))  # the KMS names the certificate after the attested app
        .sign(k, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    chain = service.sign_cert(der, csr, vm_config=vm_config(app)).certificate_chain
    assert holder.calls[-1] == "sign_under_app_ca" and len(chain) == 3


def test_no_root_key_holder_operation_returns_a_private_key(teecloud_home: Path, world: World) -> None:
    """The seam holds operations, not secrets: no RootKeyHolder member hands out the root's private keys;
    the whole-root export of single-KMS onboarding is a separate capability only LocalRootKeys has."""
    import inspect

    from teecloud.kms.rootkeys import RootKeyHolder, WholeRootExporter

    members = {n for n, _ in inspect.getmembers(RootKeyHolder) if not n.startswith("_")}
    assert members == {
        "ca_public_key_der",
        "k256_public_key",
        "root_ca_cert_pem",
        "derive_app_keys",
        "sign_under_app_ca",
        "env_encrypt_pubkey",
        "issue_server_identity",
    }
    kms = make_kms(teecloud_home, world.chain)
    assert not any(hasattr(kms.service.keys, n) for n in ("root", "ca_key", "k256_key", "app_ca"))
    assert isinstance(kms.service.keys, WholeRootExporter)
