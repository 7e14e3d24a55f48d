"""InstanceStore look-ups: instance id (any case, 0x allowed), unique prefix, or exact name."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

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


def test_concurrent_state_updates_are_never_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """update_state was read-modify-write without a lock: two threads (an API call and a boot thread) read
    the same state and the second write dropped the first one's change. A slow write widens that window."""
    import teecloud.node.instance as instance_mod

    store = InstanceStore(tmp_path)
    iid = _create(store, "a")
    real_write = instance_mod.atomic_write_json

    def slow_write(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.01)
        real_write(*args, **kwargs)

    monkeypatch.setattr(instance_mod, "atomic_write_json", slow_write)
    start = threading.Barrier(16)

    def update(i: int) -> None:
        inst = store.get(iid)  # a fresh view each time, as every API call makes
        start.wait()
        if i % 2:
            inst.update_state(**{f"k{i}": i})
        else:
            inst.add_history("tick", n=i)

    threads = [threading.Thread(target=update, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    state = store.get(iid).state()
    assert {k: v for k, v in state.items() if k.startswith("k")} == {f"k{i}": i for i in range(1, 16, 2)}
    ticks = sorted(h["n"] for h in state["history"] if h["event"] == "tick")
    assert ticks == list(range(0, 16, 2))
    assert state["history"][0]["event"] == "created"  # the earlier history is kept
    assert state["name"] == "a"
