"""The boot-time rule decided on what the quote signs (issue 16, F9), and the binding of a key request to one
boot.

F9, the attacker's exact steps: after a normal boot, anyone who reaches the app's quote oracle (GetQuote raw,
an app's /quote route) gets a quote binding their key K; in the returned event log they relabel every RTMR3
entry after `boot-mr-done` with another event_type (or move it to RTMR0-2), digests unchanged, so RTMR3 still
replays; they put quote and log into a certificate for K under the KMS's public temporary CA and call
GetAppKey / SignCert. Then the mutation property: thousands of generated log mutations around a genuine
post-boot and a genuine boot-time evidence; only the unmodified boot-time log of a genuine boot is accepted,
by GetAppKey, SignCert and the shared peer verifier alike.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.agent.boot import boot
from teecloud.agent.service import AgentService
from teecloud.appcompose import compose_hash
from teecloud.attestation.eventlog import RUNTIME_EVENT_TYPE, runtime_event_digest
from teecloud.keys.certs import issue_cert, spki_der
from teecloud.keys.ratls import (
    OID_APP_ID,
    OID_CERT_USAGE,
    OID_EVENT_LOG,
    OID_QUOTE,
    _ext,
    event_log_json,
    ratls_report_data,
)
from teecloud.kms.api import PATH_GET_APP_KEY, PATH_SIGN_CERT
from teecloud.kms.challenge import BootChallenges
from teecloud.kms.client import KmsClient, ratls_server_check, vm_config_json
from teecloud.kms.errors import AccessDenied
from teecloud.kms.server import KmsServer
from teecloud.peer import PeerRejected, require_boot_time
from teecloud.tee.simulated import SimulatedTdx
from tests.kms.conftest import (
    COMPOSE_V1,
    Kms,
    World,
    assert_nothing_released,
    boot_app,
    harness_challenges,
    make_kms,
    post_with_cert,
)
from tests.kms.test_quote_oracle import HELLO, GetQuoteOracle, csr_pem

RUNTIME = RUNTIME_EVENT_TYPE


def cert_with_log(
    kms: Kms, key: ec.EllipticCurvePrivateKey, quote: bytes, log_text: str, app_id: bytes
) -> bytes:
    """A certificate for `key` under the KMS's public temporary CA carrying `quote` and the log text as is
    (what an attacker can write: any bytes in the event-log extension)."""
    now = int(time.time()) - 30
    cert = issue_cert(
        key.public_key(),
        issuer_key=kms.service.state.temp_ca_key,
        issuer_name=kms.service.state.temp_ca_cert.subject,
        subject_cn="teecloud app",
        not_before=now,
        not_after=now + 600,
        server_auth=False,
        client_auth=True,
        extra_extensions=[
            _ext(OID_QUOTE, quote),
            _ext(OID_EVENT_LOG, log_text.encode("utf-8", "surrogatepass")),
            _ext(OID_APP_ID, app_id),
            _ext(OID_CERT_USAGE, b"app:kms-client"),
        ],
    )
    return cert.public_bytes(serialization.Encoding.DER)


def booted_app(teecloud_home: Path, world: World, server: KmsServer, kms: Kms) -> tuple[bytes, AgentService]:
    """examples/hello booted the normal way (the guest's boot() with the KMS client): it got its keys."""
    app_id = world.register(compose_hash(HELLO))
    tee = SimulatedTdx(teecloud_home)
    check = ratls_server_check(
        collateral_for=lambda quote, now: kms.tee.collateral(),
        dev_root_der=kms.tee.dev_root_der(),
        expected_ca_pubkey_der=kms.service.keys.ca_public_key_der,
    )
    state = boot(
        tee,
        json.dumps(HELLO),
        app_id,
        None,
        KmsClient(server.url, server_check=check),
        extra_events=[("os-image-hash", tee.os_image_hash)],
    )
    assert kms.audit.read()[-1].decision == "allowed"
    return app_id, AgentService(state)


def oracle_evidence(
    agent: AgentService, key: ec.EllipticCurvePrivateKey
) -> tuple[bytes, list[dict[str, Any]]]:
    """Step 1: a quote binding K from the running app's GetQuote, with the log it returns."""
    oracle = GetQuoteOracle(agent)
    quote = oracle.quote(ratls_report_data(spki_der(key.public_key())))
    return quote, [e.to_json() for e in oracle.event_log()]


def post_boot_indices(entries: list[dict[str, Any]]) -> list[int]:
    rtmr3 = [i for i, e in enumerate(entries) if e["imr"] == 3]
    done = next(i for i in rtmr3 if entries[i]["event"] == "boot-mr-done")
    return [i for i in rtmr3 if i > done]


# ------------------------------------------------------------------------------------- F9: exact steps


@pytest.mark.parametrize("new_type", [0, 1, 0x80000001, 0x08000002, 0xFFFFFFFF])
def test_f9_relabelled_post_boot_events_release_nothing(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer, new_type: int
) -> None:
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    key = ec.generate_private_key(ec.SECP256R1())
    quote, entries = oracle_evidence(agent, key)
    later = post_boot_indices(entries)
    assert [entries[i]["event"] for i in later][:2] == ["os-image-hash", "key-provider"] or later
    # Step 2: relabel every RTMR3 entry after boot-mr-done; digests unchanged, so RTMR3 still replays.
    for i in later:
        if entries[i]["event"] != "os-image-hash":
            entries[i]["event_type"] = new_type
    der = cert_with_log(kms, key, quote, json.dumps(entries), app_id)
    # Step 3: GetAppKey and SignCert over real mutual TLS.
    vm = vm_config_json(SimulatedTdx(teecloud_home))
    status, body = post_with_cert(server.url, PATH_GET_APP_KEY, key, der, {"vm_config": vm})
    assert status == 403, body
    assert_nothing_released(body)
    assert body["step"] == "event_log_verified", body
    assert "RTMR3 holds only runtime events" in body["reason"]
    status, body = post_with_cert(
        server.url, PATH_SIGN_CERT, key, der, {"csr": csr_pem(key), "vm_config": vm}
    )
    assert status == 403 and "certificate_chain" not in body, body
    assert kms.audit.read()[-1].decision == "denied"


@pytest.mark.parametrize("imr", [0, 1, 2])
def test_f9_post_boot_events_moved_to_rtmr0_2_release_nothing(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer, imr: int
) -> None:
    """The same entries moved to RTMR0-2 (kept as runtime events): RTMR3 no longer replays, and RTMR0-2 do
    not either; whatever a log says about RTMR0-2 decides nothing."""
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    key = ec.generate_private_key(ec.SECP256R1())
    quote, entries = oracle_evidence(agent, key)
    for i in post_boot_indices(entries):
        if entries[i]["event"] != "os-image-hash":
            entries[i]["imr"] = imr
    der = cert_with_log(kms, key, quote, json.dumps(entries), app_id)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=vm_config_json(SimulatedTdx(teecloud_home)))
    assert err.value.step == "event_log_verified"
    assert "does not match the quote" in err.value.reason


