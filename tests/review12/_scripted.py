"""A scripted TLS server for the twelfth review: each accepted connection is handed, TLS done, to a
function that plays the hostile KMS node's part byte for byte. Bound to 127.0.0.1, daemon threads, every
socket with a timeout."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable

from teecloud.kms.deadline import open_connection
from tests.kms.test_threshold_dkg_deadline import _client_context, _server_context

Handler = Callable[[ssl.SSLSocket], None]


def read_request(tls: ssl.SSLSocket) -> bytes:
    """One request's head and body (the client under test sends a small JSON body with Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            break
        body += chunk
    return data


class Scripted:
    def __init__(self, handler: Handler, ctx: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ctx = ctx or _server_context()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(20)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                self.handler(tls)
        except (OSError, ssl.SSLError, ValueError):
            return

    def connect(self, deadline_s: float = 10.0, timeout: float = 10.0):  # type: ignore[no-untyped-def]
        return open_connection(
            "127.0.0.1",
            self.port,
            _client_context(),
            deadline=time.monotonic() + deadline_s,
            timeout=timeout,
        )

    def stop(self) -> None:
        self.sock.close()
