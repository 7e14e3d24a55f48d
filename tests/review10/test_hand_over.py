"""Review 10: t19-perf's keep hand-over after the boot (`ThresholdKeyProvider._hand_over_later`,
`KmsClient.hand_over_boot`). The nodes' rule (keys only to boot-time evidence) is what decides; these
attacks check the client does not hand post-boot evidence the boot's credential.

Held: once handed over, a call for the CVM is not served by the boot's credential (it quotes afresh, and the
node judges that quote as post-boot: tests/kms/test_threshold_kept_signatures.py); the holder serves only
the boot's usage and app id (a call for another app through it would need a quote, and the holder takes
none); a hand-over onto a holder already bound, or of a boot not bound, moves nothing; the credential's one
quote is the one taken during the boot (the tee is not asked again)."""

from __future__ import annotations

from typing import Any

import pytest

from teecloud.kms.client import BootCredential, KmsClient, _OneQuote
from teecloud.kms.errors import KmsClientError
from teecloud.kms.threshold_client import _EndedBoot

A, B = b"\xaa" * 20, b"\xbb" * 20
USAGE = "app:kms-client"


class _Tee:
    """A quote source that counts its quotes (a CVM)."""

    def __init__(self) -> None:
        self.quotes = 0

    def quote(self, report_data: bytes) -> bytes:
        self.quotes += 1
        return b"q" + report_data

    def event_log(self) -> list[Any]:
        return []


def _client() -> KmsClient:
    return KmsClient("https://127.0.0.1:9", server_check=None)  # type: ignore[arg-type]  # never called


def test_after_the_hand_over_the_cvm_is_not_served_by_its_boot_credential() -> None:
    tee, holder = _Tee(), _EndedBoot()
    client = _client()
    credential = BootCredential(tee, usage=USAGE, app_id=A)  # type: ignore[arg-type]
    assert client.bind_boot(tee, credential)  # type: ignore[arg-type]
    assert client._boot_of(tee, USAGE, A) is not None  # type: ignore[arg-type]
    assert client.hand_over_boot(tee, holder)  # type: ignore[arg-type]
    assert client._boot_of(tee, USAGE, A) is None  # type: ignore[arg-type]  # a call for the CVM: its own quote
    moved = client._boot_of(holder, USAGE, A)
    assert moved is not None and moved.credential is credential
    # the holder's binding serves the boot's usage and app only; anything else needs a quote it never takes
    assert client._boot_of(holder, USAGE, B) is None
    assert client._boot_of(holder, "kms:reshare", A) is None
    with pytest.raises(KmsClientError, match="no quote is taken"):
        holder.quote(b"\x00" * 64)
    with pytest.raises(KmsClientError):
        holder.event_log()
    # a second hand-over of the same boot, or onto a bound holder, moves nothing
    assert not client.hand_over_boot(tee, _EndedBoot())  # type: ignore[arg-type]
    tee2 = _Tee()
    assert client.bind_boot(tee2, BootCredential(tee2, usage=USAGE, app_id=B))  # type: ignore[arg-type]
    assert not client.hand_over_boot(tee2, holder)  # type: ignore[arg-type]
    assert client._boot_of(tee2, USAGE, B) is not None  # type: ignore[arg-type]
    assert client._boot_of(holder, USAGE, A) is moved
    client.unbind_boot(holder)
    assert client._boot_of(holder, USAGE, A) is None and moved.ended


def test_the_boot_credentials_one_quote_is_the_boots() -> None:
    """The credential's quote is taken at its first certificate, during the boot; the hand-over's later
    certificates (nodes first called by the hand-over) carry that quote, the tee is not asked again, and
    another key's report data is refused."""
    tee = _Tee()
    one = _OneQuote(tee)  # type: ignore[arg-type]
    q = one.quote(b"\x01" * 64)
    for _ in range(3):
        assert one.quote(b"\x01" * 64) == q
    assert tee.quotes == 1
    with pytest.raises(KmsClientError, match="its own key only"):
        one.quote(b"\x02" * 64)
    assert tee.quotes == 1