def test_the_oracle_quote_with_its_own_log_is_not_boot_time(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    """Unmodified, the post-boot evidence is refused on the register: RTMR3 goes past the boot grammar."""
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    key = ec.generate_private_key(ec.SECP256R1())
    quote, entries = oracle_evidence(agent, key)
    der = cert_with_log(kms, key, quote, json.dumps(entries), app_id)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=vm_config_json(SimulatedTdx(teecloud_home)))
    assert err.value.step == "boot_time"
    assert "past the boot measurement" in err.value.reason


# --------------------------------------------------------------------------- bound to one boot (step 4)


def genuine_boot(
    teecloud_home: Path, app_id: bytes, nonce: bytes
) -> tuple[SimulatedTdx, ec.EllipticCurvePrivateKey, bytes, str]:
    """A CVM at its boot measurement with `nonce` as boot-nonce, and its RA-TLS key's boot-time evidence."""
    tee = SimulatedTdx(teecloud_home)
    iid = bytes.fromhex("ab" * 20)
    boot_app(tee, app_id, COMPOSE_V1, iid, boot_nonce=nonce)
    key = ec.generate_private_key(ec.SECP256R1())
    quote = tee.quote(ratls_report_data(spki_der(key.public_key())))
    return tee, key, quote, event_log_json(tee.event_log())


def test_a_captured_boot_time_quote_is_useless_after_its_window(teecloud_home: Path, world: World) -> None:
    now = [time.time()]
    challenges = BootChallenges(window_s=600, clock=lambda: now[0])
    kms = make_kms(teecloud_home, world.chain)
    kms.service.challenges = kms.service.authz.challenges = challenges
    app_id = world.register(COMPOSE_V1)
    tee, key, quote, log = genuine_boot(teecloud_home, app_id, challenges.issue())
    der = cert_with_log(kms, key, quote, log, app_id)
    vm = vm_config_json(tee)
    assert kms.service.get_app_key(der, vm_config=vm).app_id == app_id.hex()  # the boot itself
    now[0] += 601  # `teecloud stop; teecloud start` later: the saved quote and key are replayed
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=vm)
    assert err.value.step == "boot_nonce" and "issued 601 s ago" in err.value.reason


