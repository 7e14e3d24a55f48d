"""Whole system: `teecloud up` (LocalCloud) records the gateway's app as KmsAuth's gateway_app_id, and the
gateway's public certificate key checks out (`teecloud gateway check-cert --app-id <gateway_app_id>`) against
the quote it publishes, made in its simulated TEE booted as that app through the KMS. Its keys are derived
from the app keys the KMS released at that boot: a restarted cloud has the same CA and keys; a gateway app
the chain does not allow gets no keys from the KMS and no gateway serves TLS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from teecloud.gateway.kmskeys import PUBLIC


@pytest.mark.slow
@pytest.mark.docker
def test_local_cloud_gateway_key_is_quoted_in_the_gateway_app(teecloud_home: Path) -> None:
    from teecloud.cli import app
    from teecloud.devstack import LocalCloud
    from teecloud.gateway.certkeys import CERT_KEYS_PATH
    from teecloud.gateway.identity import gateway_compose_hash, register_gateway_app

    cloud = LocalCloud(teecloud_home)
    endpoints = cloud.start()
    try:
        gw = endpoints.gateway
        assert gw, "no gateway started"
        app_id = gw["app_id"]
        assert cloud.chain.kms.info().gateway_app_id == app_id
        assert register_gateway_app(cloud.chain) == app_id  # a restart keeps it
        # the gateway's TEE booted as that app through the KMS, which knows it as its gateway_app_id
        assert cloud.gateway_boot is not None
        assert cloud.gateway_boot.keys.gateway_app_id.lower() == app_id.lower()
        args = ["gateway", "check-cert", f"127.0.0.1:{gw['public_port']}", "--server-name"]
        args += [f"x.{gw['base_domain']}", "--keys", gw["cert_keys"], "--trust-dev-root", "--json"]
        ok = CliRunner().invoke(app, [*args, "--app-id", app_id])
        assert ok.exit_code == 0, ok.output
        verdict = json.loads(ok.stdout.strip().splitlines()[-1])
        assert verdict["role"] == "public" and verdict["simulated"] is True
        assert verdict["compose_hash"] == gateway_compose_hash().hex()
        other = CliRunner().invoke(app, [*args, "--app-id", "22" * 20])
        assert other.exit_code == 1
        # by default the document comes from the public port itself (the base domain's apex)
        assert gw["cert_keys_public"].endswith(f"{gw['base_domain']}:{gw['public_port']}{CERT_KEYS_PATH}")
        apex = ["gateway", "check-cert", f"127.0.0.1:{gw['public_port']}", "--server-name"]
        apex += [gw["base_domain"], "--trust-dev-root", "--json", "--app-id", app_id]
        default = CliRunner().invoke(app, apex)
        assert default.exit_code == 0, default.output
        assert json.loads(default.stdout.strip().splitlines()[-1])["role"] == "public"
        assert verdict["key_origin"] == f"kms:{PUBLIC}"
        # the KMS signature chain over the same key, checked under the KMS root and gateway_app_id that
        # KmsAuth records (read from the chain, not from the gateway)
        chained = ["gateway", "check-keys", f"127.0.0.1:{gw['public_port']}", "--server-name"]
        chained += [
            f"x.{gw['base_domain']}",
            "--base-domain",
            gw["base_domain"],
            "--rpc-url",
            endpoints.chain_rpc,
        ]
        chained += ["--json"]
        signed = CliRunner().invoke(app, [*chained, "--domain", gw["base_domain"]])
        assert signed.exit_code == 0, signed.output
        signed_verdict = json.loads(signed.stdout.strip().splitlines()[-1])
        assert signed_verdict["app_id"] == app_id.lower().removeprefix("0x")
        assert signed_verdict["spki_sha256"] == verdict["spki_sha256"]
        assert CliRunner().invoke(app, [*chained, "--domain", "other.localhost"]).exit_code == 1
        first = (Path(gw["ca_file"]).read_text(), _presented_spki(gw))
    finally:
        cloud.stop()
    # a restart: a new boot of the gateway app, the same keys from the KMS, the same CA and public key
    cloud = LocalCloud(teecloud_home)
    endpoints = cloud.start()
    try:
        gw = endpoints.gateway
        assert gw["app_id"] == app_id
        assert (Path(gw["ca_file"]).read_text(), _presented_spki(gw)) == first
    finally:
        cloud.stop()


def _presented_spki(gw: dict[str, Any]) -> bytes:
    from teecloud.gateway.certkeys import presented_cert

    der = presented_cert("127.0.0.1", gw["public_port"], server_name=f"x.{gw['base_domain']}")
    return (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.mark.slow
@pytest.mark.docker
def test_gateway_not_allowed_on_chain_gets_no_keys(
    teecloud_home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The attacker's (or a mistaken operator's) step: record as gateway_app_id an app whose AppAuth does not
    allow the gateway's compose hash. The KMS refuses the gateway's boot key request; no keys, no gateway."""
    import hashlib

    import teecloud.gateway.identity as identity
    from teecloud.devstack import LocalCloud

    def not_allowed(chain: Any) -> str:
        app_id = str(chain.register_app(None, hashlib.sha256(b"some other code").digest()))
        chain.set_gateway_app_id(app_id)
        return app_id

    monkeypatch.setattr(identity, "register_gateway_app", not_allowed)
    cloud = LocalCloud(teecloud_home)
    with caplog.at_level("WARNING", logger="teecloud"):
        endpoints = cloud.start()
    try:
        assert endpoints.gateway == {}
        assert cloud.gateway is None and cloud.gateway_boot is None
        assert any("no gateway: its TEE did not boot" in r.getMessage() for r in caplog.records)
        assert not (teecloud_home / "gateway" / "ca.pem").exists()
    finally:
        cloud.stop()
