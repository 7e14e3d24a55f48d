"""A published quote per certificate key: the binding, the document, the checker (genuine passes; another
key's quote, a stale document, an unbound quote, another app's quote, tampered quotes, simulated evidence
under a production policy, malformed documents: refused with a reason), and the gateway serving it."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import pytest
import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teecloud.chain import ChainClient
from teecloud.gateway.certkeys import (
    CERT_KEY_PURPOSE,
    CertKeyPublisher,
    CertKeyRefused,
    cert_key_report_data,
    check_cert_key,
    parse_document,
)
from teecloud.gateway.devca import DevCa
from teecloud.peer import PeerPolicy, PeerVerifier, StaticCollateral
from teecloud.tee.simulated import SimulatedTdx
from tests.gateway.test_registration import chain, make_gateway

__all__ = ["chain"]  # the module-scoped embedded chain fixture of the registration tests

BASE = "teecloud.localhost"


def _der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


@pytest.fixture
def tee(teecloud_home: Path) -> SimulatedTdx:
    return SimulatedTdx(teecloud_home)


@pytest.fixture
def verifier(tee: SimulatedTdx) -> PeerVerifier:
    return PeerVerifier(PeerPolicy.dev(tee.dev_root_der()), StaticCollateral(tee.collateral))


@pytest.fixture
def ca() -> DevCa:
    return DevCa(now=int(time.time()))


def _wildcard(ca: DevCa) -> str:
    return ca.issue_wildcard(BASE, now=int(time.time())).cert_pem


def test_binding_is_the_jcs_construction() -> None:
    digest = bytes(range(32))
    expected = hashlib.sha256(
        b'{"purpose":"teecloud:gateway-cert-key","spki_sha256":"' + digest.hex().encode() + b'"}'
    ).digest()
    assert cert_key_report_data(digest) == expected + bytes(32)
    assert (
        hashlib.sha256(rfc8785.dumps({"spki_sha256": digest.hex(), "purpose": CERT_KEY_PURPOSE})).digest()
        == expected
    )
    assert cert_key_report_data(bytes(32)) != cert_key_report_data(b"\x01" + bytes(31))


def test_genuine_key_passes_and_is_labelled_simulated(
    tee: SimulatedTdx, verifier: PeerVerifier, ca: DevCa
) -> None:
    pem = _wildcard(ca)
    pub = CertKeyPublisher(tee)
    pub.publish("public", pem, (f"*.{BASE}", BASE))
    verdict = check_cert_key(_der(pem), pub.document(), verifier)
    assert verdict.role == "public"
    assert verdict.simulated and verdict.tee == "tdx-simulated"
    assert verdict.tcb_status == "UpToDate"


def test_stale_document_after_a_new_key_is_refused(
    tee: SimulatedTdx, verifier: PeerVerifier, ca: DevCa
) -> None:
    old, new = _wildcard(ca), _wildcard(ca)
    pub = CertKeyPublisher(tee)
    pub.publish("public", old)
    stale = pub.document()
    with pytest.raises(CertKeyRefused) as err:
        check_cert_key(_der(new), stale, verifier)
    assert err.value.step == "published" and "stale" in err.value.reason
    pub.publish("public", new)  # the renewed key replaces the old entry
    assert check_cert_key(_der(new), pub.document(), verifier).role == "public"
    with pytest.raises(CertKeyRefused):
        check_cert_key(_der(old), pub.document(), verifier)


def _doc(entries: list[dict[str, object]]) -> bytes:
    return json.dumps({"purpose": CERT_KEY_PURPOSE, "keys": entries}).encode()


def test_quote_for_another_key_is_refused(tee: SimulatedTdx, verifier: PeerVerifier, ca: DevCa) -> None:
    presented, other = _wildcard(ca), _wildcard(ca)
    pub = CertKeyPublisher(tee)
    entry = pub.publish("public", other).to_json()
    # the attacker relabels the other key's entry with the presented key's hash
    entry["spki_sha256"] = hashlib.sha256(
        x509.load_pem_x509_certificate(presented.encode())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest()
    with pytest.raises(CertKeyRefused) as err:
        check_cert_key(_der(presented), _doc([entry]), verifier)
    assert err.value.step == "binding"


def test_unbound_quote_is_refused(tee: SimulatedTdx, verifier: PeerVerifier, ca: DevCa) -> None:
    """A genuine quote whose report_data is the bare SPKI hash (no purpose label), or anything else chosen."""
    pem = _wildcard(ca)
    entry = CertKeyPublisher(tee).publish("public", pem).to_json()
    digest = bytes.fromhex(str(entry["spki_sha256"]))
    for report_data in (digest, hashlib.sha512(b"ratls-cert:" + digest).digest(), bytes(64)):
        entry["quote"] = tee.quote(report_data).hex()
        with pytest.raises(CertKeyRefused) as err:
            check_cert_key(_der(pem), _doc([entry]), verifier)
        assert err.value.step == "binding"


def test_another_apps_quote_is_refused_when_the_app_is_pinned(
    teecloud_home: Path, verifier: PeerVerifier, ca: DevCa
) -> None:
    """Any app can get a quote over chosen bytes (GetQuote): one binding the presented key under our label
    passes the binding, so the checker shows the measured app and `expected_app_id` refuses a stranger."""
    stranger = SimulatedTdx(teecloud_home)
    stranger.emit_event("app-id", b"\xee" * 20)
    pem = _wildcard(ca)
    pub = CertKeyPublisher(stranger)
    pub.publish("public", pem)
    verdict = check_cert_key(_der(pem), pub.document(), verifier)
    assert verdict.app_id == "ee" * 20
    with pytest.raises(CertKeyRefused) as err:
        check_cert_key(_der(pem), pub.document(), verifier, expected_app_id=b"\x11" * 20)
    assert err.value.step == "app" and "ee" * 20 in err.value.reason


def test_simulated_quote_refused_by_a_production_policy(tee: SimulatedTdx, ca: DevCa) -> None:
    pem = _wildcard(ca)
    pub = CertKeyPublisher(tee)
    pub.publish("public", pem)
    production = PeerVerifier(PeerPolicy.production(), StaticCollateral(tee.collateral))
    with pytest.raises(CertKeyRefused) as err:
        check_cert_key(_der(pem), pub.document(), production)
    assert err.value.step == "quote"


def test_tampered_quotes_are_refused(tee: SimulatedTdx, verifier: PeerVerifier, ca: DevCa) -> None:
    """Generated mutations of the signed part of the quote (header, TD report body, ECDSA signature)."""
    pem = _wildcard(ca)
    entry = CertKeyPublisher(tee).publish("public", pem).to_json()
    quote = bytes.fromhex(str(entry["quote"]))
    rng = random.Random(18)
    signed = list(range(0, 632)) + list(range(636, 636 + 64))  # header + body, then the signature
    for pos in rng.sample(signed, 40):
        bad = bytearray(quote)
        bad[pos] ^= 1 << rng.randrange(8)
        entry["quote"] = bytes(bad).hex()
        with pytest.raises(CertKeyRefused):
            check_cert_key(_der(pem), _doc([entry]), verifier)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: b"not json",
        lambda d: json.dumps({**json.loads(d), "extra": 1}).encode(),
        lambda d: json.dumps({**json.loads(d), "purpose": "other"}).encode(),
        lambda d: json.dumps({**json.loads(d), "keys": json.loads(d)["keys"] * 17}).encode(),
        lambda d: d.replace(b'"role":"public"', b'"role":"admin"'),
        lambda d: d.replace(b'"not_after":', b'"not_after":"x", "y":'),
        lambda d: d.replace(b'"quote":"', b'"quote":"zz'),
        lambda d: d.replace(b'"spki_sha256":"', b'"spki_sha256":"00'),
        lambda d: json.dumps({"purpose": CERT_KEY_PURPOSE, "keys": [{"role": "public"}]}).encode(),
        lambda d: b" " * (1 << 20) + d,
    ],
)
def test_malformed_documents_are_refused(
    mutate: object, tee: SimulatedTdx, verifier: PeerVerifier, ca: DevCa
) -> None:
    pem = _wildcard(ca)
    pub = CertKeyPublisher(tee)
    pub.publish("public", pem)
    bad = mutate(pub.document())  # type: ignore[operator]
    with pytest.raises(CertKeyRefused) as err:
        check_cert_key(_der(pem), bad, verifier)
    assert err.value.step == "published"
    if bad.startswith(b"{"):
        with pytest.raises(CertKeyRefused):
            parse_document(bad)


def test_generated_document_mutations_never_escape(
    tee: SimulatedTdx, verifier: PeerVerifier, ca: DevCa
) -> None:
    """Random byte edits, truncations and deep nesting: a CertKeyRefused or, when only informational bytes
    changed, a pass whose binding still holds; never another exception."""
    pem = _wildcard(ca)
    pub = CertKeyPublisher(tee)
    pub.publish("public", pem)
    genuine = pub.document()
    rng = random.Random(1818)
    inputs = [
        b"[" * 100_000,  # deeper than the C stack allows once py-evm raised the recursion limit
        b'"\\"' * 300_000,  # quadratic for a regex skipping strings
        b'["' + b"[" * 1000 + b'"]',  # brackets in a string do not nest
        b'{"purpose":' * 50_000,
        genuine[: len(genuine) // 2],
        b"\xff\xfe" + genuine,
    ]
    for _ in range(150):
        bad = bytearray(genuine)
        for _ in range(rng.randrange(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        inputs.append(bytes(bad))
    passed = 0
    for data in inputs:
        try:
            verdict = check_cert_key(_der(pem), data, verifier)
        except CertKeyRefused:
            continue
        passed += 1
        assert verdict.spki_sha256 == json.loads(genuine)["keys"][0]["spki_sha256"]
    assert passed < len(inputs) // 2


def test_not_a_certificate_is_refused(tee: SimulatedTdx, verifier: PeerVerifier) -> None:
    with pytest.raises(CertKeyRefused) as err:
        check_cert_key(b"\x30\x03\x02\x01\x00", CertKeyPublisher(tee).document(), verifier)
    assert err.value.step == "presented"


# ---------------------------------------------------------------------------------------- through a gateway


@pytest.mark.slow
def test_gateway_publishes_a_quote_for_each_certificate_key(
    teecloud_home: Path, chain: ChainClient, tee: SimulatedTdx, verifier: PeerVerifier
) -> None:
    from teecloud.gateway.certkeys import CERT_KEYS_PATH, fetch_document, presented_cert

    with make_gateway(teecloud_home, chain, tee=tee) as gw:
        document = fetch_document(gw.registration_url + CERT_KEYS_PATH)
        assert {k.role for k in parse_document(document)} == {"public", "registration", "dev-ca"}
        # the public port (HAProxy) presents the wildcard, under any route name of the base domain
        public = presented_cert("127.0.0.1", gw.public_port, server_name=f"{'ab' * 20}-8080.{BASE}")
        assert check_cert_key(public, document, verifier).role == "public"
        registration = presented_cert("127.0.0.1", gw.registration_port)
        assert check_cert_key(registration, document, verifier).role == "registration"
        # the CLI: the same check from outside, exit 0 / 1 with the step
        from typer.testing import CliRunner

        from teecloud.cli import app

        args = ["gateway", "check-cert", f"127.0.0.1:{gw.public_port}", "--server-name", f"x.{BASE}"]
        args += ["--keys", gw.registration_url + CERT_KEYS_PATH, "--trust-dev-root", "--json"]
        ok = CliRunner().invoke(app, args)
        assert ok.exit_code == 0, ok.output
        assert json.loads(ok.stdout.strip().splitlines()[-1])["role"] == "public"
        pinned = CliRunner().invoke(app, [*args, "--app-id", "11" * 20])
        assert pinned.exit_code == 1
        assert json.loads(pinned.stdout.strip().splitlines()[-1])["step"] == "app"
        human = CliRunner().invoke(app, args[:-1])
        assert (
            human.exit_code == 0
            and "SIMULATED TEE" in human.stdout
            and "public certificate key" in human.stdout
        )
        no_trust = CliRunner().invoke(app, args[:-2])
        assert no_trust.exit_code == 2
    # a gateway without a TEE publishes nothing, and says so
    with make_gateway(teecloud_home, chain, name="no-tee") as gw:
        with pytest.raises(CertKeyRefused, match="404"):
            fetch_document(gw.registration_url + CERT_KEYS_PATH)


@pytest.mark.slow
def test_gateway_app_id_recorded_and_pinned(
    teecloud_home: Path, chain: ChainClient, verifier: PeerVerifier, ca: DevCa
) -> None:
    """KmsAuth's gateway_app_id names the gateway app (its compose hash allowed on chain); quotes from a TEE
    booted as that app pass `expected_app_id`, with the gateway's compose hash; idempotent."""
    from teecloud.agent.keyprovider import LocalDevKeyProvider
    from teecloud.gateway.identity import boot_gateway, gateway_compose_hash, register_gateway_app

    app_id = register_gateway_app(chain)
    assert chain.kms.info().gateway_app_id == app_id
    assert chain.is_compose_hash_allowed(app_id, gateway_compose_hash())
    assert register_gateway_app(chain) == app_id
    tee = SimulatedTdx(teecloud_home)
    state = boot_gateway(tee, app_id, LocalDevKeyProvider(teecloud_home))  # the KMS path: test_certkeys_local
    assert state.app_id.hex() == app_id[2:].lower() and state.compose_hash == gateway_compose_hash()
    pem = _wildcard(ca)
    pub = CertKeyPublisher(tee)
    pub.publish("public", pem)
    verdict = check_cert_key(_der(pem), pub.document(), verifier, expected_app_id=bytes.fromhex(app_id[2:]))
    assert verdict.app_id == app_id[2:].lower()
    assert verdict.compose_hash == gateway_compose_hash().hex()


