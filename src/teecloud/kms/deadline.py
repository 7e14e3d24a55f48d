"""One wall-clock deadline over a whole HTTP exchange (issue 19, "Bad input and faults").

httpx's timeouts bound each network operation, not the exchange: a peer that trickles one byte every few
seconds (in the TLS handshake, the status line and headers, or the body) holds the caller for as long as it
likes. A DKG member waits for its dealers' boards within one ceremony window (`DKG_BOARD_TIMEOUT_S`), so a
single slow dealer must not hold it past that window.

    deadline_transport(ssl_context, deadline)   an httpx transport whose every socket operation (connect,
                                                TLS handshake, each read and write) waits at most until
                                                `deadline` (a `clock()` instant); past it the operation
                                                fails as a timeout (httpx.TimeoutException)
    peer_certificate(host, port, ...)           one TLS handshake (no request) that ends by `deadline`:
                                                the server's certificate, or None when it did not finish
    read_within(response, max_bytes)            the body of a streamed response, refused (KmsClientError)
                                                once it passes `max_bytes`, before it is all read

Together: an exchange ends by `deadline` (plus one scheduler tick), and never buffers more than `max_bytes`.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpcore
import httpx

from teecloud.kms.errors import KmsClientError

__all__ = ["deadline_transport", "peer_certificate", "read_within"]

Clock = Callable[[], float]


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every blocking operation waits at most until the deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float, clock: Clock) -> None:
        self._inner, self._deadline, self._clock = inner, deadline, clock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(self._deadline, self._clock, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(self._deadline, self._clock, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        left = _left(self._deadline, self._clock, timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, left), self._deadline, self._clock
        )

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, deadline: float, clock: Clock) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline, self._clock = deadline, clock

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = _left(self._deadline, self._clock, timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, left, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline, self._clock)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        left = _left(self._deadline, self._clock, timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.connect_unix_socket(path, left, socket_options), self._deadline, self._clock
        )

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _left(deadline: float, clock: Clock, timeout: float | None, late: type[Exception]) -> float:
    left = deadline - clock()
    if left <= 0:
        raise late("the exchange's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineTransport(httpx.HTTPTransport):
    def __init__(self, ssl_context: ssl.SSLContext, deadline: float, clock: Clock) -> None:
        super().__init__(verify=ssl_context)
        # httpx builds its connection pool without a way to pass a network backend: the same pool, over ours
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, network_backend=_DeadlineBackend(deadline, clock)
        )


def deadline_transport(
    ssl_context: ssl.SSLContext, deadline: float, *, clock: Clock = time.monotonic
) -> httpx.HTTPTransport:
    """An httpx transport (TLS through `ssl_context`) whose exchanges end by `deadline` (module docstring)."""
    return _DeadlineTransport(ssl_context, deadline, clock)


def peer_certificate(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    deadline: float,
    timeout: float,
    clock: Clock = time.monotonic,
) -> bytes | None:
    """One TLS handshake with `host`:`port` and no request, each step waiting at most `timeout` and all of
    it ending by `deadline`: the certificate (DER) the server presented, None when there was none or the
    handshake did not finish (refused, failed, or too slow). The caller checks the certificate."""
    backend = _DeadlineBackend(deadline, clock)
    try:
        raw = backend.connect_tcp(host, port, timeout)
        try:
            tls = raw.start_tls(ssl_context, host, timeout)
            try:
                ssl_object = tls.get_extra_info("ssl_object")
                der = ssl_object.getpeercert(True) if ssl_object is not None else None
            finally:
                tls.close()
        finally:
            raw.close()
    except (httpcore.TimeoutException, httpcore.NetworkError, OSError):
        return None
    return bytes(der) if der else None


def read_within(response: httpx.Response, max_bytes: int) -> bytes:
    """The body of a streamed `response` (httpx `Client.stream`), read in chunks and refused once it passes
    `max_bytes` (the rest is never read)."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise KmsClientError(f"the answer is larger than {max_bytes} bytes")
    return bytes(body)
