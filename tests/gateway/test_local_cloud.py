"""Whole system: `teecloud up` (LocalCloud) starts a gateway; deploying examples/hello prints its https URL,
which a TLS client validating the data directory's dev CA fetches through HAProxy."""

from __future__ import annotations

import subprocess
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import HELLO, cloud, hello_image, session  # noqa: F401 (fixtures)


@pytest.mark.slow
@pytest.mark.docker
def test_deploy_hello_prints_an_https_url_that_serves(cloud: Any, session: Any) -> None:  # noqa: F811
    from teecloud.cloud.deploy import deploy

    gw = session.endpoints.gateway
    assert gw and gw["base_domain"] == "teecloud.localhost"
    r = deploy(session, HELLO / "docker-compose.yml", name="gw-hello")
    assert r.status == "running", r.error
    assert r.gateway_urls, "deploy printed no https URL"
    url = r.gateway_urls[0]
    host = url.split("//", 1)[1].split(":", 1)[0]
    assert host.startswith(f"{r.app_id}-") and host.endswith(".teecloud.localhost")
    # curl resolves *.localhost to loopback itself; --cacert is the data directory's dev CA
    out = subprocess.run(
        ["curl", "-sS", "--cacert", gw["ca_file"], url], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    direct = httpx.get(r.urls[0] + "/", timeout=10).text
    assert out.stdout == direct  # the same app, through the gateway
    # the route is one the node vouched for: the gateway requires the node's statement (NodeRegistry), the
    # instance_id commits to the node's operator, and the checker took a statement for this instance
    from teecloud.node.instance import instance_id_for
    from teecloud.node.vouch import launch_seed

    vouching = cloud.gateway.service.vouching
    assert vouching is not None
    inst = cloud.node.store.get(r.instance_id)
    operator = str(cloud.node.launcher)
    assert instance_id_for(launch_seed(operator, inst.launch_nonce()), inst.app_id).hex() == inst.instance_id
    assert vouching.newest(inst.instance_id) is not None
    assert "gateway" in r.timings
