"""The CLI reports teecloud errors as one line and exit status 1 (never a traceback); every command group is
registered by a plain import (a missing module fails loudly instead of silently dropping commands)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from teecloud.chain.errors import ChainError
from teecloud.cli import ErrorsToExit, app
from teecloud.errors import Error
from teecloud.kms.errors import AccessDenied


def test_a_teecloud_error_is_one_line_and_exit_1() -> None:
    demo = typer.Typer(cls=ErrorsToExit)

    @demo.command("boom")
    def boom(kind: str) -> None:
        raise {"chain": ChainError("the chain is unreachable"), "kms": AccessDenied("denied", step="chain")}[
            kind
        ]

    @demo.command("other")
    def other() -> None:
        raise RuntimeError("a bug")

    for kind, needle in (("chain", "the chain is unreachable"), ("kms", "denied")):
        r = CliRunner().invoke(demo, ["boom", kind])
        assert r.exit_code == 1, r.output
        assert needle in r.output and "Traceback" not in r.output
    bug = CliRunner().invoke(demo, ["other"])
    assert bug.exit_code == 1 and isinstance(bug.exception, RuntimeError)  # bugs are not hidden


def test_every_package_error_derives_from_the_one_base() -> None:
    from teecloud.agent.keyprovider import KeyProviderError
    from teecloud.attestation.errors import AttestationError
    from teecloud.collateral.errors import CollateralError
    from teecloud.keys.errors import KeysError
    from teecloud.kms.errors import KmsError
    from teecloud.node.errors import NodeError
    from teecloud.peer import PeerRejected
    from teecloud.tee.errors import TeeError

    for cls in (AttestationError, CollateralError, TeeError, KeysError, ChainError, PeerRejected, KmsError):
        assert issubclass(cls, Error), cls
    assert issubclass(KeyProviderError, Error) and issubclass(NodeError, Error)


def test_every_command_group_is_registered() -> None:
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for group in ("verify", "up", "deploy", "tee", "agent", "kms", "chain", "app", "node", "version"):
        assert f" {group} " in r.output, group


def test_trust_list_has_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every listing has --json (issue 17): trust list too, empty or not."""
    import json

    monkeypatch.setenv("TEECLOUD_HOME", str(tmp_path))
    r = CliRunner().invoke(app, ["trust", "list", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == []
    (tmp_path / "trust").mkdir(parents=True)
    (tmp_path / "trust" / "junk.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    )
    r = CliRunner().invoke(app, ["trust", "list", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert rows and rows[0]["file"] == "junk.pem" and "unreadable" in rows[0]["error"]
