"""Followed log streams (public for apps with public_logs): capped per CVM and per node with a 429, and a
client that goes away ends its `docker logs --follow` process. Real HTTP server on 127.0.0.1, fake runtime
whose log command is a real local process (`echo hello; sleep 60`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from teecloud.node import service
from teecloud.node.instance import ResourceLimits
from teecloud.node.runtime.docker import LogStream
from teecloud.node.service import Node, NodeServer
from tests.node.fakes import FakeBoots, FakeRuntime, app_compose, make_node


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def node(teecloud_home: Path, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> Node:
    return make_node(teecloud_home, runtime, FakeBoots(), monkeypatch)


@pytest.fixture
def server(node: Node) -> Iterator[NodeServer]:
    s = NodeServer(node, token="t0ken").start()
    yield s
    s.stop()


def _public_cvm(node: Node, name: str) -> str:
    inst = node.store.create(
        app_compose=app_compose(public_logs=True).encode(),
        app_id=bytes(range(20)),
        name=name,
        encrypted_env=None,
        user_config=None,
        sys_config={},
        limits=ResourceLimits(),
    )
    return inst.instance_id


def _eventually(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _alive(stream: LogStream) -> bool:
    return stream.process is not None and stream.process.poll() is None


def test_a_client_that_goes_away_ends_the_follow_process(
    server: NodeServer, node: Node, runtime: FakeRuntime
) -> None:
    """The stream was a sync generator read by a server thread blocked on `docker logs --follow`: after a
    disconnect nothing closed it, so the process (and the thread) lived until the container wrote again."""
    iid = _public_cvm(node, "a")
    with httpx.Client(base_url=server.url, timeout=10) as c:  # no token: the public route
        with c.stream("GET", f"/cvms/{iid}/logs", params={"follow": "true"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: dropping a half-read iterator makes httpx close the connection
            assert next(lines) == "app | hello"
            (stream,) = runtime.streams
            time.sleep(0.2)
            assert _alive(stream) and node.follow_streams() == {iid: 1}
    assert _eventually(lambda: not _alive(stream)), "docker logs --follow outlived its client"
    assert _eventually(lambda: node.follow_streams() == {})  # the slot is given back
    assert stream.closed


def test_follow_streams_are_capped_per_cvm_and_per_node(
    server: NodeServer, node: Node, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "MAX_FOLLOW_STREAMS_PER_CVM", 2)
    monkeypatch.setattr(service, "MAX_FOLLOW_STREAMS", 3)
    a, b = _public_cvm(node, "a"), _public_cvm(node, "b")
    readers: list[Iterator[str]] = []  # kept: dropping a half-read iterator makes httpx close the connection
    with httpx.Client(base_url=server.url, timeout=10) as c, contextlib.ExitStack() as open_streams:

        def follow(iid: str) -> None:
            r = open_streams.enter_context(c.stream("GET", f"/cvms/{iid}/logs", params={"follow": "true"}))
            assert r.status_code == 200
            readers.append(r.iter_lines())
            assert next(readers[-1]) == "app | hello"

        follow(a)
        follow(a)
        r = c.get(f"/cvms/{a}/logs", params={"follow": "true"})
        assert r.status_code == 429
        assert "already has 2 followed log streams" in r.json()["error"]
        follow(b)
        r = c.get(f"/cvms/{b}/logs", params={"follow": "true"})
        assert r.status_code == 429
        assert "already serves 3 followed log streams" in r.json()["error"]
        assert node.follow_streams() == {a: 2, b: 1}
        assert len(runtime.streams) == 3  # a refused request starts no process
        assert sum(_alive(s) for s in runtime.streams) == 3
        # logs without follow end by themselves and are not counted
        r = c.get(f"/cvms/{b}/logs")
        assert r.status_code == 200 and r.text == "app | hello\n"
    assert _eventually(lambda: not any(_alive(s) for s in runtime.streams))
    assert _eventually(lambda: node.follow_streams() == {})
    with httpx.Client(base_url=server.url, timeout=10) as c:
        with c.stream("GET", f"/cvms/{a}/logs", params={"follow": "true"}) as r:
            assert r.status_code == 200  # slots come back once streams close


def test_the_cap_also_holds_for_the_admin(
    server: NodeServer, node: Node, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "MAX_FOLLOW_STREAMS_PER_CVM", 1)
    a = _public_cvm(node, "a")
    auth = {"Authorization": "Bearer t0ken"}
    with httpx.Client(base_url=server.url, timeout=10, headers=auth) as c:
        with c.stream("GET", f"/cvms/{a}/logs", params={"follow": "true"}) as r:
            assert r.status_code == 200
            r2 = c.get(f"/cvms/{a}/logs", params={"follow": "true"})
            assert r2.status_code == 429 and r2.json()["error"]


def test_log_stream_close_from_another_thread_unblocks_the_reader() -> None:
    """The unit the HTTP route relies on: close() kills the process, a reader blocked on it returns, no
    further command starts, and on_close callbacks run once."""
    import threading

    stream = LogStream([("a", ["sh", "-c", "echo one; exec sleep 60"]), ("b", ["echo", "never"])])
    released: list[int] = []
    stream.on_close(lambda: released.append(1))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(stream))
    reader.start()
    assert _eventually(lambda: got == [b"a | one\n"])
    proc = stream.process
    assert proc is not None
    stream.close()
    reader.join(5)
    assert not reader.is_alive() and proc.poll() is not None
    assert got == [b"a | one\n"] and released == [1]
    stream.close()
    assert released == [1]


def test_an_unread_stream_dropped_releases_its_slot() -> None:
    released: list[int] = []
    stream = LogStream([("a", ["echo", "x"])])
    stream.on_close(lambda: released.append(1))
    del stream
    assert released == [1]


def test_logs_without_follow_end_at_the_byte_bound(
    node: Node, server: NodeServer, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log response is bounded in bytes (however long the app's lines), and says it was cut."""
    monkeypatch.setattr(service, "MAX_LOG_RESPONSE_BYTES", 64 * 1024)

    def huge(project: str, **_: object) -> LogStream:  # 1 MB of output
        return LogStream([("app", ["sh", "-c", "yes 0123456789abcdef | head -c 1048576"])])

    monkeypatch.setattr(runtime, "logs", huge)
    iid = _public_cvm(node, "chatty")
    r = httpx.get(f"{server.url}/cvms/{iid}/logs", params={"tail": 10**9}, timeout=30)
    assert r.status_code == 200
    assert 60 * 1024 < len(r.content) <= 64 * 1024 + 200
    assert r.content.rstrip().endswith(b"ask for a smaller tail]")