def test_a_boot_nonce_counts_its_requests(teecloud_home: Path, world: World) -> None:
    kms = make_kms(teecloud_home, world.chain)
    app_id = world.register(COMPOSE_V1)
    tee, key, quote, log = genuine_boot(teecloud_home, app_id, harness_challenges().issue())
    der = cert_with_log(kms, key, quote, log, app_id)
    for _ in range(kms.service.challenges.max_uses):
        kms.service.get_app_key(der, vm_config=vm_config_json(tee))
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=vm_config_json(tee))
    assert err.value.step == "boot_nonce" and "already made" in err.value.reason


@pytest.mark.parametrize(
    "nonce",
    [
        pytest.param(lambda: BootChallenges().issue(), id="another-kms-or-before-a-restart"),
        pytest.param(lambda: harness_challenges().issue()[:-1] + b"\x00", id="forged-mac"),
        pytest.param(lambda: b"\x01" * 65, id="made-up"),
        pytest.param(lambda: b"\x01" * 64, id="wrong-size"),
        pytest.param(None, id="no-boot-nonce"),
    ],
)
def test_only_a_fresh_challenge_of_this_kms_binds_a_boot(
    teecloud_home: Path, world: World, nonce: Callable[[], bytes] | None
) -> None:
    kms = make_kms(teecloud_home, world.chain)
    app_id = world.register(COMPOSE_V1)
    tee = SimulatedTdx(teecloud_home)
    if nonce is None:  # dstack's grammar without a boot-nonce: genuine, but bound to no boot
        for name, payload in [
            ("system-preparing", b""),
            ("app-id", app_id),
            ("compose-hash", COMPOSE_V1),
            ("instance-id", bytes(20)),
            ("boot-mr-done", b""),
            ("os-image-hash", tee.os_image_hash),
        ]:
            tee.emit_event(name, payload)
    else:
        boot_app(tee, app_id, COMPOSE_V1, bytes(20), boot_nonce=nonce())
    key = ec.generate_private_key(ec.SECP256R1())
    quote = tee.quote(ratls_report_data(spki_der(key.public_key())))
    der = cert_with_log(kms, key, quote, event_log_json(tee.event_log()), app_id)
    with pytest.raises(AccessDenied) as err:
        kms.service.get_app_key(der, vm_config=vm_config_json(tee))
    assert err.value.step == "boot_nonce", err.value.reason


# ------------------------------------------------------------------------------ the mutation property


_NAMES = [
    "system-preparing",
    "app-id",
    "compose-hash",
    "instance-id",
    "boot-nonce",
    "boot-mr-done",
    "os-image-hash",
    "key-provider",
    "system-ready",
    "mr-kms",
    "",
    "BOOT-MR-DONE",
    "boot-mr-done ",
    "boot\u2010mr-done",
]


def _hexes(rng: random.Random, value: str) -> list[Any]:
    return [
        value.upper() if value else "AB",
        value + "0",
        value[:-2] if value else "00",
        "0x" + value,
        rng.randbytes(rng.choice([0, 1, 20, 32, 47, 48, 49])).hex(),
        None,
        1,
    ]


