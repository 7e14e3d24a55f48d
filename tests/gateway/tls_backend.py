"""A TLS echo server with its own certificate (what an app serving its RA-TLS certificate looks like to a
passthrough client)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.keys.certs import cert_to_pem, issue_cert, key_to_pem


class TlsEchoBackend:
    def __init__(
        self,
        tmp: Path,
        *,
        cert: x509.Certificate | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> None:
        if cert is None or key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            now = int(time.time())
            cert = issue_cert(
                key.public_key(),
                issuer_key=key,
                issuer_name=None,
                subject_cn="app",
                not_before=now - 60,
                not_after=now + 3600,
                server_auth=True,
            )
        self.cert_pem = cert_to_pem(cert)
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        path = tmp / "app-tls.pem"
        path.write_text(self.cert_pem + key_to_pem(key))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(path))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        self.accepted = 0  # connections that reached the app
        self._t = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                while data := tls.recv(4096):
                    tls.sendall(data)
        except (OSError, ssl.SSLError):
            pass

    def __enter__(self) -> TlsEchoBackend:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join(timeout=5)
        self.sock.close()
