"""The base domain's certificate from an ACME CA (RFC 8555) by DNS-01, through certbot's `acme` library.

    AcmeCertificates(data_dir, directory_url=..., base_domain=..., dns=<a DnsProvider>)
        .ensure(now)   the current certificate, renewed first when it is within its renewal window;
                       returns (certificate, changed) — the gateway reloads HAProxy only when `changed`
        .current()     the certificate on disk (None before the first issuance)

Issuance (`_issue`), each step failing with an AcmeError that names it:
  (1) account     the account key (RSA 2048, born here, `<data_dir>/acme/account.pem`, 0600) registers
                  with the CA (an existing account for the key is looked up); its URI is kept for CAA
                  `accounturi` pinning (RFC 8657; `caa_records`)
  (2) order       a fresh P-256 certificate key, a CSR for `*.<base>` and `<base>`, a new order
  (3) challenge   for each authorization its DNS-01 TXT value (RFC 8555 §8.4) is set through the DnsProvider
                  at `_acme-challenge.<base>` (both names share it: two values), then answered
  (4) finalize    the CA validates, the order is finalized, the full chain downloaded and checked (the
                  leaf carries our key and both names)
  (5) store       key + chain in ONE file (`<data_dir>/acme/certificate.pem`, 0600), atomically replaced:
                  a failure at any step leaves the previous certificate (or none) exactly as it was
  The TXT values are cleared whatever happened.

The certificate key never leaves the gateway's data directory: HAProxy (the gateway's own child) reads a
copy in the gateway's run directory.

With `keys=` (teecloud.gateway.kmskeys, derived from the KMS's keys for the gateway app) no private key is
stored: the account key is the derived P-256 key `acme-account` (ES256, the same account after a restart),
each issuance's certificate key is `acme-certificate/<generation>` (generation = the stored one + 1, so a
renewal has a new key), and the store file holds the line `teecloud-key-generation: <n>` and the chain; the
key is derived again when it is loaded (a file whose leaf is not that key's is ignored: a new issuance).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import josepy as jose
import requests
from acme import challenges, client, crypto_util, messages
from acme import errors as acme_errors
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dnslib import QTYPE, RCODE, RR, TXT, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from josepy.jwk import JWKEC, JWKRSA

from teecloud._fs import atomic_write, atomic_write_json
from teecloud.gateway.devca import IssuedCert
from teecloud.gateway.errors import GatewayError, GatewayUsageError
from teecloud.gateway.kmskeys import ACME_ACCOUNT, GatewayKeys, acme_certificate_path, key_origin
from teecloud.gateway.rfc2136 import Rfc2136Dns, TsigKey
from teecloud.gateway.routing import check_base_domain
from teecloud.keys.certs import cert_to_pem, key_to_pem

__all__ = [
    "AcmeCertificates",
    "AcmeError",
    "AcmeSettings",
    "DnsProvider",
    "LocalChallengeDns",
    "StoredCert",
    "caa_records",
    "parse_dns_server",
]

log = logging.getLogger("teecloud.gateway")

ACCOUNT_KEY = "account.pem"
ACCOUNT_JSON = "account.json"
CERTIFICATE = "certificate.pem"
MAX_CHAIN_BYTES = 64 * 1024
MAX_TXT_NAMES = 64
MAX_TXT_VALUES = 8
RFC2136 = "rfc2136"  # --acme-dns rfc2136: DNS UPDATE to an authoritative server


class AcmeError(GatewayError):
    """Issuance or renewal failed; `step` names where (account, order, challenge, finalize, store)."""

    def __init__(self, reason: str, *, step: str) -> None:
        super().__init__(f"ACME {step}: {reason}")
        self.reason = reason
        self.step = step


class DnsProvider(Protocol):
    """Publishes the DNS-01 TXT records. A name may carry several values at once (a wildcard and its apex
    share `_acme-challenge.<base>`). Failures are raised as OSError, ValueError or a GatewayError (the
    issuance then fails at step `challenge` with that reason)."""

    def set_txt(self, name: str, value: str) -> None: ...

    def clear_txt(self, name: str, value: str) -> None: ...


class _Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        with self.lock:
            values = list(self.records.get(qname, ()))
        if not values:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.TXT:
            for value in values:
                reply.add_answer(RR(qname, QTYPE.TXT, rdata=TXT(value), ttl=0))
        return reply  # the name exists but has no record of that type: NOERROR, no answer


class LocalChallengeDns:
    """A DnsProvider for development and tests: an authoritative DNS server (dnslib) on 127.0.0.1 that answers
    only the `_acme-challenge` TXT records set through it (NXDOMAIN for anything else). Point the CA's
    resolver at it (pebble: `-dnsserver 127.0.0.1:<port>`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._zone = _Zone()
        quiet = DNSLogger(logf=lambda _line: None)
        self._server = DNSServer(self._zone, address=host, port=port, logger=quiet)
        self._server.start_thread()
        self.port = int(self._server.server.server_address[1])

    def set_txt(self, name: str, value: str) -> None:
        name = name.rstrip(".").lower()
        if not name.startswith("_acme-challenge."):
            raise GatewayUsageError(f"{name!r} is not an _acme-challenge name")
        with self._zone.lock:
            if name not in self._zone.records and len(self._zone.records) >= MAX_TXT_NAMES:
                raise GatewayUsageError("too many challenge names at once")
            values = self._zone.records.setdefault(name, [])
            if value not in values:
                if len(values) >= MAX_TXT_VALUES:
                    raise GatewayUsageError(f"too many TXT values for {name}")
                values.append(value)

    def clear_txt(self, name: str, value: str) -> None:
        name = name.rstrip(".").lower()
        with self._zone.lock:
            values = self._zone.records.get(name, [])
            if value in values:
                values.remove(value)
            if not values:
                self._zone.records.pop(name, None)

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()


@dataclass(frozen=True)
class StoredCert:
    """The certificate in use: the leaf and its key (IssuedCert, what HAProxy loads) and the chain above.
    `generation`: the derived key's generation (0: a key born here, stored with the chain)."""

    issued: IssuedCert
    chain_pem: str
    not_before: int
    generation: int = 0

    @property
    def not_after(self) -> int:
        return self.issued.not_after


def caa_records(base_domain: str, ca_domain: str, account_uri: str) -> list[str]:
    """The CAA records (RFC 8659, `accounturi` of RFC 8657) that let only this gateway's ACME account obtain
    certificates for the base domain and its wildcard from `ca_domain` (e.g. letsencrypt.org)."""
    value = f"{ca_domain}; accounturi={account_uri}"
    return [f'{base_domain}. CAA 0 issue "{value}"', f'{base_domain}. CAA 0 issuewild "{value}"']


_GENERATION = re.compile(rb"\Ateecloud-key-generation: ([0-9]{1,10})\n")


def _load_stored(data: bytes, keys: GatewayKeys | None = None) -> StoredCert:
    """Parse the store file (key, then leaf, then chain; with `keys`: the generation line, then leaf and
    chain, the key derived). Raises ValueError when it is not one."""
    generation = 0
    if keys is not None:
        m = _GENERATION.match(data)
        if m is None:
            raise ValueError("no teecloud-key-generation line (a key stored by a gateway without KMS keys)")
        generation = int(m.group(1))
        try:
            key: Any = keys.p256(acme_certificate_path(generation))
        except GatewayUsageError as exc:
            raise ValueError(str(exc)) from exc
        data = data[m.end() :]
    else:
        key = serialization.load_pem_private_key(data, password=None)
    certs = x509.load_pem_x509_certificates(data)
    if not certs or not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("no certificate or no P-256 key")
    leaf = certs[0]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, pub) != key.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ):
        raise ValueError("the key is not the leaf certificate's")
    issued = IssuedCert(cert_to_pem(leaf), key_to_pem(key), int(leaf.not_valid_after_utc.timestamp()))
    return StoredCert(
        issued,
        "".join(cert_to_pem(c) for c in certs[1:]),
        int(leaf.not_valid_before_utc.timestamp()),
        generation,
    )


