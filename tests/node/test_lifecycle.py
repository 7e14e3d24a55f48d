"""Node lifecycle races and failures, on a fake runtime and a fake boot: upgrade is one critical section;
remove completes (and says what it could not clean) even when the engine is down."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from teecloud.agent.errors import StorageError
from teecloud.agent.storage import EncryptedVolume
from teecloud.node.api import CreateCvmRequest, UpgradeCvmRequest
from teecloud.node.errors import InstanceNotFound, RuntimeFailed
from teecloud.node.instance import Instance
from teecloud.node.service import Node, make_node_app
from tests.node.fakes import FakeBoots, FakeRuntime, app_compose, make_node

ENGINE_DOWN = RuntimeFailed(
    "compose down failed: Cannot connect to the Docker daemon at unix:///var/run/docker.sock"
)


@pytest.fixture
def boots() -> FakeBoots:
    return FakeBoots()


def _running(node: Node, name: str = "a") -> str:
    st = node.create(CreateCvmRequest(name=name, app_compose=app_compose(), app_id="11" * 20))
    node.wait_all(10)
    assert node.status(st.instance_id).status == "running"
    return st.instance_id


def test_a_start_during_an_upgrade_cannot_boot_the_old_compose(
    teecloud_home: Path, boots: FakeBoots, monkeypatch: pytest.MonkeyPatch
) -> None:
    """upgrade released the CVM's lock between its stop and its start: a `start` arriving then booted the
    old compose (and the upgrade's own start found the CVM booting and did nothing)."""
    node = make_node(teecloud_home, FakeRuntime(), boots, monkeypatch)
    iid = _running(node)
    old_hash = node.store.get(iid).compose_hash().hex()
    new_text = app_compose(docker_compose_file="services:\n  a:\n    image: y\n")
    # widen the windows a racing start would use: a slow stop, a slow manifest write
    boots.shutdown_delay = 0.3
    real_write = Instance.write_manifest

    def slow_write(self: Instance, *args: object, **kwargs: object) -> None:
        time.sleep(0.3)
        real_write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Instance, "write_manifest", slow_write)
    upgrade = threading.Thread(target=node.upgrade, args=(iid, UpgradeCvmRequest(app_compose=new_text)))
    upgrade.start()
    assert boots.in_shutdown.wait(5)
    node.start(iid)  # while the upgrade is stopping the CVM
    upgrade.join(10)
    node.wait_all(10)
    new_hash = node.store.get(iid).compose_hash().hex()
    assert new_hash != old_hash
    assert boots.booted_hashes == [old_hash, new_hash]  # create, then only the upgrade's boot
    st = node.status(iid)
    assert st.status == "running" and st.compose_hash == new_hash
    assert [h["event"] for h in st.history] == ["created", "upgraded"]
    assert st.history[1]["from"] == old_hash and st.desired == "running"


def test_a_stop_waits_for_a_boot_then_nothing_boots_behind_it(
    teecloud_home: Path, boots: FakeBoots, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(teecloud_home, FakeRuntime(), boots, monkeypatch)
    iid = _running(node)
    node.stop(iid)
    assert node.status(iid).status == "stopped"
    node.start(iid)
    node.stop(iid)  # right behind the start: waits for its boot, then stops it
    node.wait_all(10)
    assert node.status(iid).status == "stopped" and node.status(iid).desired == "stopped"


def _fill_volume(inst: Instance) -> None:
    inst.cipher_dir.mkdir(parents=True, exist_ok=True)
    (inst.cipher_dir / "gocryptfs.conf").write_text('{"EncryptedKey": "wrapped master key"}')
    (inst.cipher_dir / "ciphertext-file").write_bytes(b"\x00" * 64)


@pytest.mark.parametrize("unmount_fails", [False, True])
def test_remove_completes_when_the_engine_is_down(
    teecloud_home: Path, boots: FakeBoots, monkeypatch: pytest.MonkeyPatch, unmount_fails: bool
) -> None:
    """`compose down` failing (engine down) made remove raise half-way: the volume stayed mounted, the
    ciphertext and the instance stayed, the keys stayed in memory."""
    runtime = FakeRuntime(down_error=ENGINE_DOWN)
    node = make_node(teecloud_home, runtime, boots, monkeypatch)
    iid = _running(node)
    inst = node.store.get(iid)
    _fill_volume(inst)
    booted = node._cvm(iid).booted
    assert booted is not None
    unmounted: list[Path] = []

    def unmount(self: EncryptedVolume) -> None:
        unmounted.append(self.mount_point)
        if unmount_fails:
            raise StorageError(f"cannot unmount {self.mount_point}: Device or resource busy")

    monkeypatch.setattr(EncryptedVolume, "unmount", unmount)
    result = node.remove(iid)
    assert result.removed == iid
    assert ("down", f"tc-{iid[:16]}") in runtime.calls
    # everything else still happened
    assert unmounted == [inst.mount_point]
    assert boots.runners[-1].stopped
    assert not inst.cipher_dir.exists() and not inst.dir.exists() and not inst.runtime_dir.exists()
    assert iid not in node._cvms  # the booted state (the app's keys) is forgotten
    with pytest.raises(InstanceNotFound):
        node.status(iid)
    # ... and what could not be done is said, with how to finish it
    project = f"tc-{iid[:16]}"
    assert any(project in i and "Cannot connect" in i and "down -v" in i for i in result.leftovers)
    assert any("still mounted" in item for item in result.leftovers) == unmount_fails
    assert len(result.leftovers) == (2 if unmount_fails else 1)


def test_remove_over_http_reports_leftovers_and_a_clean_remove_reports_none(
    teecloud_home: Path, boots: FakeBoots, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = FakeRuntime(down_error=ENGINE_DOWN)
    node = make_node(teecloud_home, runtime, boots, monkeypatch)
    c = TestClient(make_node_app(node, token="t0ken"), raise_server_exceptions=False)
    auth = {"Authorization": "Bearer t0ken"}
    iid = _running(node, "a")
    _fill_volume(node.store.get(iid))
    r = c.delete(f"/cvms/{iid}", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["removed"] == iid and "Cannot connect" in r.json()["leftovers"][0]
    assert c.get(f"/cvms/{iid}", headers=auth).status_code == 404
    runtime.down_error = None
    iid = _running(node, "b")
    _fill_volume(node.store.get(iid))
    r = c.delete(f"/cvms/{iid}", headers=auth)
    assert r.status_code == 200 and r.json() == {"removed": iid, "leftovers": []}


def test_shred_deletes_the_wrapped_key_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the rest of the ciphertext cannot be deleted, gocryptfs.conf (the master key wrapped by the
    disk key) is gone, so nothing left can be decrypted."""
    import shutil

    vol = EncryptedVolume(tmp_path / "cipher", tmp_path / "mnt")
    vol.cipher_dir.mkdir()
    (vol.cipher_dir / "gocryptfs.conf").write_text("{}")
    (vol.cipher_dir / "data").write_text("x")

    def rmtree_fails(path: object, *a: object, **k: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", rmtree_fails)
    with pytest.raises(StorageError, match="cannot delete the encrypted volume"):
        vol.shred()
    assert not (vol.cipher_dir / "gocryptfs.conf").exists()
    assert (vol.cipher_dir / "data").exists()
