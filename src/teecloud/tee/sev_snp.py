"""Real AMD SEV-SNP guest backend (Linux configfs-tsm, provider "sev_guest").

`quote(report_data)` returns the 1184-byte attestation report (AMD SEV-SNP ABI, "ATTESTATION_REPORT");
`certificates(report_data)` also returns the auxblob (the GUID-indexed certificate table the host supplied,
e.g. the VCEK), when present. SEV-SNP has no runtime-extendable measurement registers, so `extend_rtmr` and
`emit_event` raise TeeUnavailable rather than pretending: evidence for runtime events needs a vTPM/SVSM,
which this backend does not drive.
"""

from __future__ import annotations

from pathlib import Path

from teecloud.attestation.models import EventLogEntry
from teecloud.tee.configfs import DEFAULT_TSM_REPORT_ROOT, TsmFs, TsmReport
from teecloud.tee.errors import QuoteGenerationError, TeeUnavailable
from teecloud.tee.simulated import _check_report_data
from teecloud.tee.sysconfig import DEFAULT_SYS_CONFIG, HostToldIdentity

__all__ = ["SNP_REPORT_LEN", "SevSnpPlatform"]

TSM_PROVIDER_SNP = "sev_guest"
SNP_REPORT_LEN = 0x4A0  # 1184
_REPORT_DATA_AT = 0x50
_MEASUREMENT_AT = 0x90


class SevSnpPlatform(HostToldIdentity):
    """An SEV-SNP guest (implements `teecloud.tee.base.TeePlatform` as far as SNP can)."""

    def __init__(
        self,
        *,
        tsm_root: Path = DEFAULT_TSM_REPORT_ROOT,
        fs: TsmFs | None = None,
        sys_config: Path = DEFAULT_SYS_CONFIG,
    ) -> None:
        self.tsm_root = Path(tsm_root)
        self.sys_config_path = Path(sys_config)
        self._tsm = TsmReport(self.tsm_root, expected_provider=TSM_PROVIDER_SNP, fs=fs)

    @property
    def kind(self) -> str:
        return "sev_snp"

    def sealing_secret(self) -> bytes:
        # SNP can derive one (MSG_KEY_REQ through /dev/sev-guest, bound to the launch measurement); teecloud
        # does not ask for it yet.
        raise TeeUnavailable("SEV-SNP sealing keys (MSG_KEY_REQ) are not supported by teecloud yet")

    def _report(self, report_data: bytes, *, aux: bool) -> tuple[bytes, bytes | None]:
        rd = _check_report_data(report_data)
        result = self._tsm.get(rd, want_auxblob=aux)
        report = result.outblob
        if len(report) < SNP_REPORT_LEN:
            raise QuoteGenerationError(f"SEV-SNP report is {len(report)} bytes, expected {SNP_REPORT_LEN}")
        if report[_REPORT_DATA_AT : _REPORT_DATA_AT + 64] != rd:
            raise QuoteGenerationError("the SEV-SNP report does not carry the requested report_data")
        return report, result.auxblob

    def quote(self, report_data: bytes) -> bytes:
        return self._report(report_data, aux=False)[0]

    def certificates(self, report_data: bytes) -> tuple[bytes, bytes | None]:
        """(report, auxblob certificate table or None)."""
        return self._report(report_data, aux=True)

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        raise TeeUnavailable("SEV-SNP has no runtime measurement registers (RTMRs) to extend")

    def emit_event(self, name: str, payload: bytes) -> None:
        raise TeeUnavailable(
            "SEV-SNP has no runtime measurement registers: runtime events cannot be measured"
        )

    def event_log(self) -> list[EventLogEntry]:
        return []

    def measurements(self) -> dict[str, bytes]:
        report = self.quote(bytes(64))
        return {"measurement": report[_MEASUREMENT_AT : _MEASUREMENT_AT + 48]}
