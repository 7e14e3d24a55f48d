"""`teecloud gateway up`: a stand-alone gateway with the gateway options of `teecloud up`, declared once
(cli/_gateway_options.py) and parsed once (AcmeSettings.parse): bad options fail the same way on both
command lines before anything starts; with pebble's directory the stand-alone gateway serves pebble's
certificate on its public port and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teecloud.cli import app as cli_app

from .bind_server import Bind
from .pebble import Pebble, free_port

BASE = "gw.teecloud.test"
ACME_OPTIONS = (
    "--acme-directory",
    "--acme-dns",
    "--acme-dns-server",
    "--acme-tsig-key-file",
    "--acme-ca-file",
    "--acme-email",
    "--gateway-dns",
)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--acme-directory", "ftp://ca.example/dir"], "not an https:// URL"),
        (["--acme-directory", "https:///dir"], "not an https:// URL"),
        (["--acme-directory", "https://ca.example/d", "--acme-dns", "ns.example:53"], "not an IP"),
        (
            ["--acme-directory", "https://ca.example/d", "--acme-ca-file", "/nonexistent.pem"],
            "not a readable",
        ),
        (["--acme-directory", "https://ca.example/d", "--acme-email", "no at sign"], "not an e-mail"),
        (["--gateway-dns", "resolver.example"], "not an IP"),
        (["--acme-directory", "https://ca.example/d", "--acme-dns", "rfc2136"], "needs --acme-dns-server"),
        (
            ["--acme-directory", "https://ca.example/d", "--acme-dns-server", "127.0.0.1"],
            "go with --acme-dns rfc2136",
        ),
        (
            [
                "--acme-directory",
                "https://ca.example/d",
                "--acme-dns",
                "rfc2136",
                "--acme-dns-server",
                "ns.example",
                "--acme-tsig-key-file",
                "/nonexistent.key",
            ],
            "not an IP",
        ),
        (
            [
                "--acme-directory",
                "https://ca.example/d",
                "--acme-dns",
                "rfc2136",
                "--acme-dns-server",
                "127.0.0.1",
                "--acme-tsig-key-file",
                "/nonexistent.key",
            ],
            "TSIG key file",
        ),
    ],
)
@pytest.mark.parametrize("command", [["up"], ["gateway", "up", "--trust-dev-root"]])
def test_bad_gateway_options_fail_alike_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], extra: list[str], message: str
) -> None:
    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path))
    result = CliRunner().invoke(cli_app, [*command, *extra])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "gateway-server").exists() and not (tmp_path / "gateway").exists()


def test_both_commands_declare_the_same_gateway_options() -> None:
    import typer.main

    root = typer.main.get_command(cli_app)

    def options(cmd: object) -> dict[str, tuple[object, object]]:
        return {
            p.opts[0]: (p.default, getattr(p, "help", None))
            for p in cmd.params  # type: ignore[attr-defined]
            if p.opts and p.opts[0] in ACME_OPTIONS
        }

    up = options(root.commands["up"])  # type: ignore[attr-defined]
    gw = options(root.commands["gateway"].commands["up"])  # type: ignore[attr-defined]
    assert set(up) == set(ACME_OPTIONS) and up == gw


def test_kms_url_needs_the_simulated_tee_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path))
    result = CliRunner().invoke(
        cli_app, ["gateway", "up", "--pccs-url", "https://p", "--kms-url", "https://k"]
    )
    assert result.exit_code == 2 and "--trust-dev-root" in result.output


def test_no_passthrough_refuses_custom_domains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path))
    args = ["gateway", "up", "--trust-dev-root", "--no-passthrough", "--gateway-dns", "127.0.0.1:53"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2 and "--no-passthrough" in result.output and "custom domains" in result.output


# ---------------------------------------------------------------------------------------- a running one


@pytest.fixture
def chain_rpc(tmp_path: Path) -> Iterator[str]:
    from teecloud.chain.client import ChainClient, HttpTransport
    from teecloud.chain.embedded import DEV_KEYS, EmbeddedChain
    from teecloud.chain.rpcserver import ChainRpcServer

    embedded = EmbeddedChain(tmp_path / "chain")
    rpc = ChainRpcServer(embedded).start()
    ChainClient(HttpTransport(rpc.url), DEV_KEYS[0], home=tmp_path).deploy()
    yield rpc.url
    rpc.stop()
    embedded.close()


def _tls_ready(port: int, ca_pem: str, deadline: float) -> ssl.SSLSocket | None:
    ctx = ssl.create_default_context(cadata=ca_pem)
    while time.monotonic() < deadline:
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            time.sleep(0.3)
            continue
        return ctx.wrap_socket(raw, server_hostname=f"{'ab' * 20}-8080.{BASE}")
    return None


@pytest.mark.slow
@pytest.mark.parametrize("dns_mode", ["local", "rfc2136"])
def test_standalone_gateway_serves_the_acme_certificate(
    tmp_path: Path, chain_rpc: str, dns_mode: str
) -> None:
    """With the gateway's own challenge DNS server, and with RFC 2136 updates to a real BIND9 named that
    pebble resolves through."""
    bind = Bind(tmp_path / "bind", BASE) if dns_mode == "rfc2136" else None
    dns_port = bind.port if bind is not None else free_port()
    (tmp_path / "pebble").mkdir()
    pebble = Pebble(tmp_path / "pebble", dns_port)
    port = free_port()
    env = {**os.environ, "TEECLOUD_HOME": str(tmp_path / "home")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2] / "src"), env.get("PYTHONPATH", "")]
    )
    code = "import sys; from teecloud.cli import main; sys.argv[0] = 'teecloud'; main()"
    args = ["gateway", "up", "--rpc-url", chain_rpc, "--trust-dev-root", "--base-domain", BASE]
    args += ["--port", str(port), "--data-dir", str(tmp_path / "gw")]
    args += ["--acme-directory", pebble.directory_url]
    if bind is not None:
        args += ["--acme-dns", "rfc2136", "--acme-dns-server", f"127.0.0.1:{bind.port}"]
        args += ["--acme-tsig-key-file", str(bind.key_file)]
    else:
        args += ["--acme-dns", f"127.0.0.1:{dns_port}"]
    args += ["--acme-ca-file", pebble.ca_bundle]
    log = (tmp_path / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        tls = _tls_ready(port, pebble.root_pem(), time.monotonic() + 90)
        assert tls is not None, (tmp_path / "gateway.log").read_text()[-3000:]
        tls.close()  # the public certificate validates to pebble's root for an app name
        assert (tmp_path / "gw" / "acme" / "certificate.pem").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "gateway stopped" in (tmp_path / "gateway.log").read_text()
        if bind is not None:  # named took the challenge records (and they were removed after)
            named_log = (bind.workdir / "named.log").read_text()
            assert f"updating zone '{BASE}/IN': adding an RR at '_acme-challenge.{BASE}' TXT" in named_log
            assert f"updating zone '{BASE}/IN': deleting an RR at _acme-challenge.{BASE} TXT" in named_log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if bind is not None:
            bind.stop()
        log.close()
        pebble.stop()
