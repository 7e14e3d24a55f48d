"""Custom domains: `_dstack-app-address.<domain>` TXT records, dstack's format, passthrough only.

A custom domain's owner publishes

    _dstack-app-address.<domain>            TXT "<app_id>:<port>"
    _tapp-address.<domain>                  TXT "<app_id>:<port>"   (the legacy prefix, dstack's compat mode)
    _dstack-app-address-wildcard.<parent>   TXT "<app_id>:<port>"   (fallback for every <label>.<parent>)

asked in that order, as dstack's gateway does (`dstack/gateway/src/proxy/tls_passthough.rs`, with its default
`app_address_ns_compat = true`): the current prefix wins when both exact names have a TXT record, the legacy
one is used when the current has none, and only when neither exact name has one is the wildcard of the parent
asked (dstack has no legacy wildcard: `_tapp-address-wildcard` is never asked). A record that is there but is
not `<app_id>:<port>` ends the lookup, refused: it does not fall through to the next name (dstack's parse
error does the same). A TLS connection whose SNI is such a domain goes, untouched, to the app's port (its own
certificate answers): the gateway never holds a custom domain's key. Only an app registered with this
gateway for that port is reachable; a TXT record naming anything else routes nothing.

    check_domain(sni)          -> str            a lower-case LDH name of >= 2 labels, or BadHostName
    parse_address(txt)         -> (app_id, port) or BadHostName
    CustomDomains.resolve(sni) -> Resolution(address, source, expires_at): the answer, the TXT name that gave
                                  it, and until when it is kept; positive answers cached for their TTL (at
                                  most `max_ttl_s`), negative ones (NXDOMAIN, no TXT, malformed, DNS failure)
                                  for `negative_ttl_s` (at most 10 s); the cache is bounded
    CustomDomains.lookup(sni)  -> (app_id, port) | None
    DnslibResolver             the `TxtResolver` over UDP (TCP when truncated) to one DNS server, with dnslib
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from teecloud.gateway.errors import BadHostName, GatewayUsageError

__all__ = [
    "LEGACY_PREFIX",
    "PREFIX",
    "CustomDomains",
    "DnslibResolver",
    "Resolution",
    "TxtAnswer",
    "TxtResolver",
    "check_domain",
    "parse_address",
]

PREFIX = "_dstack-app-address"
LEGACY_PREFIX = "_tapp-address"  # dstack's name before the rename (its CHANGELOG), still asked by default
MAX_TXT = 255  # one character-string (RFC 1035 3.3.14); "<40 hex>:<port>" is at most 46
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ADDRESS = re.compile(r"(?P<app_id>[0-9a-fA-F]{40}):(?P<port>[1-9][0-9]{0,4})")


@dataclass(frozen=True)
class TxtAnswer:
    texts: tuple[str, ...]  # each record's character-strings joined
    ttl_s: int


@dataclass(frozen=True)
class Resolution:
    address: tuple[str, int] | None  # (app_id, port), or None: no route
    source: str | None  # the TXT name whose record answered (None when none did)
    expires_at: float  # on the CustomDomains clock: the answer is kept until then


class TxtResolver(Protocol):
    """TXT records of a name; None when the name or its TXT records do not exist. Raises OSError when
    the DNS cannot be asked (timeout, refused)."""

    def txt(self, name: str) -> TxtAnswer | None: ...


def check_domain(sni: str | bytes) -> str:
    """A host name a client may ask for: ASCII letters, digits and hyphens, 2 to 127 labels, at most 253
    characters, no wildcard, no empty label. Lower-cased, without a trailing dot."""
    if isinstance(sni, bytes):
        try:
            sni = sni.decode("ascii")
        except UnicodeDecodeError as exc:
            raise BadHostName("the server name is not ASCII") from exc
    if not sni or len(sni) > 253 or not sni.isascii():
        raise BadHostName("the server name is empty, not ASCII or longer than 253 characters")
    name = sni.lower().removesuffix(".")
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(x) for x in labels):
        raise BadHostName(f"{name[:80]!r} is not a DNS name of two labels or more (letters, digits, '-')")
    return name


def parse_address(txt: str) -> tuple[str, int]:
    """dstack's `<app_id>:<port>` (app_id 40 hex digits, port 1..65535)."""
    m = _ADDRESS.fullmatch(txt.strip())
    if m is None or int(m["port"]) > 65535:
        raise BadHostName(f"TXT value {txt[:60]!r} is not <app_id>:<port>")
    return m["app_id"].lower(), int(m["port"])


