"""`fetch` for functions: HTTPS GET with certificate validation, a per-function host allowlist, a count per
call, a timeout and a response cap. Redirects are never followed (a redirect could leave the allowlist).

Errors are returned to the function as negative codes (the guest decides what to do), and counted in the
call's report."""

from __future__ import annotations

import ipaddress
import ssl
import urllib.parse
from dataclasses import dataclass

import httpx

__all__ = [
    "E_BAD_URL",
    "E_HOST_NOT_ALLOWED",
    "E_HTTP_STATUS",
    "E_NETWORK",
    "E_TOO_LARGE",
    "E_TOO_MANY",
    "FetchPolicy",
    "Fetcher",
    "parse_allowed_host",
]

E_HOST_NOT_ALLOWED = -1
E_TOO_MANY = -2
E_TOO_LARGE = -3
E_NETWORK = -4  # connection, TLS (certificate) or timeout failure
E_BAD_URL = -5
E_HTTP_STATUS = -6
MAX_URL_CHARS = 2048


def parse_allowed_host(entry: str) -> str:
    """'host' or 'host:port' (lower-cased); raise ValueError otherwise."""
    if not isinstance(entry, str) or not entry or len(entry) > 259:
        raise ValueError("an allowed host is a non-empty string of at most 259 characters")
    host, _, port = entry.lower().partition(":")
    if not host or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789.-" for c in host):
        raise ValueError(f"not a host name or IPv4 address: {entry!r}")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"bad port in {entry!r}")
    return host + (f":{int(port)}" if port else "")


def _public_peer(response: httpx.Response) -> bool:
    stream = response.extensions.get("network_stream")
    addr = stream.get_extra_info("server_addr") if stream is not None else None
    if not addr:
        return False
    try:
        return ipaddress.ip_address(addr[0]).is_global
    except ValueError:
        return False


@dataclass(frozen=True)
class FetchPolicy:
    """The runtime's fetch settings. Production runtimes fetch over HTTPS, validate certificates against
    `trust` (the system's roots by default) and read answers only from public (global) addresses, so an
    allowed host name that resolves to loopback or a private network cannot reach the runtime's
    neighbours. `allow_plain_http` and `allow_private_addresses` are for development and tests only."""

    trust: ssl.SSLContext | None = None
    allow_plain_http: bool = False
    allow_private_addresses: bool = False

    def context(self) -> ssl.SSLContext:
        return self.trust if self.trust is not None else ssl.create_default_context()


class Fetcher:
    """One per call: counts requests, enforces the allowlist and the caps, keeps the last status."""

    def __init__(
        self,
        policy: FetchPolicy,
        client: httpx.Client,
        allowed_hosts: frozenset[str],
        *,
        max_requests: int,
        timeout_s: float,
        max_bytes: int,
    ) -> None:
        self._policy = policy
        self._client = client
        self._allowed = allowed_hosts
        self._max_requests = max_requests
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self.requests = 0
        self.refused = 0
        self.bytes_in = 0
        self.last_status = 0
        self.events: list[str] = []

    def _allowed_url(self, url: str) -> str | int:
        if len(url) > MAX_URL_CHARS:
            return E_BAD_URL
        try:
            u = urllib.parse.urlsplit(url)
            port = u.port
        except ValueError:
            return E_BAD_URL
        if u.scheme not in ("https", "http") or not u.hostname or u.username or u.password:
            return E_BAD_URL
        if u.scheme == "http" and not self._policy.allow_plain_http:
            return E_BAD_URL
        host = u.hostname.lower()
        default = 443 if u.scheme == "https" else 80
        if host not in self._allowed and f"{host}:{port or default}" not in self._allowed:
            return E_HOST_NOT_ALLOWED
        return url

    def get(self, url: str, remaining_s: float) -> bytes | int:
        checked = self._allowed_url(url)
        if isinstance(checked, int):
            self.refused += 1
            self.events.append(f"fetch refused ({'host not allowed' if checked == -1 else 'bad url'})")
            return checked
        if self.requests >= self._max_requests:
            self.refused += 1
            self.events.append(f"fetch refused (more than {self._max_requests} requests)")
            return E_TOO_MANY
        self.requests += 1
        timeout = max(0.001, min(self._timeout_s, remaining_s))
        try:
            with self._client.stream("GET", checked, timeout=timeout, follow_redirects=False) as r:
                if not self._policy.allow_private_addresses and not _public_peer(r):
                    # checked once connected (the address actually used, whatever DNS said before); the
                    # request has gone out by then, its answer is never read
                    self.refused += 1
                    self.events.append("fetch refused (the host resolved to a non-public address)")
                    return E_HOST_NOT_ALLOWED
                self.last_status = r.status_code
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > self._max_bytes:
                        self.events.append(f"fetch response above {self._max_bytes} bytes")
                        return E_TOO_LARGE
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            self.events.append(f"fetch failed: {type(exc).__name__}")
            return E_NETWORK
        self.bytes_in += len(body)
        if not 200 <= self.last_status < 300:
            return E_HTTP_STATUS
        return bytes(body)
