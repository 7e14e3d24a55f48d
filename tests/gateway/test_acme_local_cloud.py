"""`teecloud up --acme-directory`: the local cloud's gateway gets its base domain's wildcard from a real
ACME CA (pebble, 127.0.0.1) by DNS-01 through the gateway's own challenge DNS server (dnslib), and an app
deployed there is fetched through HAProxy by a TLS client that trusts pebble's root only. Bad URLs and an
unreachable CA are clear errors, with no traceback and nothing left running."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from teecloud.cli import app as cli_app
from teecloud.cloud.endpoints import endpoints_path
from teecloud.gateway.acme import AcmeError
from teecloud.node.errors import NodeError
from tests.e2e.conftest import HELLO, _fail_or_skip, hello_image

from .pebble import Pebble, free_port

__all__ = ["hello_image"]


@pytest.fixture(scope="module")
def pebble_dns_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory, pebble_dns_port: int) -> Iterator[Pebble]:
    # pebble asks the gateway's challenge DNS server, which the cloud starts at this address
    p = Pebble(tmp_path_factory.mktemp("pebble-up"), pebble_dns_port)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def acme_cloud(
    hello_image: str,
    pebble: Pebble,
    pebble_dns_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    from teecloud.devstack import LocalCloud, check_prerequisites

    missing = check_prerequisites()
    if missing:
        _fail_or_skip("; ".join(missing))
    c = LocalCloud(
        tmp_path_factory.mktemp("acme-up-home"),
        acme_directory=pebble.directory_url,
        acme_dns=f"127.0.0.1:{pebble_dns_port}",
        acme_ca_file=Path(pebble.ca_bundle),
    )
    c.start()
    yield c
    try:
        for inst in c.node.store.all():
            c.node.remove(inst.instance_id)
    finally:
        c.stop()


@pytest.mark.slow
@pytest.mark.docker
def test_app_served_under_the_acme_certificate(
    acme_cloud: Any, pebble: Pebble, monkeypatch: pytest.MonkeyPatch
) -> None:
    from teecloud.cloud.deploy import Session, deploy

    gw = acme_cloud.endpoints.gateway
    assert gw["certificate"] == "acme" and gw["acme_directory"] == pebble.directory_url
    session = Session(acme_cloud.home)
    try:
        r = deploy(session, HELLO / "docker-compose.yml", name="acme-hello")
    finally:
        session.close()
    assert r.status == "running", r.error
    host = r.gateway_urls[0].split("//", 1)[1].split(":", 1)[0]
    # a client trusting pebble's issuing root only (not the dev CA) validates the gateway's certificate
    trust = ssl.create_default_context(cadata=pebble.root_pem())
    with httpx.Client(verify=trust, timeout=10) as http:
        through = http.get(
            f"https://127.0.0.1:{gw['public_port']}/",
            headers={"Host": host},
            extensions={"sni_hostname": host},
        )
    assert through.status_code == 200
    assert through.text == httpx.get(r.urls[0] + "/", timeout=10).text
    # ... and not the dev CA: the public certificate is not the dev CA's
    dev = ssl.create_default_context(cafile=gw["ca_file"])
    with httpx.Client(verify=dev, timeout=10) as http, pytest.raises(httpx.ConnectError):
        http.get(
            f"https://127.0.0.1:{gw['public_port']}/",
            headers={"Host": host},
            extensions={"sni_hostname": host},
        )
    # the certificate and account are under the gateway's data directory, renewal is the gateway's tick
    assert acme_cloud.gateway.acme is not None
    assert (acme_cloud.home / "gateway" / "acme" / "certificate.pem").is_file()
    assert acme_cloud.gateway.acme.status()["failures"] == 0
    # the ACME key's quote is published on the public port: check-cert finds it there by default
    monkeypatch.setenv("TEECLOUD_HOME", str(acme_cloud.home))  # --trust-dev-root: this cloud's dev root
    args = ["gateway", "check-cert", f"127.0.0.1:{gw['public_port']}", "--server-name", gw["base_domain"]]
    ok = CliRunner().invoke(cli_app, [*args, "--trust-dev-root", "--json", "--app-id", gw["app_id"]])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.strip().splitlines()[-1])["role"] == "public"


@pytest.mark.slow
def test_unreachable_ca_stops_up_cleanly(tmp_path: Path) -> None:
    from teecloud.devstack import LocalCloud
    from teecloud.gateway.driver import find_haproxy

    find_haproxy()  # scripts/setup.sh installs it; without it the error is "ACME needs the gateway"
    c = LocalCloud(
        tmp_path, acme_directory=f"https://127.0.0.1:{free_port()}/dir", acme_dns=f"127.0.0.1:{free_port()}"
    )
    with pytest.raises(AcmeError, match="cannot reach the ACME server"):
        c.start(check=False)
    assert not endpoints_path(tmp_path).exists()  # nothing announced, everything stopped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"acme_directory": "http://ca.example/dir"}, "not an https:// URL"),
        ({"acme_directory": "https:///dir"}, "not an https:// URL"),
        (
            {"acme_directory": "https://ca.example/dir", "acme_dns": "ns.example:53"},
            "ACME DNS-01 server .*not an IP",
        ),
        ({"acme_directory": "https://ca.example/dir", "acme_ca_file": Path("/nonexistent.pem")}, "not a"),
    ],
)
def test_bad_acme_options_fail_before_anything_starts(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    from teecloud.devstack import LocalCloud

    with pytest.raises(NodeError, match=message):
        LocalCloud(tmp_path, **kwargs)


def test_up_with_a_bad_acme_url_is_a_clear_cli_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path))
    result = CliRunner().invoke(cli_app, ["up", "--acme-directory", "ftp://ca.example/dir"])
    assert result.exit_code == 1
    assert "not an https:// URL" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # typer's exit, not an escaped exception
