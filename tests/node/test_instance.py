"""InstanceStore look-ups: instance id (any case, 0x allowed), unique prefix, or exact name."""

from __future__ import annotations

from pathlib import Path

import pytest

from teecloud.node.errors import InstanceNotFound
from teecloud.node.instance import InstanceStore, ResourceLimits


def _create(store: InstanceStore, name: str) -> str:
    inst = store.create(
        app_compose=b"{}",
        app_id=bytes(20),
        name=name,
        encrypted_env=None,
        user_config=None,
        sys_config={},
        limits=ResourceLimits(),
    )
    return inst.dir.name


def test_lookup_by_id_prefix_and_name(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    iid = _create(store, "MyApp")
    _create(store, "myapp")
    assert store.get(iid).dir.name == iid
    assert store.get("0x" + iid.upper()).dir.name == iid
    assert store.get(iid[:8]).dir.name == iid
    assert store.get("MyApp").dir.name == iid  # names keep their case
    assert store.get("myapp").dir.name != iid
    with pytest.raises(InstanceNotFound, match="no CVM 'MYAPP'"):
        store.get("MYAPP")