def mutate(rng: random.Random, entries: list[dict[str, Any]]) -> tuple[str, bool]:
    """One generated mutation of the log: (JSON text, whether it can differ from the original log)."""
    e = copy.deepcopy(entries)
    rtmr3 = [i for i, x in enumerate(e) if x["imr"] == 3]
    op = rng.randrange(16)
    i = rng.choice(rtmr3) if rng.random() < 0.8 else rng.randrange(len(e))
    if op == 0:
        e[i]["event_type"] = rng.choice([0, 1, 4, RUNTIME + 1, 0x80000001, 0xFFFFFFFF, 2**32, -1, True, 1.5])
    elif op == 1:
        e[i]["imr"] = rng.choice([0, 1, 2, 4, -1, True, 3.0, "3", None])
    elif op == 2:  # relabel, digest recomputed: the entry is self-consistent, the register is not
        name = rng.choice(_NAMES)
        e[i]["event"] = name
        e[i]["digest"] = runtime_event_digest(name, bytes.fromhex(e[i]["event_payload"])).hex()
    elif op == 3:
        payload = rng.randbytes(rng.choice([0, 1, 20, 32, 65]))
        e[i]["event_payload"] = payload.hex()
        if rng.random() < 0.7:
            e[i]["digest"] = runtime_event_digest(e[i]["event"], payload).hex()
    elif op == 4:
        e[i]["digest"] = rng.choice(_hexes(rng, e[i]["digest"]))
    elif op == 5:
        e[i]["event_payload"] = rng.choice(_hexes(rng, e[i]["event_payload"]))
    elif op == 6:
        del e[i]
    elif op == 7:
        e.insert(i, copy.deepcopy(e[i]))
    elif op == 8:
        j = rng.randrange(len(e))
        e[i], e[j] = e[j], e[i]
    elif op == 9:  # a fake boot-mr-done (or another event) inserted anywhere, correct digest
        name = rng.choice(["boot-mr-done", "system-preparing", "boot-nonce", "app-id"])
        fake = {
            "imr": rng.choice([3, 3, 3, 0, 1, 2]),
            "event_type": RUNTIME,
            "digest": runtime_event_digest(name, b"").hex(),
            "event": name,
            "event_payload": "",
        }
        e.insert(rng.randrange(len(e) + 1), fake)
    elif op == 10:
        e[i][rng.choice(["extra", "imr ", "Event", "digest2"])] = rng.choice([0, "", None, []])
    elif op == 11:
        del e[i][rng.choice(list(e[i]))]
    elif op == 12:  # other encodings of a number
        text = json.dumps(e)
        field = rng.choice(["imr", "event_type"])
        value = e[i][field]
        enc = rng.choice(
            [f"{value}.0", f"{value}e0", f'"{value}"', f'"{value:#x}"', f"0{value}", f"-{value}"]
        )
        marker = json.dumps(e[i])
        new = marker.replace(f'"{field}": {json.dumps(value)}', f'"{field}": {enc}', 1)
        return text.replace(marker, new, 1), value != 0 or enc not in ("-0",)
    elif op == 13:  # a duplicate key: Python reads the last value, other readers the first
        text = json.dumps(e)
        marker = json.dumps(e[i])
        field = rng.choice(["imr", "event_type", "event", "digest", "event_payload"])
        dup = marker.replace("{", "{" + json.dumps(field) + ": " + json.dumps(e[i][field]) + ", ", 1)
        return text.replace(marker, dup, 1), True
    elif op == 14:  # NaN / non-standard JSON / a truncated document
        text = json.dumps(e)
        return rng.choice([text.replace("3,", "NaN,", 1), text[:-1], text + "]", "{" + text[1:]]), True
    else:  # a no-op re-encoding: other whitespace and key order, same log
        return json.dumps([dict(reversed(list(x.items()))) for x in e], indent=rng.choice([None, 1])), False
    return json.dumps(e), _decides(e) != _decides(entries)


def _well_formed(x: dict[str, Any]) -> bool:
    """dstack's entry shape, written out here independently of the parser under test."""
    hexdigits = set("0123456789abcdef")
    return (
        set(x) == {"imr", "event_type", "digest", "event", "event_payload"}
        and type(x["imr"]) is int
        and 0 <= x["imr"] <= 3
        and type(x["event_type"]) is int
        and 0 <= x["event_type"] < 2**32
        and type(x["digest"]) is str
        and len(x["digest"]) == 96
        and set(x["digest"]) <= hexdigits
        and type(x["event_payload"]) is str
        and len(x["event_payload"]) % 2 == 0
        and set(x["event_payload"]) <= hexdigits
        and type(x["event"]) is str
    )


def _decides(entries: list[dict[str, Any]]) -> Any:
    """What may decide a release: each register's digest sequence, and RTMR3's events in full. RTMR0-2
    entries' labels (type, name, payload) decide nothing once well-formed, and how the registers' entries
    interleave in the log changes no register, so changing those is no change."""
    if not all(_well_formed(x) for x in entries):
        return None
    return tuple(
        tuple(
            (x["digest"], x["event_type"], x["event"], x["event_payload"]) if imr == 3 else x["digest"]
            for x in entries
            if x["imr"] == imr
        )
        for imr in range(4)
    )


MUTATIONS_PER_BASE = 2500


