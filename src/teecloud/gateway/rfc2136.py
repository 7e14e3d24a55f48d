"""A production DnsProvider: DNS UPDATE (RFC 2136) signed with TSIG (RFC 8945), through dnspython.

BIND, PowerDNS, Knot and most DNS hosts that accept a secondary / dynamic setup take it. The gateway holds a
TSIG key allowed to update the zone that holds `_acme-challenge.<base>` (in BIND: `update-policy { grant
<key> name _acme-challenge.<base> TXT; };` limits it to that one name).

    Rfc2136Dns(server=("192.0.2.53", 53), key=TsigKey.from_file(path))
        .set_txt(name, value)    (1) the zone: the SOA the server names for `name` (it must be authoritative)
                                 (2) UPDATE: add `name TXT "value"` (TTL 60), over TCP, TSIG-signed; the reply
                                     must be NOERROR and carry a valid TSIG (dnspython checks it)
                                 (3) the zone's authoritative servers: its NS set as the configured
                                     server answers it, each NS name's addresses from that answer's glue,
                                     else asked of the configured server, else the system resolver; each
                                     asked at `ns_port` (default: the configured server's port; 53 in
                                     production)
                                 (4) wait until the configured server and every address of (3) answer
                                     the value, authoritatively (AA), to a plain (non-recursive) query —
                                     secondaries get it by NOTIFY / IXFR, so the CA may ask any of them —
                                     at most `propagation_timeout_s` in all; else an error naming the
                                     servers that do not serve it yet
        .clear_txt(name, value)  UPDATE: delete exactly that value (other values of the name stay)

Failures raise Rfc2136Error (a GatewayError): the ACME issuance then fails at step `challenge` with its
reason.
The key file is BIND's `key "<name>" { algorithm hmac-sha256; secret "<base64>"; };` (what `tsig-keygen`
writes), parsed strictly: one key, HMAC-SHA256/384/512 only, a secret of 16..128 bytes; a file that other
users may read (mode & 077) is refused.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.update

from teecloud.gateway.errors import GatewayError, GatewayUsageError

__all__ = ["Rfc2136Dns", "Rfc2136Error", "TsigKey"]

MAX_KEY_FILE_BYTES = 4096
MAX_NS_NAMES = 16  # of a zone's NS set, asked
MAX_NS_ADDRESSES = 32  # servers waited for
TXT_TTL = 60
# the ACME DNS-01 value is base64url(sha256) (RFC 8555 §8.4): 43 characters; allow what the alphabet allows
_TXT_VALUE = re.compile(r"[A-Za-z0-9_-]{1,255}")
_ALGORITHMS = {
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}
_KEY_FILE = re.compile(
    r'\s*key\s+"?(?P<name>[A-Za-z0-9._-]{1,253})"?\s*\{\s*'
    r"algorithm\s+(?P<alg>[A-Za-z0-9-]{1,32})\s*;\s*"
    r'secret\s+"(?P<secret>[A-Za-z0-9+/=]{1,256})"\s*;\s*'
    r"\}\s*;\s*"
)


class Rfc2136Error(GatewayError):
    """The DNS server refused or did not answer an update, or did not serve the record in time."""


@dataclass(frozen=True)
class TsigKey:
    name: str
    algorithm: str  # one of _ALGORITHMS
    secret: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> TsigKey:
        """BIND's key statement (tsig-keygen's output; `#` and `//` comment lines allowed). Raises
        GatewayUsageError."""
        lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith(("#", "//"))]
        m = _KEY_FILE.fullmatch("\n".join(lines))
        if m is None:
            raise GatewayUsageError(
                "TSIG key file: not one BIND key statement "
                '(key "<name>" { algorithm <alg>; secret "<base64>"; };)'
            )
        alg = m["alg"].lower()
        if alg not in _ALGORITHMS:
            raise GatewayUsageError(
                f"TSIG key file: algorithm {alg!r} is not one of {', '.join(sorted(_ALGORITHMS))}"
            )
        try:
            secret = base64.b64decode(m["secret"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise GatewayUsageError("TSIG key file: the secret is not base64") from exc
        if not 16 <= len(secret) <= 128:
            raise GatewayUsageError("TSIG key file: the secret must be 16..128 bytes")
        return cls(m["name"].rstrip(".").lower(), alg, secret)

    @classmethod
    def from_file(cls, path: str | Path) -> TsigKey:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_mode & 0o077:
                    raise GatewayUsageError(
                        f"TSIG key file {str(path)[:200]}: readable by other users (chmod 600 it)"
                    )
                data = f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise GatewayUsageError(f"TSIG key file {str(path)[:200]}: {exc.strerror or exc}") from exc
        if len(data) > MAX_KEY_FILE_BYTES:
            raise GatewayUsageError(f"TSIG key file: larger than {MAX_KEY_FILE_BYTES} bytes")
        try:
            return cls.parse(data.decode("ascii"))
        except UnicodeDecodeError as exc:
            raise GatewayUsageError("TSIG key file: not ASCII") from exc

    def dns_key(self) -> dns.tsig.Key:
        return dns.tsig.Key(
            self.name + ".", base64.b64encode(self.secret).decode(), _ALGORITHMS[self.algorithm]
        )


class Rfc2136Dns:
    """A DnsProvider: DNS-01 TXT records on an authoritative server by TSIG-signed DNS UPDATE."""

    def __init__(
        self,
        server: tuple[str, int],
        key: TsigKey,
        *,
        timeout_s: float = 5.0,
        propagation_timeout_s: float = 60.0,
        poll_s: float = 0.5,
        ns_port: int | None = None,
    ) -> None:
        self.ns_port = ns_port
        self.server, self.port = server
        self.key = key
        self.timeout_s = timeout_s
        self.propagation_timeout_s = propagation_timeout_s
        self.poll_s = poll_s

    def set_txt(self, name: str, value: str) -> None:
        qname = self._challenge_name(name, value)
        # (1)
        zone = self.zone_of(qname)
        # (2)
        update = dns.update.UpdateMessage(zone)
        update.add(qname, TXT_TTL, self._rdata(value))
        self._send(update, f"add TXT {qname}")
        deadline = time.monotonic() + self.propagation_timeout_s
        # (3)
        servers = [(self.server, self.port)]
        servers += [a for a in self.authoritative_servers(zone) if a not in servers]
        # (4)
        pending = list(servers)
        while True:
            pending = [s for s in pending if not self._serves(s, qname, value, deadline)]
            if not pending:
                return
            if time.monotonic() >= deadline:
                lagging = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in pending[:8])
                raise Rfc2136Error(
                    f"{self.server}:{self.port} accepted the update but {len(pending)} of the "
                    f"{len(servers)} authoritative servers of {zone} did not serve TXT {qname} within "
                    f"{self.propagation_timeout_s:.0f} s: {lagging}"
                )
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))

    def authoritative_servers(self, zone: dns.name.Name) -> list[tuple[str, int]]:
        """(3): the addresses of the zone's NS set, as the configured server names it (bounded)."""
        port = self.ns_port if self.ns_port is not None else self.port
        reply = self._query(zone, dns.rdatatype.NS)
        names: list[dns.name.Name] = []
        for rrset in reply.answer:
            if rrset.name == zone and rrset.rdtype == dns.rdatatype.NS:
                names += [rd.target for rd in rrset]
        if not names:
            raise Rfc2136Error(f"{self.server}:{self.port} names no NS set for {zone}")
        glue: dict[dns.name.Name, list[str]] = {}
        for rrset in reply.additional:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                glue.setdefault(rrset.name, []).extend(rd.address for rd in rrset)
        out: list[tuple[str, int]] = []
        for name in sorted(set(names))[:MAX_NS_NAMES]:
            addresses = glue.get(name) or self._addresses(name)
            if not addresses:
                raise Rfc2136Error(f"cannot find the address of {zone}'s name server {name}")
            out += [(a, port) for a in sorted(set(addresses)) if (a, port) not in out]
        return out[:MAX_NS_ADDRESSES]

    def _addresses(self, name: dns.name.Name) -> list[str]:
        found: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                reply = self._query(name, rdtype)
            except Rfc2136Error:
                continue
            for rrset in reply.answer:
                if rrset.name == name and rrset.rdtype == rdtype:
                    found += [rd.address for rd in rrset]
        if found:
            return found
        try:  # a name server outside the zone the configured server does not answer for
            infos = socket.getaddrinfo(name.to_text(omit_final_dot=True), None, type=socket.SOCK_DGRAM)
        except OSError:
            return []
        return sorted({str(i[4][0]) for i in infos})

    def _serves(self, server: tuple[str, int], qname: dns.name.Name, value: str, deadline: float) -> bool:
        """That server answers `value` authoritatively now (no answer counts as not yet)."""
        query = dns.message.make_query(qname, dns.rdatatype.TXT)
        query.flags &= ~dns.flags.RD
        timeout = max(0.2, min(self.timeout_s, deadline - time.monotonic()))
        try:
            reply, _tcp = dns.query.udp_with_fallback(query, server[0], timeout=timeout, port=server[1])
        except (dns.exception.DNSException, OSError):
            return False
        if not reply.flags & dns.flags.AA:
            return False
        return value in self._txt_values(reply, qname)

    def clear_txt(self, name: str, value: str) -> None:
        qname = self._challenge_name(name, value)
        update = dns.update.UpdateMessage(self.zone_of(qname))
        update.delete(qname, self._rdata(value))
        self._send(update, f"delete TXT {qname}")

    def zone_of(self, qname: dns.name.Name) -> dns.name.Name:
        """The zone the server is authoritative for that holds `qname`: the owner of the SOA it returns (in
        the answer at a zone apex, else in the authority section of its NXDOMAIN / NODATA reply)."""
        reply = self._query(qname, dns.rdatatype.SOA)
        if not reply.flags & dns.flags.AA:
            raise Rfc2136Error(
                f"{self.server}:{self.port} is not authoritative for {qname} "
                f"({dns.rcode.to_text(reply.rcode())})"
            )
        for rrset in (*reply.answer, *reply.authority):
            if rrset.rdtype == dns.rdatatype.SOA and (qname == rrset.name or qname.is_subdomain(rrset.name)):
                return rrset.name
        raise Rfc2136Error(f"{self.server}:{self.port} names no zone (SOA) for {qname}")

    def served(self, qname: dns.name.Name) -> list[str]:
        """The TXT values the server answers for `qname` (non-recursive)."""
        return self._txt_values(self._query(qname, dns.rdatatype.TXT), qname)

    @staticmethod
    def _txt_values(reply: dns.message.Message, qname: dns.name.Name) -> list[str]:
        values: list[str] = []
        for rrset in reply.answer:
            if rrset.name == qname and rrset.rdtype == dns.rdatatype.TXT:
                values += [b"".join(rd.strings).decode("ascii", "replace") for rd in rrset]
        return values

    def _query(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        query = dns.message.make_query(qname, rdtype)
        query.flags &= ~dns.flags.RD
        try:
            reply, _tcp = dns.query.udp_with_fallback(
                query, self.server, timeout=self.timeout_s, port=self.port
            )
        except (dns.exception.DNSException, OSError) as exc:
            raise Rfc2136Error(
                f"no answer from {self.server}:{self.port} for {qname} ({type(exc).__name__})"
            ) from exc
        return reply

    def _send(self, update: dns.update.UpdateMessage, what: str) -> None:
        update.use_tsig(self.key.dns_key())
        try:
            reply = dns.query.tcp(update, self.server, timeout=self.timeout_s, port=self.port)
        except dns.tsig.PeerError as exc:  # the server's TSIG error: BADSIG, BADKEY, BADTIME
            raise Rfc2136Error(
                f"{self.server}:{self.port} refused the TSIG key {self.key.name!r} ({type(exc).__name__})"
            ) from exc
        except (dns.exception.DNSException, OSError) as exc:
            raise Rfc2136Error(
                f"{what}: no valid reply from {self.server}:{self.port} ({type(exc).__name__})"
            ) from exc
        rcode = reply.rcode()
        if rcode != dns.rcode.NOERROR:
            why = {
                dns.rcode.NOTAUTH: "the key may not update this zone, or the server is not its primary",
                dns.rcode.REFUSED: "the server's update policy refuses it",
                dns.rcode.NOTZONE: "the name is not in the zone",
            }.get(rcode, "")
            raise Rfc2136Error(
                f"{what}: {self.server}:{self.port} answered {dns.rcode.to_text(rcode)}"
                + (f" ({why})" if why else "")
            )

    @staticmethod
    def _challenge_name(name: str, value: str) -> dns.name.Name:
        name = name.rstrip(".").lower()
        if not name.startswith("_acme-challenge.") or len(name) > 253:
            raise GatewayUsageError(f"{name[:80]!r} is not an _acme-challenge name")
        if _TXT_VALUE.fullmatch(value) is None:
            raise GatewayUsageError("a DNS-01 value is base64url")
        try:
            return dns.name.from_text(name + ".")
        except dns.exception.DNSException as exc:
            raise GatewayUsageError(f"{name[:80]!r} is not a DNS name") from exc

    @staticmethod
    def _rdata(value: str) -> dns.rdtypes.ANY.TXT.TXT:
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode("ascii")])

    def stop(self) -> None:
        """Nothing runs here (the records are on the DNS server); for the same shape as LocalChallengeDns."""
