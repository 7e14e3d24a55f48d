"""Whole system: `teecloud up` (LocalCloud) records the gateway's app as KmsAuth's gateway_app_id, and the
gateway's public certificate key checks out (`teecloud gateway check-cert --app-id <gateway_app_id>`) against
the quote it publishes, made in its simulated TEE booted as that app through the KMS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner


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
    finally:
        cloud.stop()
