"""The guest's TEE factory (teecloud.tee.guest): the TEE of the mode the host states, or a refused boot; and
the VM agent's quote path through it. A fake configfs-tsm tree and a fake tdx_guest sysfs directory stand in
for the guest kernel (no TDX or SEV-SNP hardware here)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import HTTPServer
from pathlib import Path

import httpx
import pytest

from teecloud.agent.vm_agent import GuestStatus, attest_document, attest_report_data, make_handler, read_info
from teecloud.tee import TeeUnavailable, TeeUsageError
from teecloud.tee.guest import GuestTeePaths, guest_mode, guest_tee
from teecloud.tee.sev_snp import SevSnpPlatform
from teecloud.tee.simulated import STATE_DIR_NAME, SimulatedTdx, runtime_event_digest
from teecloud.tee.sysconfig import SysConfigError, parse_sys_config, read_sys_config
from teecloud.tee.tdx import TdxPlatform, td_report_fields_from_quote

from .fake_configfs import FakeTsmKernel


def _snp_report(inblob: bytes) -> bytes:
    report = bytearray(0x4A0)
    report[0] = 2
    report[0x50 : 0x50 + 64] = inblob.ljust(64, b"\0")
    return bytes(report)


class _Guest:
    """A guest's kernel interfaces in tmp_path: the host share, configfs-tsm (provider `provider`, or none),
    the tdx_guest sysfs registers (when `rtmr`)."""

    def __init__(self, tmp_path: Path, mode: str, provider: str | None, *, rtmr: bool = True) -> None:
        self.paths = GuestTeePaths(
            share=tmp_path / "share",
            run=tmp_path / "run",
            tsm_root=tmp_path / "tsm" / "report",
            tdx_device=tmp_path / "dev" / "tdx_guest",
            tdx_measurements=tmp_path / "measurements",
            ccel=tmp_path / "CCEL",
            event_log=tmp_path / "run" / "events.log",
        )
        self.paths.share.mkdir(parents=True)
        (self.paths.share / ".sys-config.json").write_text(json.dumps({"tee_mode": mode}))
        self.inblobs: list[bytes] = []
        self.kernel: FakeTsmKernel | None = None
        if provider is not None:
            sim = SimulatedTdx(tmp_path / "quoting")

            def make_report(inblob: bytes) -> bytes:
                self.inblobs.append(inblob)
                return _snp_report(inblob) if provider == "sev_guest" else sim.quote(inblob)

            self.kernel = FakeTsmKernel(self.paths.tsm_root, provider, make_report)
        if rtmr:
            self.paths.tdx_measurements.mkdir()
            for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"):
                (self.paths.tdx_measurements / f"{name}:sha384").write_bytes(bytes(48))

    def tee(self, mode: str | None = None) -> object:
        config = read_sys_config(self.paths.share / ".sys-config.json")
        return guest_tee(mode or guest_mode(config), self.paths, fs=self.kernel)


def _share_simulated_state(tmp_path: Path, share: Path) -> None:
    node = tmp_path / "node"
    SimulatedTdx(node)  # creates this installation's simulated TEE state
    shutil.copytree(node / STATE_DIR_NAME, share / STATE_DIR_NAME)


def test_the_factory_picks_the_tee_of_the_mode_the_host_states(tmp_path: Path) -> None:
    tdx = _Guest(tmp_path / "a", "tdx", "tdx_guest").tee()
    assert isinstance(tdx, TdxPlatform) and tdx.kind == "tdx"
    snp = _Guest(tmp_path / "b", "sev-snp", "sev_guest", rtmr=False).tee()
    assert isinstance(snp, SevSnpPlatform) and snp.kind == "sev_snp"
    plain = _Guest(tmp_path / "c", "plain", None, rtmr=False)
    _share_simulated_state(tmp_path / "c", plain.paths.share)
    sim = plain.tee()
    assert isinstance(sim, SimulatedTdx) and sim.kind == "tdx-simulated"
    # the plain guest's TEE state is a copy in its tmpfs (the share is read-only)
    assert (plain.paths.run / "home" / STATE_DIR_NAME).is_dir()


def test_tdx_falls_back_to_the_tdx_device_when_configfs_tsm_is_absent(tmp_path: Path) -> None:
    guest = _Guest(tmp_path, "tdx", None)
    guest.paths.tdx_device.parent.mkdir()
    guest.paths.tdx_device.write_bytes(b"")
    assert isinstance(guest.tee(), TdxPlatform)


@pytest.mark.parametrize(
    ("mode", "provider", "rtmr", "reason"),
    [
        ("tdx", None, True, "neither configfs-tsm"),  # no TD interface at all
        ("tdx", "sev_guest", True, "provider is 'sev_guest'"),  # an SNP guest told it is a TD
        ("tdx", "tdx_guest", False, "rtmr3:sha384 does not exist"),  # RTMR3 cannot be extended
        ("sev-snp", None, False, "configfs-tsm"),
        ("sev-snp", "tdx_guest", False, "provider is 'tdx_guest'"),
        ("plain", None, False, "simulated-tee"),  # plain without the shared simulated state
    ],
)
def test_a_mode_whose_device_is_absent_fails_and_never_falls_back_to_simulated(
    tmp_path: Path, mode: str, provider: str | None, rtmr: bool, reason: str
) -> None:
    guest = _Guest(tmp_path, mode, provider, rtmr=rtmr)
    # the simulated state IS shared: a silent fallback would find it
    if mode != "plain":
        _share_simulated_state(tmp_path, guest.paths.share)
    with pytest.raises(TeeUnavailable, match=reason):
        guest.tee()
    assert not (guest.paths.run / "home").exists()  # nothing of the simulated TEE was set up


def test_the_mode_comes_from_the_host_shared_config_strictly(tmp_path: Path) -> None:
    assert parse_sys_config(b'{"tee_mode": "sev-snp"}').tee_mode == "sev-snp"
    for bad in (b'{"tee_mode": "simulated"}', b'{"tee_mode": "TDX"}', b'{"tee_mode": 1}'):
        with pytest.raises(SysConfigError, match="tee_mode"):
            parse_sys_config(bad)
    with pytest.raises(TeeUnavailable, match="states no tee_mode"):
        guest_mode(parse_sys_config(b"{}"))
    with pytest.raises(TeeUnavailable, match=r"no \.sys-config\.json"):
        guest_mode(read_sys_config(tmp_path / "absent.json"))
    with pytest.raises(TeeUsageError, match="unknown TEE mode"):
        guest_tee("sev_snp", GuestTeePaths(share=tmp_path))


def test_the_guest_reports_its_tee_per_mode(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "app-compose.json").write_bytes(b"{}")
    assert read_info(share)["tee"].startswith("none (")
    for mode, word in (("tdx", "tdx"), ("sev-snp", "sev-snp"), ("plain", "simulated")):
        (share / ".sys-config.json").write_text(json.dumps({"tee_mode": mode}))
        assert word in read_info(share)["tee"].lower()
    (share / ".sys-config.json").write_text(json.dumps({"tee_mode": "tdx"}))
    assert "simulated" not in read_info(share)["tee"].lower()


def test_tdx_mode_extends_rtmr3_through_the_tdx_guest_sysfs_register(tmp_path: Path) -> None:
    guest = _Guest(tmp_path, "tdx", "tdx_guest")
    tee = guest.tee()
    assert isinstance(tee, TdxPlatform)
    tee.emit_event("compose-hash", b"\x07" * 32)
    rtmr3 = (guest.paths.tdx_measurements / "rtmr3:sha384").read_bytes()
    assert rtmr3 == runtime_event_digest("compose-hash", b"\x07" * 32)  # the fake records the write
    assert [e.event for e in tee.event_log()] == ["compose-hash"]


@pytest.mark.parametrize(("mode", "provider"), [("tdx", "tdx_guest"), ("sev-snp", "sev_guest")])
def test_an_attest_request_writes_the_report_data_the_agent_computed(
    tmp_path: Path, mode: str, provider: str
) -> None:
    """The host asks `/attest?nonce=N`; the guest computes sha512("teecloud-attest:" ‖ N) itself and that,
    exactly, is what reaches the kernel's configfs-tsm inblob (the host never chooses report_data)."""
    guest = _Guest(tmp_path, mode, provider)
    tee = guest.tee()

    def get_quote(report_data: bytes) -> dict[str, str]:
        quote = tee.quote(report_data)  # type: ignore[attr-defined]
        return {"quote": quote.hex(), "event_log": "[]", "report_data": report_data.hex(), "vm_config": "{}"}

    status = GuestStatus({"guest": "g", "compose_hash": "00" * 32, "tee": mode})
    status.attest = lambda rd: attest_document(get_quote, {"app_id": "ab" * 20}, rd)
    server = HTTPServer(("127.0.0.1", 0), make_handler(status.snapshot, lambda: status.attest))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        nonce = hashlib.sha256(b"host nonce").digest()
        r = httpx.get(f"http://127.0.0.1:{server.server_address[1]}/attest", params={"nonce": nonce.hex()})
        assert r.status_code == 200
        expected = attest_report_data(nonce)
        assert guest.inblobs == [expected]  # one report, over the agent's own value
        doc = r.json()
        assert doc["report_data"] == expected.hex() and doc["app_id"] == "ab" * 20
        if mode == "tdx":
            assert td_report_fields_from_quote(bytes.fromhex(doc["quote"]))["report_data"] == expected
        # the host's attempt to name report_data itself never reaches the kernel
        bad = httpx.get(
            f"http://127.0.0.1:{server.server_address[1]}/attest", params={"report_data": "00" * 64}
        )
        assert bad.status_code == 400 and len(guest.inblobs) == 1
    finally:
        server.shutdown()


def test_an_snp_guest_stops_at_measuring_and_its_reports_do_not_tell_boot_from_later(tmp_path: Path) -> None:
    """Why SNP gets no keys (docs/threat-model.md, "SEV-SNP and key release"): the guest cannot measure its
    boot (no runtime register), and a report taken after boot over bytes the app chose differs from the
    boot's only in REPORT_DATA, which the requester picks whole."""
    guest = _Guest(tmp_path, "sev-snp", "sev_guest", rtmr=False)
    tee = guest.tee()
    with pytest.raises(TeeUnavailable, match="no runtime measurement registers"):
        tee.emit_event("app-id", b"\x01" * 20)  # boot_guest's first step on SNP
    boot = tee.quote(hashlib.sha512(b"ratls-cert:" + b"the boot's key").digest())
    later = tee.quote(hashlib.sha512(b"ratls-cert:" + b"the attacker's key").digest())
    assert boot[:0x50] == later[:0x50] and boot[0x90:] == later[0x90:]  # everything but REPORT_DATA
    assert boot[0x50:0x90] != later[0x50:0x90]
