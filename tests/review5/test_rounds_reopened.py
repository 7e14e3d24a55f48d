"""Review 5, R4-4's fix (39fa00a) within and across rounds: a presigning round reopened under the session of
a finished one (the dealers dropped it once every member fetched), on the same members. Presignatures are
named by (round session, k) — a reopened session makes new presignatures under the names of the old."""

from __future__ import annotations

import pytest

from teecloud.kms import threshold_net
from teecloud.kms.threshold_net import RoundFailed, run_presign_round, run_signing_key_dkg
from tests.kms.test_threshold_net_peering import Member
from tests.kms.test_threshold_net_presign import endpoints


def _pools(members: dict[int, Member]) -> dict[int, dict[bytes, bytes]]:
    out = {}
    for i, m in members.items():
        signer = m.service.threshold.signer  # type: ignore[union-attr]
        assert signer is not None
        out[i] = {s: signer.pool.public(s).big_r for s in signer.pool.unused()}
    return out


@pytest.mark.slow
def test_a_reopened_session_adds_nothing_and_changes_no_presignature(
    members: dict[int, Member], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Safe: the reopened round fails with a clear refusal (never a 500) and every pool keeps exactly the
    presignatures (same R) it had: no name holds two presignatures anywhere."""
    eps = endpoints(members)
    run_signing_key_dkg(eps)
    session = "5e" * 16
    monkeypatch.setattr(threshold_net.secrets, "token_hex", lambda n: session)
    run_presign_round(eps, 2, 3)
    before = _pools(members)
    assert all(len(p) == 2 for p in before.values())
    with pytest.raises(RoundFailed) as failed:
        run_presign_round(eps, 2, 3)  # the same session again
    assert _pools(members) == before  # nothing added, no name holds another R (held)
    # a clear refusal of the operator's request (the pool's SealingError escapes advance: HTTP 500)
    assert "Internal Server Error" not in str(failed.value), str(failed.value)
