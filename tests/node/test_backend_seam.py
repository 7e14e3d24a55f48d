"""The node's lifecycle reaches a CVM only through its backend (CvmBackend / Cvm): a backend that is neither
docker nor qemu runs the whole lifecycle, and the node hands a backend the caller's nonce for an attestation,
never a report_data of its choosing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from teecloud.node.api import CreateCvmRequest
from teecloud.node.errors import BootFailed, InstanceStateError
from teecloud.node.instance import Instance
from teecloud.node.runtime import ContainerState, Cvm, CvmAttestation, CvmBackend, ResourceLimits
from teecloud.node.service import Node
from teecloud.tee.simulated import SimulatedTdx
from tests.node.fakes import NoKeys, app_compose


class _Log:
    def __init__(self, lines: list[bytes]) -> None:
        self._it = iter(lines)

    def __iter__(self) -> _Log:
        return self

    def __next__(self) -> bytes:
        return next(self._it)

    def close(self) -> None:
        pass

    def on_close(self, callback: Any) -> None:
        callback()


class _Handle:
    def __init__(self, backend: _Recording, inst: Instance, booted: bool) -> None:
        self.backend, self.inst, self._booted = backend, inst, booted
        self.instance_id = inst.instance_id
        self.timings: dict[str, float] = {"agent-ready": 0.5}
        self.dropped_env: list[str] = []

    @property
    def booted(self) -> bool:
        return self._booted

    @property
    def public_tcbinfo(self) -> bool:
        return True

    def containers(self) -> list[ContainerState]:
        return [ContainerState("web", "vm-web", "running", None, 0)] if self._booted else []

    def logs(self, *, service: str | None = None, tail: int = 200, follow: bool = False) -> _Log:
        return _Log([b"booted\n"])

    def stats(self) -> list[dict[str, Any]]:
        return []

    def attestation(self, nonce: bytes) -> CvmAttestation:
        self.backend.calls.append(("attestation", nonce.hex()))
        return CvmAttestation("11" * 20, "22" * 32, "q", "[]", "rd", "{}", "{}")

    def stop(self) -> None:
        self.backend.calls.append(("stop", self.instance_id))
        self._booted = False

    def remove(self) -> list[str]:
        self.backend.calls.append(("remove", self.instance_id))
        return ["a leftover the backend reports"]


class _Recording:
    kind = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_next = False

    def check(self) -> None:
        pass

    def check_images(self, refs: Sequence[str]) -> None:
        self.calls.append(("check_images", ",".join(refs)))

    def describe(self) -> str:
        return "recording backend"

    def launch(self, instance: Instance, limits: ResourceLimits, *, progress: Any = None) -> _Handle:
        self.calls.append(("launch", f"{instance.instance_id}:{limits.memory_mb}"))
        if self.fail_next:
            self.fail_next = False
            raise BootFailed("agent", "no guest agent answered")
        return _Handle(self, instance, booted=True)

    def attach(self, instance: Instance) -> _Handle:
        return _Handle(self, instance, booted=False)


@pytest.fixture
def node(teecloud_home: Path) -> tuple[Node, _Recording]:
    backend = _Recording()
    assert isinstance(backend, CvmBackend)
    n = Node(
        key_provider=NoKeys(),
        tee_factory=lambda: SimulatedTdx(teecloud_home),
        backend=backend,
        home=teecloud_home,
        memory_mb=4096,
    )
    return n, backend


def test_the_whole_lifecycle_goes_through_the_backend(node: tuple[Node, _Recording]) -> None:
    n, backend = node
    st = n.create(CreateCvmRequest(name="web", app_compose=app_compose(), app_id="11" * 20, memory_mb=512))
    iid = st.instance_id
    n.wait_all(10)
    status = n.status(iid)
    assert status.status == "running" and [c.service for c in status.containers] == ["web"]
    assert isinstance(n._cvm(iid).booted, Cvm)
    assert n.info().compose == "recording backend"
    assert b"".join(n.logs(iid, service=None, tail=10, follow=False, public=False)) == b"booted\n"
    n.stop(iid)
    assert n.status(iid).status == "stopped" and n.status(iid).containers == []
    backend.fail_next = True
    n.start(iid)
    n.wait_all(10)
    failed = n.status(iid)
    assert failed.status == "failed" and failed.phase == "agent" and "no guest agent" in failed.error
    result = n.remove(iid)
    assert result.leftovers == ["a leftover the backend reports"]
    names = [c for c, _ in backend.calls]
    assert names == ["check_images", "launch", "stop", "launch", "remove"]
    assert backend.calls[1][1].endswith(":512")


def test_the_backend_gets_the_callers_nonce_not_a_report_data(node: tuple[Node, _Recording]) -> None:
    n, backend = node
    st = n.create(CreateCvmRequest(name="web", app_compose=app_compose(), app_id="11" * 20))
    n.wait_all(10)
    a = n.attestation(st.instance_id, b"\x01\x02", public=True)
    assert ("attestation", "0102") in backend.calls and a.nonce == "0102"
    n.stop(st.instance_id)
    with pytest.raises(InstanceStateError, match="not running"):
        n.attestation(st.instance_id, b"\x01", public=False)
