"""A backend that expects the PROXY protocol v2 header (haproxy.org/download/2.6/doc/proxy-protocol.txt,
section 2.2) at the start of every connection, parsed here independently of HAProxy: the 12-byte signature,
version 2, command PROXY, TCP over IPv4/IPv6, the addresses block, then TLVs (skipped). After the header it
answers HTTP/1.1 requests with `pp src=<ip>:<port>`, or, for bytes that are not HTTP (a TLS ClientHello in
passthrough), records them and closes. A connection without a valid header is recorded and closed."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class BadProxyHeader(ValueError):
    pass


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BadProxyHeader(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def parse_proxy_v2(sock: socket.socket) -> tuple[str, int, str, int]:
    """(src ip, src port, dst ip, dst port) from the header at the start of `sock`."""
    head = read_exact(sock, 16)
    if head[:12] != SIGNATURE:
        raise BadProxyHeader(f"no PROXY v2 signature: {head[:12]!r}")
    version, command = head[12] >> 4, head[12] & 0x0F
    family, transport = head[13] >> 4, head[13] & 0x0F
    (length,) = struct.unpack("!H", head[14:16])
    body = read_exact(sock, length)
    if version != 2 or command != 1:
        raise BadProxyHeader(f"version {version} command {command}: not PROXY v2 / PROXY")
    if transport != 1:
        raise BadProxyHeader(f"transport {transport}: not STREAM")
    if family == 1 and length >= 12:
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    elif family == 2 and length >= 36:
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
    else:
        raise BadProxyHeader(f"family {family} with {length} address bytes")
    return str(src), sport, str(dst), dport


class ProxyV2Backend:
    def __init__(self) -> None:
        self.headers: list[tuple[str, int, str, int]] = []
        self.bad: list[str] = []
        self.raw_after_header: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self._stop = False
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                src, sport, dst, dport = parse_proxy_v2(conn)
            except (BadProxyHeader, OSError) as exc:
                self.bad.append(str(exc))
                return
            self.headers.append((src, sport, dst, dport))
            buf = b""
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    if not buf.startswith((b"GET ", b"POST ", b"HEAD ")):
                        self.raw_after_header.append(buf)
                        return
                    while b"\r\n\r\n" in buf:
                        _request, _sep, buf = buf.partition(b"\r\n\r\n")
                        body = f"pp src={src}:{sport}".encode()
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                return

    def stop(self) -> None:
        self._stop = True
        self.sock.close()