def test_only_the_unmodified_boot_time_log_of_a_genuine_boot_is_accepted(
    teecloud_home: Path, world: World, kms: Kms, server: KmsServer
) -> None:
    kms.service.challenges.max_uses = 10**6  # one genuine boot replayed by this test many times
    # Base A: genuine post-boot evidence (the oracle's). Base B: a genuine boot-time evidence.
    app_id, agent = booted_app(teecloud_home, world, server, kms)
    key_a = ec.generate_private_key(ec.SECP256R1())
    quote_a, log_a = oracle_evidence(agent, key_a)
    b_app = world.register(COMPOSE_V1)
    tee_b, key_b, quote_b, text_b = genuine_boot(teecloud_home, b_app, harness_challenges().issue())
    log_b = json.loads(text_b)
    vm = vm_config_json(tee_b)
    assert kms.service.get_app_key(cert_with_log(kms, key_b, quote_b, text_b, b_app), vm_config=vm)

    rng = random.Random(int.from_bytes(quote_b[-8:], "big"))  # a new seed every run; printed on failure
    seed = rng.getstate()[1][0]
    accepted = {"A": 0, "B": 0}
    for base, key, quote, log, aid in (
        ("A", key_a, quote_a, log_a, app_id),
        ("B", key_b, quote_b, log_b, b_app),
    ):
        for n in range(MUTATIONS_PER_BASE):
            text, changed = mutate(rng, log)
            der = cert_with_log(kms, key, quote, text, aid)
            should = base == "B" and not changed
            try:
                kms.service.get_app_key(der, vm_config=vm)
                ok = True
            except AccessDenied:
                ok = False
            assert ok == should, f"base {base} mutation #{n} (seed {seed}) accepted={ok}: {text[:2000]}"
            accepted[base] += ok
            if n % 25 == 0:  # SignCert and the shared peer verifier (the gateway's) on a sample
                try:
                    kms.service.sign_cert(der, csr_pem(key), vm_config=vm)
                    signed = True
                except AccessDenied:
                    signed = False
                assert signed == should, f"SignCert, base {base} mutation #{n}: {text[:2000]}"
                try:
                    require_boot_time(kms.service.peers.verify_cert(der))
                    peer_ok = True
                except PeerRejected:
                    peer_ok = False
                assert peer_ok == (base == "B" and not changed), f"peer, base {base} #{n}: {text[:2000]}"
    assert accepted["A"] == 0
    assert accepted["B"] > 0  # the no-op re-encodings of the genuine log still work


def test_mutations_cover_every_kind(teecloud_home: Path) -> None:
    """The generator reaches each mutation kind and changes the log (so the property test is not vacuous)."""
    tee = SimulatedTdx(teecloud_home)
    boot_app(tee, b"\x01" * 20, COMPOSE_V1, b"\x02" * 20)
    log = json.loads(event_log_json(tee.event_log()))
    rng = random.Random(7)
    changed = sum(mutate(rng, log)[1] for _ in range(2000))
    assert changed > 1800


# ------------------------------------------------------------------- KMS onboarding: one boot, first use


def test_onboarding_evidence_is_useless_after_its_first_use_window(tmp_path: Path) -> None:
    """GetKmsKey has no boot-nonce (KmsAuth pins the KMS's whole measurement): its evidence's binding is
    remembered at first use, across restarts of the source KMS, and refused after the window or the count."""
    from teecloud.kms.challenge import FirstUseLedger

    now = [1_800_000_000.0]
    path = tmp_path / "onboarding-ledger.json"
    ledger = FirstUseLedger(path, window_s=600, max_uses=2, clock=lambda: now[0])
    binding = b"\x07" * 64
    ledger.redeem(binding)
    ledger.redeem(binding)
    with pytest.raises(AccessDenied, match="already used 2 times"):
        ledger.redeem(binding)
    other = b"\x08" * 64
    ledger.redeem(other)
    now[0] += 601
    restarted = FirstUseLedger(path, window_s=600, max_uses=2, clock=lambda: now[0])  # a restart remembers
    with pytest.raises(AccessDenied, match="first used 601 s ago") as err:
        restarted.redeem(other)
    assert err.value.step == "boot_nonce"
    restarted.redeem(b"\x09" * 64)  # a new boot's evidence is served
    path.write_text("{not json")
    with pytest.raises(AccessDenied, match="unreadable"):
        FirstUseLedger(path).redeem(b"\x0a" * 64)  # fail closed, never a fresh start


def test_challenge_ledger_is_bounded_and_makes_room_from_expired_boots() -> None:
    now = [1_800_000_000.0]
    ch = BootChallenges(window_s=600, max_entries=2, clock=lambda: now[0])
    a, b = ch.issue(), ch.issue()
    ch.redeem(a)
    ch.redeem(b)
    with pytest.raises(AccessDenied, match="too many boots"):
        ch.redeem(ch.issue())  # full of boots still inside their window
    now[0] += 601
    c = ch.issue()
    ch.redeem(c)  # the expired boots' room is reused
    with pytest.raises(AccessDenied, match="issued 601 s ago"):
        ch.redeem(a)  # and an expired boot stays refused
