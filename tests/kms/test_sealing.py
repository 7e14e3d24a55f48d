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


def test_platform_without_sealing_key_is_refused_with_the_reason(teecloud_home: Path, tmp_path: Path) -> None:
    """A KMS on a TDX guest has no hardware sealing key: sealing refuses with a sentence, never falls back
    to a file on the host (the simulator's way)."""
    from teecloud.tee.tdx import TdxPlatform

    tdx = TdxPlatform(tsm_root=tmp_path / "tsm", measurements_dir=tmp_path / "m", device=tmp_path / "dev")
    identity = boot_kms_tee(SimulatedTdx(teecloud_home))
    start_kms_state(SimulatedTdx(teecloud_home), identity, now=1_800_000_000)
    with pytest.raises(SealingError, match="no hardware sealing key"):
        load_state(tdx, identity)


def test_another_platform_cannot_unseal(teecloud_home: Path, tmp_path: Path) -> None:
    tee = SimulatedTdx(teecloud_home)
    identity = boot_kms_tee(tee)
    start_kms_state(tee, identity, now=1_800_000_000)
    other_machine = SimulatedTdx(tmp_path / "other-machine")  # another platform: another sealing secret
    with pytest.raises(SealingError, match="another platform"):
        load_state(other_machine, identity)


def test_corrupt_platform_secret_is_an_error_and_left_alone(teecloud_home: Path) -> None:
    tee = SimulatedTdx(teecloud_home)
    identity = boot_kms_tee(tee)
    start_kms_state(tee, identity, now=1_800_000_000)
    secret = tee.state_dir / "kms-sealing-secret"
    secret.write_bytes(b"short")
    with pytest.raises(SealingError, match="corrupt"):
        load_state(tee, identity)
    assert secret.read_bytes() == b"short"  # never silently replaced by a new secret
