"""`teecloud upgrade APP --commit` without the compose file: the plan of a pending upgrade is stored
(atomically, keyed by app, under the data directory) and rolled out as it was approved; a damaged plan is
refused before anything reaches the node. Embedded chain, the recording node of test_upgrade_flow."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from teecloud.chain import ChainClient
from teecloud.cli import app as cli_app
from teecloud.cloud.deploy import upgrade
from teecloud.cloud.errors import DeployError, InvalidOption
from teecloud.cloud.options import AppOptions
from teecloud.cloud.pending import load_plan, plan_path
from tests.cloud.test_upgrade_flow import V2, RecordingNode, _app


@pytest.fixture
def chain(teecloud_home: Path) -> Iterator[ChainClient]:
    with ChainClient.embedded(teecloud_home) as c:
        c.deploy()
        yield c


def _pending(chain: ChainClient, tmp_path: Path, delay: int = 3600) -> tuple[str, RecordingNode, Any, Path]:
    v2 = tmp_path / "v2.yml"
    v2.write_text(V2)
    assert chain.address is not None
    tl = chain.deploy_timelock(chain.address, delay)
    app_id, node, session = _app(chain, tl, ["DB"])
    r = upgrade(session, "shop", v2, AppOptions.build(), verify=False)
    assert r.status == "pending"
    return app_id, node, session, v2


def test_commit_without_the_file_rolls_out_the_stored_plan(
    chain: ChainClient, tmp_path: Path, teecloud_home: Path
) -> None:
    app_id, node, session, v2 = _pending(chain, tmp_path)
    path = plan_path(app_id)
    assert path.parent == teecloud_home / "pending-upgrades" and path.is_file()
    assert path.stat().st_mode & 0o077 == 0  # the data directory's files are the user's only
    plan = load_plan(app_id)
    assert plan is not None and json.loads(plan.app_compose)["docker_compose_file"] == V2
    v2.unlink()  # the file is gone: the plan is all that is left
    # before the ETA: still pending, nothing reaches the node, the plan stays
    r = upgrade(session, "shop", None, AppOptions.build(), commit=True, verify=False)
    assert r.status == "pending" and node.upgrades() == [] and path.is_file()
    assert r.compose_hash == plan.compose_hash.hex()
    chain.increase_time(3601)
    r = upgrade(session, "shop", None, AppOptions.build(), commit=True, verify=False)
    assert r.status == "running" and [d for d in r.done if d.startswith("executed timelock")]
    (sent,) = node.upgrades()
    assert sent["docker_compose_file"] == V2 and sent["allowed_envs"] == ["DB"]
    assert r.compose_hash == plan.compose_hash.hex() and not path.exists()  # rolled out: no longer pending
    with pytest.raises(DeployError, match="no pending upgrade of shop is stored"):
        upgrade(session, "shop", None, AppOptions.build(), commit=True, verify=False)


def test_a_damaged_plan_is_refused_before_the_node(chain: ChainClient, tmp_path: Path) -> None:
    app_id, node, session, _ = _pending(chain, tmp_path, delay=60)
    chain.increase_time(61)
    path = plan_path(app_id)
    doc = json.loads(path.read_text())
    doc["app_compose"] = doc["app_compose"].replace("V=2", "V=3")  # not the approved app-compose.json
    path.write_text(json.dumps(doc))
    with pytest.raises(DeployError, match=r"damaged.*does not hash to its compose hash"):
        upgrade(session, "shop", None, AppOptions.build(), commit=True, verify=False)
    for broken, why in (("{", "JSONDecodeError"), ("[]", "TypeError"), ('{"app_id": 1}', "damaged")):
        path.write_text(broken)
        with pytest.raises(DeployError, match=why):
            upgrade(session, "shop", None, AppOptions.build(), commit=True, verify=False)
    assert node.upgrades() == []


def test_a_stored_plan_is_not_changed_by_options(chain: ChainClient, tmp_path: Path) -> None:
    _, node, session, _ = _pending(chain, tmp_path, delay=60)
    chain.increase_time(61)
    with pytest.raises(InvalidOption, match="with the compose file again"):
        upgrade(session, "shop", None, AppOptions.build(env=["A=1"]), commit=True, verify=False)
    assert node.upgrades() == []


def test_cli_upgrade_without_a_file_needs_commit() -> None:
    r = CliRunner().invoke(cli_app, ["upgrade", "shop"])
    assert r.exit_code == 2 and "missing COMPOSE" in r.stderr and "--commit" in r.stderr
    r = CliRunner().invoke(cli_app, ["upgrade", "shop", "--commit"])  # no cloud here: says so
    assert r.exit_code == 1 and "teecloud up" in r.stderr and "Traceback" not in r.output


class _EnvKms:
    """Only the env-encryption key of the app (the KMS's verified answer is tested in tests/kms)."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self.secret = X25519PrivateKey.generate()

    def get_env_encrypt_pubkey(self, app_id: bytes) -> tuple[bytes, None]:
        return self.secret.public_key().public_bytes_raw(), None


def test_the_env_of_a_pending_upgrade_is_kept_encrypted_and_sent_on_commit(
    chain: ChainClient, tmp_path: Path
) -> None:
    from teecloud.keys.envcrypt import decrypt_env

    v2 = tmp_path / "v2.yml"
    v2.write_text(V2)
    assert chain.address is not None
    tl = chain.deploy_timelock(chain.address, 60)
    app_id, node, session = _app(chain, tl, ["DB"])
    kms = _EnvKms()
    session.kms_client = lambda: kms
    sent_env: list[str | None] = []
    record = node.upgrade

    def upgrade_recording_env(ref: str, req: Any) -> Any:
        sent_env.append(req.encrypted_env)
        return record(ref, req)

    node.upgrade = upgrade_recording_env  # type: ignore[method-assign]
    opts = AppOptions.build(env=["DB=s3cret-value"])
    assert upgrade(session, "shop", v2, opts, verify=False).status == "pending"
    stored = plan_path(app_id).read_text()
    assert "s3cret-value" not in stored  # only ciphertext on disk
    plan = load_plan(app_id)
    assert plan is not None and plan.encrypted_env is not None
    secret = kms.secret.private_bytes_raw()
    assert decrypt_env(secret, bytes.fromhex(plan.encrypted_env)) == {"DB": "s3cret-value"}
    chain.increase_time(61)
    r = upgrade(session, "shop", None, AppOptions.build(), commit=True, verify=False)
    assert r.status == "running" and sent_env == [plan.encrypted_env]
