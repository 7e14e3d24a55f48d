"""The Intel DCAP quote layout: one home for its constants, used by the verifier and by the simulated TEE.

Intel TDX DCAP Quoting Library API, appendix A.3 "Version 4 Quote Format" and A.4 "Version 5"; Intel SGX
ECDSA Quote Library API, A.4 "Quote Format" (v3). Offsets inside a report body are in `TD10_FIELDS`,
`TD15_EXTRA` and `SGX_FIELDS` as (name, offset, size).
"""

from __future__ import annotations

__all__ = [
    "ATT_KEY_TYPE_ECDSA_P256",
    "ATT_KEY_TYPE_ECDSA_P384",
    "BODY_DESCRIPTOR_SIZE",
    "CERT_DATA_PCK_CHAIN",
    "CERT_DATA_QE_REPORT",
    "HEADER_SIZE",
    "QE_AUTH_DATA_SIZE",
    "QE_REPORT_SIZE",
    "QE_VENDOR_ID_INTEL",
    "QUOTE_SIGNATURE_SIZE",
    "SGX_ATTR_DEBUG",
    "SGX_FIELDS",
    "SGX_REPORT_DATA",
    "SGX_REPORT_SIZE",
    "TD10_FIELDS",
    "TD15EX_EXTRA",
    "TD15_EXTRA",
    "TD_ATTR_DEBUG",
    "TD_ATTR_SEPT_VE_DISABLE",
    "TD_REPORT10_SIZE",
    "TD_REPORT15EX_SIZE",
    "TD_REPORT15_SIZE",
    "TD_REPORT_DATA",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
]

HEADER_SIZE = 48
BODY_DESCRIPTOR_SIZE = 6  # quote v5: u16 body type, u32 body size
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
ATT_KEY_TYPE_ECDSA_P256 = 2
ATT_KEY_TYPE_ECDSA_P384 = 3
QE_VENDOR_ID_INTEL = bytes.fromhex("939A7233F79C4CA9940A0DB3957F0607")
TD_REPORT10_SIZE = 584
TD_REPORT15_SIZE = 648
TD_REPORT15EX_SIZE = 885
SGX_REPORT_SIZE = 384
QE_REPORT_SIZE = 384
QE_AUTH_DATA_SIZE = 32
QUOTE_SIGNATURE_SIZE = 64  # ECDSA P-256 r||s; the attestation key (64 bytes, x||y) follows it
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6

# TD attributes (Intel TDX ABI, TDREPORT_STRUCT / TD_PARAMS.ATTRIBUTES): bit 0 DEBUG, bit 28 SEPT_VE_DISABLE.
TD_ATTR_DEBUG = 1 << 0
TD_ATTR_SEPT_VE_DISABLE = 1 << 28
# SGX enclave ATTRIBUTES.FLAGS bit 1 = DEBUG (Intel SDM vol. 3D, 38.7.1).
SGX_ATTR_DEBUG = 0x02

# (name, offset, size) inside the TD report body; offsets per the quote v4 layout, table A.3.3.
TD10_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("tee_tcb_svn", 0, 16),
    ("mrseam", 16, 48),
    ("mrsignerseam", 64, 48),
    ("seam_attributes", 112, 8),
    ("td_attributes", 120, 8),
    ("xfam", 128, 8),
    ("mrtd", 136, 48),
    ("mr_config_id", 184, 48),
    ("mr_owner", 232, 48),
    ("mr_owner_config", 280, 48),
    ("rtmr0", 328, 48),
    ("rtmr1", 376, 48),
    ("rtmr2", 424, 48),
    ("rtmr3", 472, 48),
)
TD_REPORT_DATA = (520, 64)
# TD report 1.5 appends these (quote v5 body type 3, table A.4.4).
TD15_EXTRA: tuple[tuple[str, int, int], ...] = (("tee_tcb_svn2", 584, 16), ("mr_servicetd", 600, 48))
# TD report 1.5ex (quote v5 body type 4, Intel `sgx_quote_5.h` `sgx_report2_body_v1_5_ex_t`): the TD 1.5
# report, then these (the service TD bindings, the TD's identity and its initial TCB).
TD15EX_EXTRA: tuple[tuple[str, int, int], ...] = (
    ("vmid", 648, 1),
    ("td_id", 649, 32),
    ("dev_info", 681, 48),
    ("init_service_td_hash", 729, 48),
    ("init_service_td_attributes", 777, 8),
    ("init_cpu_svn", 785, 16),
    ("init_tee_tcb_svn", 801, 16),
    ("init_tee_fmspc", 817, 12),
    ("cur_service_td_hash", 829, 48),
    ("cur_service_td_attributes", 877, 8),
)
# SGX enclave report (table A.4.4 of the SGX ECDSA quote library API).
SGX_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("cpu_svn", 0, 16),
    ("misc_select", 16, 4),
    ("attributes", 48, 16),
    ("mr_enclave", 64, 32),
    ("mr_signer", 128, 32),
    ("isv_prod_id", 256, 2),
    ("isv_svn", 258, 2),
)
SGX_REPORT_DATA = (320, 64)
