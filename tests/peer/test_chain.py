"""The chain gate (teecloud.peer.ChainGate): a clear "yes" from the chain or a refusal, cached one block."""

from __future__ import annotations

import pytest

from teecloud.chain.api import BootInfo
from teecloud.peer import ChainGate, PeerRejected


def _boot_info(app: int = 1) -> BootInfo:
    return BootInfo(
        app_id=bytes([app]) * 20,
        compose_hash=b"\x02" * 32,
        instance_id=b"\x03" * 20,
        device_id=b"\x04" * 32,
        mr_aggregated=b"\x05" * 32,
        mr_system=b"\x06" * 32,
        os_image_hash=b"\x07" * 32,
        tcb_status="UpToDate",
        advisory_ids=(),
    )


class _Chain:
    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.calls = 0

    def is_app_allowed(self, boot_info: BootInfo) -> tuple[bool, str]:
        self.calls += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer  # type: ignore[return-value]

    is_kms_allowed = is_app_allowed


def test_allowed_returns_the_reason_and_caches_within_one_block() -> None:
    chain = _Chain((True, "ok"))
    block = [7]
    gate = ChainGate(chain, block_number=lambda: block[0])
    assert gate.app_allowed(_boot_info()) == "ok"
    assert gate.app_allowed(_boot_info()) == "ok"
    assert chain.calls == 1
    chain.answer = (False, "hash removed")
    block[0] = 8  # a change on chain needs a new block: the next call sees it
    with pytest.raises(PeerRejected) as exc:
        gate.app_allowed(_boot_info())
    assert exc.value.step == "chain" and "hash removed" in exc.value.reason


@pytest.mark.parametrize("answer", [(False, "no"), ConnectionError("rpc down"), ("yes", ""), (1, "")])
def test_anything_but_a_clear_yes_is_a_refusal(answer: object) -> None:
    with pytest.raises(PeerRejected) as exc:
        ChainGate(_Chain(answer)).kms_allowed(_boot_info())
    assert exc.value.step == "chain"


def test_kms_authorizer_keeps_its_access_denied() -> None:
    from teecloud.kms.authz import ChainAuthorizer
    from teecloud.kms.errors import AccessDenied

    with pytest.raises(AccessDenied) as exc:
        ChainAuthorizer(_Chain((False, "no"))).app_allowed(_boot_info())
    assert exc.value.step == "chain"