class AcmeCertificates:
    def __init__(
        self,
        data_dir: Path,
        *,
        directory_url: str,
        base_domain: str,
        dns: DnsProvider,
        email: str | None = None,
        ca_bundle: str | None = None,
        renew_before_s: int = 30 * 24 * 3600,
        retry_s: float = 300.0,
        timeout_s: float = 120.0,
        clock: Callable[[], float] = time.time,
        keys: GatewayKeys | None = None,
    ) -> None:
        if not directory_url.startswith("https://"):
            raise GatewayUsageError("the ACME directory URL must be https://")
        self.dir = Path(data_dir) / "acme"
        self.directory_url = directory_url
        self.base_domain = check_base_domain(base_domain)
        self.dns = dns
        self.email = email
        self.ca_bundle = ca_bundle
        self.renew_before_s = renew_before_s
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.keys = keys
        self.account_uri = ""
        self.failures = 0
        self.last_error = ""
        self._next_attempt = 0.0
        self._lock = threading.Lock()

    @property
    def names(self) -> tuple[str, str]:
        return (f"*.{self.base_domain}", self.base_domain)

    # ------------------------------------------------------------------------------------------ state

    def current(self) -> StoredCert | None:
        path = self.dir / CERTIFICATE
        try:
            data = path.read_bytes()[: MAX_CHAIN_BYTES + 1]
        except FileNotFoundError:
            return None
        try:
            if len(data) > MAX_CHAIN_BYTES:
                raise ValueError("too large")
            return _load_stored(data, self.keys)
        except ValueError as exc:
            log.warning("ignoring %s (%s): a new certificate will be issued", path, exc)
            return None

    def due(self, cert: StoredCert | None, now: float) -> bool:
        """Renew when a third of the lifetime, or `renew_before_s`, is left (whichever comes first)."""
        if cert is None:
            return True
        window = min(self.renew_before_s, (cert.not_after - cert.not_before) // 3)
        return now >= cert.not_after - window

    def ensure(self, now: float | None = None) -> tuple[StoredCert, bool]:
        """The certificate to serve, and whether it changed. Issues one when there is none (errors
        propagate: a gateway cannot start without one); renews within the renewal window (a failure then
        keeps the current certificate, is logged and counted, and is retried after `retry_s`). At most one
        attempt per `retry_s` once a certificate exists."""
        at = self.clock() if now is None else now
        with self._lock:
            cert = self.current()
            if cert is not None and (not self.due(cert, at) or at < self._next_attempt):
                return cert, False
            try:
                fresh = self._issue()
            except AcmeError as exc:
                self.failures += 1
                self.last_error = str(exc)
                self._next_attempt = at + self.retry_s
                if cert is None:
                    raise
                log.warning("certificate renewal failed (retrying in %.0f s): %s", self.retry_s, exc)
                return cert, False
            self.last_error = ""
            # at most one issuance per retry_s, even when the CA's certificate is already due (a skewed
            # clock, a CA issuing short lifetimes): the CA is never hammered
            self._next_attempt = at + self.retry_s
            return fresh, True

    # ------------------------------------------------------------------------------------------ issuance

    def key_origin(self, cert: StoredCert) -> str:
        """What the cert-keys document says of this certificate's key (teecloud.gateway.kmskeys)."""
        return key_origin(acme_certificate_path(cert.generation) if cert.generation else None)

    def _account_key(self) -> JWKEC | JWKRSA:
        if self.keys is not None:  # derived: nothing stored, the same account after a restart
            return JWKEC(key=self.keys.p256(ACME_ACCOUNT))
        path = self.dir / ACCOUNT_KEY
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes()[:16384], password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise AcmeError(f"{path} is not an RSA key", step="account")
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            atomic_write(path, pem, mode=0o600)
        return JWKRSA(key=key)

    def _client(self, key: JWKEC | JWKRSA) -> client.ClientV2:
        verify: Any = self.ca_bundle if self.ca_bundle is not None else True
        alg = jose.jwa.ES256 if isinstance(key, JWKEC) else jose.jwa.RS256
        net = client.ClientNetwork(key, alg=alg, user_agent="teecloud-gateway", verify_ssl=verify, timeout=30)
        directory = client.ClientV2.get_directory(self.directory_url, net)
        acme = client.ClientV2(directory, net=net)
        try:
            regr = acme.new_account(
                messages.NewRegistration.from_data(email=self.email, terms_of_service_agreed=True)
            )
        except acme_errors.ConflictError as exc:  # this key already has an account: use it
            net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
            regr = acme.query_registration(net.account)
        self.account_uri = regr.uri
        atomic_write_json(self.dir / ACCOUNT_JSON, {"account_uri": regr.uri, "directory": self.directory_url})
        return acme

    def _issue(self) -> StoredCert:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        step = "account"
        published: list[tuple[str, str]] = []
        try:
            # (1)
            account_key = self._account_key()
            acme = self._client(account_key)
            # (2)
            step = "order"
            generation = 0
            if self.keys is not None:
                previous = self.current()
                generation = (previous.generation if previous is not None else 0) + 1
                cert_key = self.keys.p256(acme_certificate_path(generation))
            else:
                cert_key = ec.generate_private_key(ec.SECP256R1())
            key_pem = key_to_pem(cert_key).encode()
            orderr = acme.new_order(crypto_util.make_csr(key_pem, list(self.names)))
            # (3)
            step = "challenge"
            answers = []
            for authzr in orderr.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # the CA reuses an earlier validation
                chall = next(
                    (c for c in authzr.body.challenges if isinstance(c.chall, challenges.DNS01)), None
                )
                if chall is None:
                    raise AcmeError(
                        f"the CA offers no dns-01 challenge for {authzr.body.identifier.value}", step=step
                    )
                response, validation = chall.response_and_validation(account_key)
                name = cast(challenges.DNS01, chall.chall).validation_domain_name(
                    authzr.body.identifier.value
                )
                self.dns.set_txt(name, validation)
                published.append((name, validation))
                answers.append((chall, response))
            for chall, response in answers:
                acme.answer_challenge(chall, response)
            # (4)
            step = "finalize"
            deadline = dt.datetime.now() + dt.timedelta(seconds=self.timeout_s)
            orderr = acme.poll_and_finalize(orderr, deadline)
            fullchain = (orderr.fullchain_pem or "").encode()
            stored = (
                _load_stored(f"teecloud-key-generation: {generation}\n".encode() + fullchain, self.keys)
                if self.keys is not None
                else _load_stored(key_pem + fullchain)
            )
            leaf = x509.load_pem_x509_certificate(stored.issued.cert_pem.encode())
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if set(san.get_values_for_type(x509.DNSName)) != set(self.names):
                raise AcmeError(f"the certificate names {san} are not {self.names}", step=step)
            # (5)
            step = "store"
            if self.keys is not None:  # no private key at rest: it is derived again when loaded
                record = f"teecloud-key-generation: {generation}\n".encode() + fullchain
            else:
                record = key_pem + fullchain
            atomic_write(self.dir / CERTIFICATE, record, mode=0o600)
        except AcmeError:
            raise
        except acme_errors.ValidationError as exc:
            details = "; ".join(
                f"{a.body.identifier.value}: {_problem(c.error)}"
                for a in exc.failed_authzrs
                for c in a.body.challenges
                if c.error is not None
            )
            raise AcmeError(f"the CA could not validate the DNS-01 challenge ({details})", step=step) from exc
        except acme_errors.TimeoutError as exc:
            raise AcmeError(f"the CA did not finish within {self.timeout_s:.0f} s", step=step) from exc
        except messages.Error as exc:
            raise AcmeError(f"the CA refused: {_problem(exc)}", step=step) from exc
        except requests.exceptions.SSLError as exc:
            raise AcmeError(
                f"the ACME server's TLS certificate is not trusted ({self.directory_url})", step=step
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise AcmeError(
                f"cannot reach the ACME server at {self.directory_url} ({type(exc).__name__})", step=step
            ) from exc
        except (acme_errors.Error, jose.errors.Error, GatewayError, ValueError, OSError) as exc:
            raise AcmeError(f"{type(exc).__name__}: {exc}"[:500], step=step) from exc
        finally:
            for name, value in published:
                try:
                    self.dns.clear_txt(name, value)
                except Exception:  # a stale TXT value is harmless; the issuance result stands
                    log.warning("could not clear the TXT record %s", name, exc_info=True)
        log.info("ACME certificate for %s until %d", self.base_domain, stored.not_after)
        return stored

    def status(self) -> dict[str, Any]:
        cert = self.current()
        return {
            "account_uri": self.account_uri,
            "not_after": cert.not_after if cert is not None else None,
            "failures": self.failures,
            "last_error": self.last_error,
        }


def parse_dns_server(value: str, what: str = "DNS server") -> tuple[str, int]:
    """`ip[:port]` (IPv6 in brackets; port 53 if omitted) of a DNS server, as an IP literal. Raises
    GatewayUsageError naming `what`."""
    import ipaddress

    host, sep, port = value.strip().rpartition(":")
    if not sep or (value.count(":") > 1 and not value.startswith("[")):
        host, port = value.strip(), "53"
    host = host.strip("[]")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError as exc:
        raise GatewayUsageError(f"{what} {value[:80]!r}: not an IP address (host:port)") from exc
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise GatewayUsageError(f"{what} {value[:80]!r}: the port must be in 1..65535")
    return ip, int(port)


@dataclass(frozen=True)
class AcmeSettings:
    """The `--acme-*` options of `teecloud up` and `teecloud gateway up` (one parser: `parse`), checked before
    anything starts: the directory (https, a host, at most 2048 characters), where the DNS-01 TXT records go,
    a readable CA bundle for the CA's TLS, the account's contact.

    DNS-01 records go either to the gateway's own challenge DNS server (`--acme-dns IP:PORT`,
    LocalChallengeDns: the CA's resolver must be pointed there — a local CA) or, with `--acme-dns rfc2136`,
    to an authoritative DNS server by TSIG-signed DNS UPDATE (`--acme-dns-server IP[:PORT]`,
    `--acme-tsig-key-file` in BIND's format; teecloud.gateway.rfc2136)."""

    directory_url: str
    dns: tuple[str, int] = ("127.0.0.1", 53)
    ca_file: str | None = None
    email: str | None = None
    tsig_key: TsigKey | None = None  # set: RFC 2136 updates to `dns` (the authoritative server)

    @classmethod
    def parse(
        cls,
        directory_url: str,
        dns: str = "127.0.0.1:53",
        ca_file: str | Path | None = None,
        email: str | None = None,
        *,
        dns_server: str | None = None,
        tsig_key_file: str | Path | None = None,
    ) -> AcmeSettings:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(directory_url)
            ok = parts.scheme == "https" and bool(parts.hostname) and len(directory_url) <= 2048
            ok = ok and parts.port != 0
        except ValueError:
            ok = False
        if not ok:
            raise GatewayUsageError(f"ACME directory {directory_url[:80]!r}: not an https:// URL with a host")
        tsig_key = None
        if dns.strip().lower() == RFC2136:
            if dns_server is None or tsig_key_file is None:
                raise GatewayUsageError(
                    "--acme-dns rfc2136 needs --acme-dns-server IP[:PORT] and --acme-tsig-key-file PATH"
                )
            where = parse_dns_server(dns_server, "ACME DNS UPDATE server")
            tsig_key = TsigKey.from_file(tsig_key_file)
        else:
            if dns_server is not None or tsig_key_file is not None:
                raise GatewayUsageError(
                    "--acme-dns-server and --acme-tsig-key-file go with --acme-dns rfc2136"
                )
            where = parse_dns_server(dns, "ACME DNS-01 server")
        if ca_file is not None and not Path(ca_file).is_file():
            raise GatewayUsageError(f"ACME CA file {str(ca_file)[:200]}: not a readable file")
        if email is not None and (len(email) > 254 or not re.fullmatch(r"[^@\s]+@[^@\s]+", email)):
            raise GatewayUsageError(f"ACME contact {email[:80]!r}: not an e-mail address")
        return cls(directory_url, where, str(ca_file) if ca_file is not None else None, email, tsig_key)

    def open(
        self, home: Path, *, base_domain: str, keys: GatewayKeys | None
    ) -> tuple[AcmeCertificates, LocalChallengeDns | Rfc2136Dns]:
        """The DNS provider (a started challenge DNS server, or the RFC 2136 client; the caller stops it) and
        the certificates (the first issuance happens when the gateway is made). Raises GatewayUsageError
        when the DNS address cannot be served."""
        dns: LocalChallengeDns | Rfc2136Dns
        if self.tsig_key is not None:
            dns = Rfc2136Dns(self.dns, self.tsig_key)
        else:
            try:
                dns = LocalChallengeDns(*self.dns)
            except OSError as exc:
                raise GatewayUsageError(
                    f"cannot serve ACME DNS-01 answers on {self.dns[0]}:{self.dns[1]}: {exc.strerror or exc}"
                ) from exc
        certs = AcmeCertificates(
            home,
            directory_url=self.directory_url,
            base_domain=base_domain,
            dns=dns,
            email=self.email,
            ca_bundle=self.ca_file,
            keys=keys,
        )
        return certs, dns


def _problem(error: Any) -> str:
    if isinstance(error, messages.Error):
        return (error.detail or error.description or str(error.typ) or "error")[:300]
    return str(error)[:300]
