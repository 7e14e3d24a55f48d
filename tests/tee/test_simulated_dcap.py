"""SimulatedTdx quotes cross-checked with dcap-qvl (an independent DCAP implementation)."""

from __future__ import annotations

import json
import time

import dcap_qvl
import pytest

from teecloud.tee.simulated import SimulatedTdx


def _col(tee: SimulatedTdx, now: int | None = None) -> dcap_qvl.QuoteCollateralV3:
    return dcap_qvl.QuoteCollateralV3.from_json(tee.collateral(now=now).decode())


def test_simulated_quote_verifies_uptodate_under_dev_root() -> None:
    tee = SimulatedTdx()
    now = int(time.time())
    quote = tee.quote(b"hello")
    report = dcap_qvl.verify_with_root_ca(quote, _col(tee), tee.dev_root_der(), now)
    assert report.status == "UpToDate"
    assert report.advisory_ids == []


def test_intel_root_rejects_simulated_quote() -> None:
    tee = SimulatedTdx()
    with pytest.raises(Exception, match=r"(?i)crl|root|issuer|signature"):
        dcap_qvl.verify(tee.quote(b"x"), _col(tee), int(time.time()))
