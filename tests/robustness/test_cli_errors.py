"""`teecloud` given bad input prints a clear error and exits non-zero, never a traceback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from teecloud.agent.boot import normalize_app_compose
from teecloud.cli import app
from teecloud.node.api import NodeClient
from teecloud.node.service import Node, NodeServer
from teecloud.tee.simulated import SimulatedTdx
from tests.robustness.test_node_api import _NoKeys


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin1.yml").write_bytes(b"services:\n  a:\n    image: caf\xe9\n")  # not UTF-8
    (tmp_path / "deep.yml").write_text("services: {a: " + "[" * 20_000 + "]" * 20_000 + "}")
    (tmp_path / "noservices.yml").write_text("version: '3'\n")
    (tmp_path / "quote.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "dir").mkdir()
    return tmp_path


def _check(result: Any, code: int | None = None, needle: str = "") -> None:
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out, out
    assert result.exit_code != 0, out
    if code is not None:
        assert result.exit_code == code, out
    assert needle in out, out


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


CASES = [
    # (args, exit code, text the message must contain); {d} = the files fixture
    (["tee", "quote", "--report-data", "zz"], 2, "must be hex"),
    (["tee", "quote", "--report-data", "00" * 65], 2, "at most 64 bytes"),
    (
        ["tee", "quote", "--report-data", "00", "--out", "{d}/dir", "--tee", "simulated"],
        2,
        "cannot write",
    ),  # was IsADirectoryError
    (["tee", "quote", "--report-data", "00", "--tee", "bogus"], 2, "--tee must be"),
    (["tee", "emit-event", "a:b", "00", "--tee", "simulated"], 2, "must not contain ':'"),
    (["tee", "emit-event", "x", "0", "--tee", "simulated"], 2, "must be hex"),
    (["tee", "dev-root", "--export", "{d}/bad.json"], 2, "not a directory"),
    (["tee", "dev-root", "--export", "/proc/teecloud-nope"], 2, "cannot write"),  # was FileNotFoundError
    (["agent", "simulate", "--compose", "{d}/nope.json"], 1, "cannot read"),
    (["agent", "simulate", "--compose", "{d}/dir"], 1, "cannot read"),
    (["agent", "simulate", "--compose", "{d}/latin1.yml"], 1, "cannot read"),
    (["agent", "simulate", "--compose", "{d}/bad.json"], 1, "not valid UTF-8 JSON"),
    (["agent", "simulate", "--compose", "{d}/deep.json"], 1, "nests deeper"),  # was RecursionError
    (["agent", "simulate", "--compose", "{d}/list.json"], 1, "JSON object"),
    (["agent", "simulate", "--compose", "{d}/list.json", "--app-id", "zz"], 2, "--app-id must be hex"),
    (["agent", "simulate", "--compose", "{d}/list.json", "--port", "70000"], 2, "--port"),
    (["verify", "{d}/nope"], 2, "cannot read evidence"),
    (["verify", "{d}/dir"], 2, "cannot read evidence"),
    (["verify"], 2, "missing EVIDENCE"),
    (["verify", "{d}/quote.bin", "--at", "yesterday"], 2, "ISO 8601"),
    (["verify", "{d}/quote.bin", "--at", "2025-13-40T00:00:00Z"], 2, "ISO 8601"),
    (["verify", "{d}/quote.bin", "--kind", "bogus"], 2, "unknown kind"),
    (["verify", "{d}/quote.bin", "--policy", "{d}/nope.toml"], 2, "cannot read policy"),
    (["verify", "{d}/quote.bin", "--policy", "{d}/bad.json"], 2, "policy"),
    (["verify", "{d}/quote.bin", "--collateral", "{d}/nope"], 2, "cannot read collateral"),
    (["verify", "{d}/quote.bin", "--trust-anchor", "{d}/bad.json"], 2, "not a certificate"),
    (["verify", "{d}/quote.bin", "--cert-chain", "{d}/dir"], 2, "cannot read certificate chain"),
    (["verify", "{d}/quote.bin"], 1, "unrecognised evidence format"),  # rejected, exit 1, no traceback
    # compose files are checked before the cloud is contacted (were "no local cloud is running" first)
    (["deploy", "{d}/nope.yml"], 2, "cannot read"),
    (["deploy", "{d}/dir"], 2, "cannot read"),
    (["deploy", "{d}/latin1.yml"], 2, "not UTF-8"),
    (["deploy", "{d}/bad.json"], 2, "not valid YAML"),
    (["deploy", "{d}/deep.yml"], 2, "nests deeper than 64"),  # was RecursionError
    (["deploy", "{d}/noservices.yml"], 2, "no `services`"),
    (["upgrade", "app", "{d}/nope.yml"], 2, "cannot read"),
    (["upgrade", "app", "{d}/deep.yml"], 2, "nests deeper than 64"),
    # no local cloud running
    (["ps"], 1, "no local cloud is running"),
    (["logs", "app"], 1, "no local cloud is running"),
    (["verify", "--app", "app"], 1, "no local cloud is running"),
]


@pytest.mark.parametrize(("args", "code", "needle"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_a_clear_error(files: Path, args: list[str], code: int, needle: str) -> None:
    _check(run(*(a.replace("{d}", str(files)) for a in args)), code, needle)


def test_unreadable_compose_file(files: Path) -> None:
    path = files / "secret.yml"
    path.write_text("services:\n  a:\n    image: x\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads anything: make it unreadable another way
            path.chmod(0o644)
            path.unlink()
            path.symlink_to(path)  # a symlink loop: ELOOP on open
        _check(run("deploy", str(path)), 2, "cannot read")
        _check(run("agent", "simulate", "--compose", str(path)), 1, "cannot read")
    finally:
        path.unlink(missing_ok=True)


# -- against a node that has no such app -------------------------------------------------------------------


@pytest.fixture
def session(teecloud_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    node = Node(key_provider=_NoKeys(), tee_factory=lambda: SimulatedTdx(teecloud_home), home=teecloud_home)
    server = NodeServer(node, token="t0ken").start()
    client = NodeClient(server.url, "t0ken")
    stub = SimpleNamespace(node=client, chain=None, platform=SimulatedTdx(teecloud_home))
    monkeypatch.setattr("teecloud.cli.cloud_cmd._session", lambda: stub)
    try:
        yield stub
    finally:
        client.close()
        server.stop()


@pytest.mark.parametrize(
    "args",
    [
        ["logs", "no-such-app"],
        ["stop", "no-such-app"],
        ["start", "no-such-app"],
        ["rm", "no-such-app", "--yes"],
        ["cvm", "status", "no-such-app"],
        ["cvm", "stats", "no-such-app"],
        ["cvm", "restart", "no-such-app"],
    ],
)
def test_non_existent_app(session: Any, args: list[str]) -> None:
    _check(run(*args), 1, "no CVM 'no-such-app'")


def test_attest_non_existent_app(session: Any) -> None:
    r = run("attest", "no-such-app")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "no CVM 'no-such-app'" in r.output and "NOT attested" in r.output


def test_upgrade_non_existent_app(session: Any, files: Path) -> None:
    compose = files / "ok.yml"
    compose.write_text("services:\n  a:\n    image: x\n")
    _check(run("upgrade", "no-such-app", str(compose)), 1, "no-such-app")


def test_deploy_unsupported_compose_via_node(session: Any) -> None:
    # the node's own refusal reaches the user as a message, too
    text = normalize_app_compose({"name": "x", "runner": "bash", "docker_compose_file": "services: {}"})
    from teecloud.node.api import CreateCvmRequest, NodeApiError

    with pytest.raises(NodeApiError) as info:
        session.node.create(CreateCvmRequest(name="x", app_compose=text, app_id="11" * 20))
    assert info.value.status == 400 and "runner" in str(info.value)
    assert session.node.list_cvms() == []
