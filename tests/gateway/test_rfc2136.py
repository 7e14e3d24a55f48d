"""The RFC 2136 DnsProvider against a real BIND9 `named` on 127.0.0.1 (a local zone, a TSIG key whose update
policy covers only `_acme-challenge.<zone>` TXT), and pebble issuing the gateway's certificate through it
(pebble's DNS resolver pointed at named)."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.name
import pytest
from cryptography import x509

from teecloud.gateway.acme import AcmeCertificates, AcmeError, AcmeSettings
from teecloud.gateway.errors import GatewayUsageError
from teecloud.gateway.rfc2136 import Rfc2136Dns, Rfc2136Error, TsigKey

from .bind_server import Bind
from .pebble import Pebble, free_port

ZONE = "gw.teecloud.test"
CHALLENGE = f"_acme-challenge.{ZONE}"


@pytest.fixture(scope="module")
def bind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bind]:
    b = Bind(tmp_path_factory.mktemp("bind"), ZONE)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def pebble_via_bind(tmp_path_factory: pytest.TempPathFactory, bind: Bind) -> Iterator[Pebble]:
    p = Pebble(tmp_path_factory.mktemp("pebble-bind"), bind.port)
    yield p
    p.stop()


def _provider(bind: Bind, key: TsigKey | None = None) -> Rfc2136Dns:
    return Rfc2136Dns(
        ("127.0.0.1", bind.port), key or TsigKey.from_file(bind.key_file), propagation_timeout_s=5
    )


def _served(bind: Bind, name: str = CHALLENGE) -> list[str]:
    return _provider(bind).served(dns.name.from_text(name + "."))


# ------------------------------------------------------------------------------------------ the key file


def test_key_file_from_tsig_keygen(tmp_path: Path) -> None:
    # the file BIND's own tool writes (an independent producer of the format)
    keygen = shutil.which("tsig-keygen") or "/usr/sbin/tsig-keygen"
    text = subprocess.run([keygen, "-a", "hmac-sha512", "acme-gw."], capture_output=True, check=True).stdout
    (tmp_path / "k").write_bytes(b"# made by tsig-keygen\n" + text)
    (tmp_path / "k").chmod(0o644)
    with pytest.raises(GatewayUsageError, match="readable by other users"):
        TsigKey.from_file(tmp_path / "k")
    (tmp_path / "k").chmod(0o600)
    key = TsigKey.from_file(tmp_path / "k")
    assert key.name == "acme-gw" and key.algorithm == "hmac-sha512" and len(key.secret) == 64
    assert base64.b64encode(key.secret).decode() in text.decode()
    assert "secret" not in repr(key).replace("secret=", "") and key.secret.hex() not in repr(key)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('key "k" { algorithm hmac-md5; secret "AAAAAAAAAAAAAAAAAAAAAA=="; };', "not one of"),
        ('key "k" { algorithm hmac-sha1; secret "AAAAAAAAAAAAAAAAAAAAAA=="; };', "not one of"),
        ('key "k" { algorithm hmac-sha256; secret "AAAA"; };', "16..128 bytes"),
        ('key "k" { algorithm hmac-sha256; secret "A=A=AAAAAAAAAAAAAAAAAAAA"; };', "not base64"),
        ('key "k" { algorithm hmac-sha256; secret "' + "A" * 24 + '"; }; key "j" { };', "not one BIND key"),
        ('key "k" { secret "AAAAAAAAAAAAAAAAAAAAAA=="; algorithm hmac-sha256; };', "not one BIND key"),
        ("", "not one BIND key"),
    ],
)
def test_bad_key_files_are_refused(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "k").write_text(text)
    (tmp_path / "k").chmod(0o600)
    with pytest.raises(GatewayUsageError, match=reason):
        TsigKey.from_file(tmp_path / "k")


def test_oversized_binary_and_missing_key_files(tmp_path: Path) -> None:
    (tmp_path / "big").write_text(" " * 5000)
    (tmp_path / "bin").write_bytes(b'key "\xff" {};')
    (tmp_path / "big").chmod(0o600)
    (tmp_path / "bin").chmod(0o600)
    for name, reason in (("big", "larger than"), ("bin", "not ASCII"), ("none", "No such file")):
        with pytest.raises(GatewayUsageError, match=reason):
            TsigKey.from_file(tmp_path / name)


# --------------------------------------------------------------------------------- updates against BIND


def test_add_wait_and_remove_against_bind(bind: Bind) -> None:
    dns_ = _provider(bind)
    assert dns_.zone_of(dns.name.from_text(CHALLENGE + ".")) == dns.name.from_text(ZONE + ".")
    # a wildcard and its apex share the name: two values at once, each removed on its own
    dns_.set_txt(CHALLENGE, "first-value")  # returns only once named serves it
    assert _served(bind) == ["first-value"]
    dns_.set_txt(CHALLENGE + ".", "second_value")
    assert sorted(_served(bind)) == ["first-value", "second_value"]
    dns_.clear_txt(CHALLENGE, "first-value")
    assert _served(bind) == ["second_value"]
    dns_.clear_txt(CHALLENGE, "second_value")
    assert _served(bind) == []


def test_updates_named_refuses_fail_with_a_reason(bind: Bind) -> None:
    good = TsigKey.from_file(bind.key_file)
    # the attacker's steps: no key / a guessed secret under the real key name / another key name
    with pytest.raises(Rfc2136Error, match=r"refused the TSIG key 'acme-gw' \(PeerBadSignature"):
        _provider(bind, TsigKey(good.name, good.algorithm, bytes(32))).set_txt(CHALLENGE, "x")
    with pytest.raises(Rfc2136Error, match=r"refused the TSIG key 'other' \(PeerBadKey"):
        _provider(bind, TsigKey("other", good.algorithm, good.secret)).set_txt(CHALLENGE, "x")
    # the key is valid but its update policy covers only the challenge name's TXT
    with pytest.raises(Rfc2136Error, match=r"REFUSED \(the server's update policy"):
        _provider(bind).set_txt(f"_acme-challenge.www.{ZONE}", "x")
    # a zone this server is not authoritative for
    with pytest.raises(Rfc2136Error, match="not authoritative"):
        _provider(bind).set_txt("_acme-challenge.example.org", "x")
    # what the provider sends is checked first: only challenge names, only base64url values
    with pytest.raises(GatewayUsageError, match="not an _acme-challenge name"):
        _provider(bind).set_txt(f"www.{ZONE}", "x")
    with pytest.raises(GatewayUsageError, match="base64url"):
        _provider(bind).set_txt(CHALLENGE, 'x" ; evil')
    assert _served(bind) == [] and _served(bind, f"_acme-challenge.www.{ZONE}") == []
    # nothing listening
    with pytest.raises(Rfc2136Error, match="no answer"):
        Rfc2136Dns(("127.0.0.1", free_port()), good, timeout_s=0.5).set_txt(CHALLENGE, "x")


# ------------------------------------------------------------------------------ pebble issuing through it


@pytest.mark.slow
def test_pebble_issues_through_bind(tmp_path: Path, bind: Bind, pebble_via_bind: Pebble) -> None:
    settings = AcmeSettings.parse(
        pebble_via_bind.directory_url,
        "rfc2136",
        pebble_via_bind.ca_bundle,
        dns_server=f"127.0.0.1:{bind.port}",
        tsig_key_file=bind.key_file,
    )
    certs, provider = settings.open(tmp_path, base_domain=ZONE, keys=None)
    assert isinstance(provider, Rfc2136Dns)
    cert, changed = certs.ensure()
    assert changed
    leaf = x509.load_pem_x509_certificate(cert.issued.cert_pem.encode())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == sorted([f"*.{ZONE}", ZONE])
    assert _served(bind) == []  # the challenge records were removed
    log = (bind.workdir / "named.log").read_text()
    assert f"key acme-gw: updating zone '{ZONE}/IN': adding an RR at '{CHALLENGE}' TXT" in log


@pytest.mark.slow
def test_a_refused_update_fails_issuance_at_challenge(
    tmp_path: Path, bind: Bind, pebble_via_bind: Pebble
) -> None:
    wrong = TsigKey("acme-gw", "hmac-sha256", bytes(32))
    certs = AcmeCertificates(
        tmp_path,
        directory_url=pebble_via_bind.directory_url,
        base_domain=ZONE,
        dns=_provider(bind, wrong),
        ca_bundle=pebble_via_bind.ca_bundle,
        timeout_s=30,
    )
    with pytest.raises(AcmeError) as err:
        certs.ensure()
    assert err.value.step == "challenge" and "refused the TSIG key" in err.value.reason
    assert certs.current() is None and not (tmp_path / "acme" / "certificate.pem").exists()


# ---------------------------------------------------------------- every authoritative server of the zone

ZONE2 = "ns.teecloud.test"
CHALLENGE2 = f"_acme-challenge.{ZONE2}"


@pytest.fixture
def zone_pair(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Bind, Bind]]:
    """A BIND9 primary on 127.0.0.1 and a secondary on ::1 (zone transfers), both in the NS set; the
    primary NOTIFYs the secondary unless the test is parametrized with notify=False (it then lags: its
    refresh is an hour). Both on the same port (the NS set's servers are asked at the configured port);
    named listens only on an interface's addresses, and this host's loopback has 127.0.0.1 and ::1, so the
    secondary is on ::1."""
    notify = getattr(request, "param", True)
    extra = ("127.0.0.3",) if not notify else ()  # no server at all listens there
    port = free_port()
    primary = Bind(tmp_path / "primary", ZONE2, port=port, secondaries=("::1", *extra), notify=notify)
    try:
        secondary = Bind(tmp_path / "secondary", ZONE2, listen="::1", port=port, primary=("127.0.0.1", port))
    except BaseException:
        primary.stop()
        raise
    try:
        yield primary, secondary  # Bind returns once the secondary serves the zone (its first transfer)
    finally:
        secondary.stop()
        primary.stop()


def _txt_at(server: Bind, name: str = CHALLENGE2) -> list[str]:
    return Rfc2136Dns((server.listen, server.port), TsigKey("x", "hmac-sha256", bytes(16))).served(
        dns.name.from_text(name + ".")
    )


@pytest.mark.slow  # BIND sends each NOTIFY ~5 s after the update
def test_set_txt_returns_once_every_authoritative_server_serves_it(zone_pair: tuple[Bind, Bind]) -> None:
    primary, secondary = zone_pair
    provider = Rfc2136Dns(
        ("127.0.0.1", primary.port), TsigKey.from_file(primary.key_file), propagation_timeout_s=20
    )
    zone = dns.name.from_text(ZONE2 + ".")
    assert provider.authoritative_servers(zone) == [("127.0.0.1", primary.port), ("::1", primary.port)]
    for value in ("one-value", "two_value"):
        provider.set_txt(CHALLENGE2, value)
        # when it returns, the secondary (zone transfer after NOTIFY) answers the value too
        assert value in _txt_at(secondary)
    assert sorted(_txt_at(primary)) == sorted(_txt_at(secondary)) == ["one-value", "two_value"]
    provider.clear_txt(CHALLENGE2, "one-value")
    provider.clear_txt(CHALLENGE2, "two_value")
    assert _txt_at(primary) == []
    log = (secondary.workdir / "named.log").read_text()
    assert f"zone {ZONE2}/IN: transferred serial" in log


@pytest.mark.parametrize("zone_pair", [False], indirect=True)
def test_a_lagging_or_silent_secondary_is_a_clear_timeout(zone_pair: tuple[Bind, Bind]) -> None:
    primary, secondary = zone_pair
    provider = Rfc2136Dns(
        ("127.0.0.1", primary.port),
        TsigKey.from_file(primary.key_file),
        propagation_timeout_s=2,
        timeout_s=0.5,
    )
    t0 = time.monotonic()
    with pytest.raises(Rfc2136Error) as exc:
        provider.set_txt(CHALLENGE2, "lagging")
    assert time.monotonic() - t0 < 2 + 3  # bounded by the timeout (plus one query's)
    reason = str(exc.value)
    assert "2 of the 3 authoritative servers" in reason
    assert f"[::1]:{primary.port}" in reason and f"127.0.0.3:{primary.port}" in reason
    assert "127.0.0.1:" + str(primary.port) + "," not in reason.split("s: ", 1)[1]  # the primary serves it
    assert _txt_at(primary) == ["lagging"] and _txt_at(secondary) == []
    provider.clear_txt(CHALLENGE2, "lagging")
