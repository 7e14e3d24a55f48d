"""Instance retirement under governance, from the CLI, and as `teecloud rm` drives it (cloud.deploy)."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

from teecloud.chain import DEV_KEYS, ChainClient, ContractReverted
from teecloud.cloud.deploy import retire_instance

from .helpers import OS_IMAGE, boot_info, rand32
from .test_cli import run

INSTANCE = "0x" + "3c" * 20


def _instance_boot(app_id: str, h: bytes) -> object:
    return boot_info(app_id, h, instance_id=bytes.fromhex(INSTANCE[2:]))


def test_retire_through_a_multisig(chain: ChainClient) -> None:
    a, b, _c = (chain.with_signer(k) for k in chain.keys[:3])  # type: ignore[attr-defined]
    ms = chain.deploy_multisig([a.address, b.address, _c.address], 2)
    chain.add_os_image(OS_IMAGE)
    h = rand32()
    app_id = chain.register_app(ms, h)
    with pytest.raises(ContractReverted, match="caller is not the owner"):
        a.retire_instance(app_id, INSTANCE)  # one owner of the multisig alone cannot
    res = a.propose_app_change(app_id, "retire_instance", INSTANCE)
    assert res["kind"] == "multisig"
    assert chain.is_app_allowed(_instance_boot(app_id, h)) == (True, "")  # type: ignore[arg-type]
    b.multisig_approve(ms, res["id"])
    a.multisig_execute(ms, res["id"])
    assert chain.is_app_allowed(_instance_boot(app_id, h)) == (False, "instance retired")  # type: ignore[arg-type]


def test_rm_retires_when_the_signer_owns_the_app(teecloud_home: Path) -> None:
    with ChainClient.embedded(teecloud_home) as c:
        c.deploy()
        c.add_os_image(OS_IMAGE)
        h = rand32()
        app_id = c.register_app(None, h)
        session = types.SimpleNamespace(chain=c)  # retire_instance uses only the session's chain client
        r = retire_instance(session, app_id, INSTANCE[2:])  # type: ignore[arg-type]
        assert r.retired and re.fullmatch(r"retired on chain in block \d+", r.detail), r
        assert c.is_app_allowed(_instance_boot(app_id, h)) == (False, "instance retired")  # type: ignore[arg-type]
        again = retire_instance(session, app_id, INSTANCE[2:])  # type: ignore[arg-type]
        assert again.retired and again.detail == "already retired on chain"


@pytest.mark.parametrize("owner", ["multisig", "timelock", "other account"])
def test_rm_does_not_claim_retirement_it_cannot_make(teecloud_home: Path, owner: str) -> None:
    with ChainClient.embedded(teecloud_home) as c:
        c.deploy()
        c.add_os_image(OS_IMAGE)
        other = c.with_signer(DEV_KEYS[1]).address
        gov = {
            "multisig": lambda: c.deploy_multisig([c.address, other], 2),
            "timelock": lambda: c.deploy_timelock(c.address, 3600),
            "other account": lambda: other,
        }[owner]()
        h = rand32()
        app_id = c.register_app(gov, h)
        head = c.block_number()
        r = retire_instance(types.SimpleNamespace(chain=c), app_id, INSTANCE)  # type: ignore[arg-type]
        assert not r.retired
        assert "governance proposal" in r.detail and f"teecloud app retire-instance {app_id}" in r.detail
        assert c.block_number() == head  # nothing was sent
        assert c.is_app_allowed(_instance_boot(app_id, h)) == (True, "")  # type: ignore[arg-type]


def test_cli_retire_instance(tmp_path: Path) -> None:
    import json

    f = tmp_path / "app-compose.json"
    f.write_text(json.dumps({"name": "demo", "runner": "docker-compose", "docker_compose_file": "x"}))
    run("chain", "deploy")
    out = run("app", "register", str(f))
    app_id = re.search(r"app_id: (0x[0-9a-fA-F]{40})", out).group(1)  # type: ignore[union-attr]
    assert "must be 20 bytes" in run("app", "retire-instance", app_id, "0x1234", ok=False)
    assert "instance retired" in run("app", "retire-instance", app_id, INSTANCE[2:])
    assert "already retired" in run("app", "retire-instance", app_id, INSTANCE)
    shown = run("app", "show", app_id)
    assert "retired instances" in shown and INSTANCE[2:] in shown.lower()
    state = json.loads(run("app", "show", app_id, "--json"))
    assert [i.lower() for i in state["retired_instances"]] == [INSTANCE]
    # under a 2-of-2 multisig the CLI makes a proposal, and says the instance is not retired yet
    a1 = "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF"  # DEV_KEYS[1]
    out = run("app", "register", str(f), "--multisig", f"0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf,{a1}",
              "--threshold", "2")  # fmt: skip
    ms_app = re.search(r"app_id: (0x[0-9a-fA-F]{40})", out).group(1)  # type: ignore[union-attr]
    out = run("app", "retire-instance", ms_app, INSTANCE)
    assert "proposal 0 in multisig" in out and "until this change is executed" in out


class _Node:
    """The node side of `teecloud rm` (the chain side is real): one CVM, removed when asked."""

    def __init__(self, app_id: str, instance_id: str) -> None:
        self.st = types.SimpleNamespace(
            name="hello", instance_id=instance_id, app_id=app_id.removeprefix("0x")
        )
        self.removed: list[str] = []

    def get(self, ref: str) -> object:
        return self.st

    def remove(self, instance_id: str) -> object:
        self.removed.append(instance_id)
        return types.SimpleNamespace(removed=instance_id, leftovers=[])


@pytest.mark.parametrize("governed", [False, True])
def test_cli_rm_retires_or_says_it_did_not(
    teecloud_home: Path, monkeypatch: pytest.MonkeyPatch, governed: bool
) -> None:
    from typer.testing import CliRunner

    from teecloud.cli import app as cli
    from teecloud.cli import cloud_cmd

    with ChainClient.embedded(teecloud_home) as c:
        c.deploy()
        c.add_os_image(OS_IMAGE)
        h = rand32()
        owner = c.deploy_multisig([c.address, c.with_signer(DEV_KEYS[1]).address], 2) if governed else None
        app_id = c.register_app(owner, h)
        node = _Node(app_id, INSTANCE[2:])
        monkeypatch.setattr(
            cloud_cmd, "_session", lambda: types.SimpleNamespace(node=node, chain=c, home=teecloud_home)
        )
        r = CliRunner().invoke(cli, ["rm", "hello", "--yes"])
        assert r.exit_code == 0, r.output
        assert node.removed == [INSTANCE[2:]]
        allowed = c.is_app_allowed(_instance_boot(app_id, h))  # type: ignore[arg-type]
        if governed:
            assert allowed == (True, "")
            assert "NOT retired on chain" in r.output and "governance proposal" in r.output
            assert "can no longer be decrypted" not in r.output and "unrecoverable" not in r.output
        else:
            assert allowed == (False, "instance retired")
            assert "retired on chain in block" in r.output and "no KMS releases its keys again" in r.output
