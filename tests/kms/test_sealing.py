"""Sealed root keys open only on the same platform, for the same KMS measurement, unmodified."""

from __future__ import annotations

from pathlib import Path

import pytest

from teecloud.kms.bootstrap import SEALED_STATE_NAME, boot_kms_tee, kms_dir, load_state, start_kms_state
from teecloud.kms.errors import SealingError
from teecloud.tee.simulated import SimulatedTdx


def test_restart_unseals_same_keys(teecloud_home: Path) -> None:
    tee = SimulatedTdx(teecloud_home)
    state, created = start_kms_state(tee, boot_kms_tee(tee), now=1_800_000_000)
    assert created
    tee2 = SimulatedTdx(teecloud_home)
    again, created2 = start_kms_state(tee2, boot_kms_tee(tee2), now=1_800_000_100)
    assert not created2 and again.root.k256_key == state.root.k256_key
    assert b"PRIVATE KEY" not in (kms_dir(teecloud_home) / SEALED_STATE_NAME).read_bytes()


def test_other_build_cannot_unseal(teecloud_home: Path) -> None:
    tee = SimulatedTdx(teecloud_home)
    start_kms_state(tee, boot_kms_tee(tee), now=1_800_000_000)
    other = SimulatedTdx(teecloud_home)
    with pytest.raises(SealingError, match="another"):
        load_state(other, boot_kms_tee(other, build="other-build"))


def test_tampered_sealed_file(teecloud_home: Path) -> None:
    tee = SimulatedTdx(teecloud_home)
    identity = boot_kms_tee(tee)
    start_kms_state(tee, identity, now=1_800_000_000)
    path = kms_dir(teecloud_home) / SEALED_STATE_NAME
    text = path.read_text()
    i = text.index('"ciphertext": "') + 20
    path.write_text(text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1 :])
    with pytest.raises(SealingError):
        load_state(tee, identity)