class CustomDomains:
    def __init__(
        self,
        resolver: TxtResolver,
        *,
        base_domain: str,
        max_ttl_s: int = 3600,
        negative_ttl_s: float = 10.0,
        max_entries: int = 4096,
        legacy: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= negative_ttl_s <= 10:
            raise GatewayUsageError("negative answers are cached for at most 10 s")
        self.resolver = resolver
        self.base_domain = base_domain
        self.max_ttl_s = max_ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_entries = max_entries
        self.legacy = legacy  # also ask `_tapp-address.<domain>` (dstack's `app_address_ns_compat`)
        self.clock = clock
        self.queries = 0  # DNS questions asked (for tests and metrics)
        self.cache_hits = 0
        self.found = 0  # lookups (cache or DNS) that named an app
        self.not_found = 0
        # DNS answers that named an app, by the record that gave them (how many still use the legacy prefix)
        self.answers = {"current": 0, "legacy": 0, "wildcard": 0}
        self._cache: OrderedDict[str, Resolution] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, sni: str | bytes) -> tuple[str, int] | None:
        """(app_id, port) the domain's TXT record names, or None. BadHostName for a name that is not one."""
        return self.lookup_until(sni)[0]

    def lookup_until(self, sni: str | bytes) -> tuple[tuple[str, int] | None, float]:
        """lookup(), and until when (this object's clock) the answer may be kept."""
        got = self.resolve(sni)
        return got.address, got.expires_at

    def resolve(self, sni: str | bytes) -> Resolution:
        """The answer for a domain, the TXT name it came from and until when it is kept (cached)."""
        name = check_domain(sni)
        if name == self.base_domain or name.endswith("." + self.base_domain):
            raise BadHostName("names under the base domain are routed by their own label, not by TXT")
        now = self.clock()
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit.expires_at > now:
                self.cache_hits += 1
                self._count(hit.address)
                return hit
        answer, source, ttl = self._resolve(name)
        got = Resolution(answer, source, now + ttl)
        with self._lock:
            self._cache.pop(name, None)
            self._cache[name] = got
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            self._count(answer)
        return got

    def _count(self, answer: tuple[str, int] | None) -> None:
        if answer is None:
            self.not_found += 1
        else:
            self.found += 1

    def metrics(self) -> str:
        """Prometheus lines: lookups by result, cache hits, DNS questions."""
        return (
            "# HELP teecloud_gateway_custom_domain_lookups_total Custom domain lookups, by result.\n"
            "# TYPE teecloud_gateway_custom_domain_lookups_total counter\n"
            f'teecloud_gateway_custom_domain_lookups_total{{result="found"}} {self.found}\n'
            f'teecloud_gateway_custom_domain_lookups_total{{result="not_found"}} {self.not_found}\n'
            "# TYPE teecloud_gateway_custom_domain_cache_hits_total counter\n"
            f"teecloud_gateway_custom_domain_cache_hits_total {self.cache_hits}\n"
            "# TYPE teecloud_gateway_custom_domain_dns_questions_total counter\n"
            f"teecloud_gateway_custom_domain_dns_questions_total {self.queries}\n"
            "# HELP teecloud_gateway_custom_domain_answers_total DNS answers naming an app, by TXT record.\n"
            "# TYPE teecloud_gateway_custom_domain_answers_total counter\n"
            + "".join(
                f'teecloud_gateway_custom_domain_answers_total{{record="{k}"}} {n}\n'
                for k, n in self.answers.items()
            )
        )

    def _resolve(self, name: str) -> tuple[tuple[str, int] | None, str | None, float]:
        """Ask the exact names (current prefix, then legacy), then the parent's wildcard; the first name with
        a TXT record decides. A DNS failure is a negative answer: whether an earlier name has a record is then
        unknown, so a later one is not taken in its place."""
        parent = name.partition(".")[2]
        questions = [("current", f"{PREFIX}.{name}")]
        if self.legacy:
            questions.append(("legacy", f"{LEGACY_PREFIX}.{name}"))
        if "." in parent:  # a wildcard needs a parent of two labels or more
            questions.append(("wildcard", f"{PREFIX}-wildcard.{parent}"))
        for kind, q in questions:
            if len(q) > 253:
                continue
            self.queries += 1
            try:
                got = self.resolver.txt(q)
            except OSError:
                return None, None, self.negative_ttl_s
            if got is None or not got.texts:
                continue
            try:
                address = parse_address(got.texts[0])
            except BadHostName:
                return None, q, self.negative_ttl_s
            with self._lock:
                self.answers[kind] += 1
            return address, q, float(max(0, min(got.ttl_s, self.max_ttl_s)))
        return None, None, self.negative_ttl_s


class DnslibResolver:
    """TXT lookups against one DNS server (UDP, then TCP if the answer is truncated), with dnslib."""

    def __init__(self, server: str, port: int = 53, *, timeout_s: float = 1.0) -> None:
        self.server = server
        self.port = port
        self.timeout_s = timeout_s

    def txt(self, name: str) -> TxtAnswer | None:
        import dnslib  # imported here: only gateways that serve custom domains need it

        q = dnslib.DNSRecord.question(name, "TXT")
        try:
            raw = q.send(self.server, self.port, timeout=self.timeout_s)
            reply = dnslib.DNSRecord.parse(raw)
            if reply.header.tc:
                reply = dnslib.DNSRecord.parse(
                    q.send(self.server, self.port, tcp=True, timeout=self.timeout_s)
                )
        except (dnslib.DNSError, ValueError, IndexError) as exc:
            raise OSError(f"malformed DNS answer for {name}: {exc}") from exc
        if reply.header.id != q.header.id:
            raise OSError("DNS answer id does not match the question")
        if reply.header.rcode == dnslib.RCODE.NXDOMAIN:
            return None
        if reply.header.rcode != dnslib.RCODE.NOERROR:
            raise OSError(f"DNS answered {dnslib.RCODE.get(reply.header.rcode)} for {name}")
        texts: list[str] = []
        ttl = None
        for rr in reply.rr:
            if rr.rtype != dnslib.QTYPE.TXT or str(rr.rname).rstrip(".").lower() != name.lower():
                continue
            parts = [bytes(p) for p in rr.rdata.data]
            texts.append(b"".join(parts).decode("ascii", "replace")[:MAX_TXT])
            ttl = rr.ttl if ttl is None else min(ttl, rr.ttl)
        return TxtAnswer(tuple(texts), int(ttl or 0)) if texts else None