@pytest.mark.slow
def test_gateway_keys_stay_in_its_data_directory(
    teecloud_home: Path,
    chain: ChainClient,
    tee: SimulatedTdx,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Private keys on disk: only the wildcard's (for HAProxy), 0600, under the gateway's 0700 run directory;
    nothing in the system temp directory; the dev CA key nowhere (and it refuses to be pickled)."""
    import os
    import pickle
    import ssl
    import stat
    import tempfile

    scratch = tmp_path / "system-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded: list[Path] = []
    original = ssl.SSLContext.load_cert_chain

    def recording(self: ssl.SSLContext, certfile: str, *a: object, **kw: object) -> None:
        loaded.append(Path(certfile))
        original(self, certfile, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", recording)
    with make_gateway(teecloud_home, chain, name="keys-home", tee=tee) as gw:
        with_keys = sorted(
            p.relative_to(gw.home)
            for p in gw.home.rglob("*")
            if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
        )
        assert [str(p) for p in with_keys] == [f"run/{Path(gw.driver.paths.cert_dir).name}/wildcard.pem"]
        assert stat.S_IMODE(os.stat(gw.home / with_keys[0]).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(gw.home / "run").st_mode) == 0o700
        assert list(scratch.iterdir()) == []
        # the registration listener's key went through a file inside the run directory, removed since
        assert loaded and all(p.parent == gw.home / "run" and not p.exists() for p in loaded)
        with pytest.raises(TypeError):
            pickle.dumps(gw.ca)


@pytest.mark.slow
def test_public_port_serves_the_document_and_apps_cannot_shadow_it(
    teecloud_home: Path, chain: ChainClient, tee: SimulatedTdx, verifier: PeerVerifier
) -> None:
    """`https://<base domain>:<public port>/.well-known/teecloud/cert-keys` is the gateway's own document
    (byte for byte the registration listener's), `check-cert HOST` uses it by default; a registered app
    whose backend answers every path never answers it, and the apex serves nothing else."""
    import httpx
    from typer.testing import CliRunner

    from teecloud.cli import app
    from teecloud.gateway.certkeys import CERT_KEYS_PATH, fetch_document, presented_cert
    from teecloud.gateway.routing import Route
    from tests.gateway.conftest import Backend

    rogue = Backend("rogue")  # an app that would answer /.well-known/teecloud/cert-keys with its own bytes
    try:
        with make_gateway(teecloud_home, chain, tee=tee) as gw:
            app_id, instance_id = "ab" * 20, "cd" * 20
            gw.driver.apply([Route(app_id, instance_id, 80, rogue.address)])
            public_url = f"https://127.0.0.1:{gw.public_port}{CERT_KEYS_PATH}"
            document = fetch_document(public_url, server_name=BASE)
            assert document == fetch_document(gw.registration_url + CERT_KEYS_PATH)
            apex = presented_cert("127.0.0.1", gw.public_port, server_name=BASE)
            assert check_cert_key(apex, document, verifier).role == "public"
            assert gw.cert_keys_url == f"https://{BASE}:{gw.public_port}{CERT_KEYS_PATH}"

            def get(sni: str, host: str, path: str = CERT_KEYS_PATH) -> httpx.Response:
                with httpx.Client(verify=str(gw.ca_file), timeout=10) as http:
                    return http.get(
                        f"https://127.0.0.1:{gw.public_port}{path}",
                        headers={"Host": host},
                        extensions={"sni_hostname": sni},
                    )

            # the app's own name reaches the app (its path is its own business), never the apex
            app_name = f"{app_id}.{BASE}"
            assert get(app_name, app_name).text.startswith(f"rogue {CERT_KEYS_PATH}")
            before = rogue.requests
            # fronting either way round is 421; the apex answers nothing but the document; a path that is
            # only a prefix or an extension of it is not it
            assert get(BASE, app_name).status_code == 421
            assert get(app_name, BASE).status_code == 421
            for path in ("/", "/.well-known/teecloud/cert-keys/x", "/.well-known/teecloud/cert-key"):
                assert get(BASE, BASE, path).status_code == 421
            assert get(BASE, BASE).content == document
            assert rogue.requests == before  # nothing of the above reached the app
            # check-cert HOST: the document from HOST's own public port by default
            args = ["gateway", "check-cert", f"127.0.0.1:{gw.public_port}", "--server-name", BASE]
            ok = CliRunner().invoke(app, [*args, "--trust-dev-root", "--json"])
            assert ok.exit_code == 0, ok.output
            assert json.loads(ok.stdout.strip().splitlines()[-1])["role"] == "public"
            # an app name as the document's name asks the app: its bytes are no document, refused
            by_app = CliRunner().invoke(app, [*args, "--base-domain", app_name, "--trust-dev-root", "--json"])
            assert by_app.exit_code == 1
            assert json.loads(by_app.stdout.strip().splitlines()[-1])["step"] in {"document", "published"}
    finally:
        rogue.stop()
