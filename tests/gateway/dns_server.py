"""A local authoritative DNS server for tests (dnslib), on 127.0.0.1 only: TXT records the test sets, NXDOMAIN
for everything else, and a count of questions asked."""

from __future__ import annotations

from typing import Any

from dnslib import QTYPE, RCODE, RR, TXT, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class TxtZone(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.records: dict[str, tuple[list[bytes], int]] = {}
        self.questions: list[str] = []

    def set(self, name: str, value: str | bytes | list[bytes], ttl: int = 300) -> None:
        parts = value if isinstance(value, list) else [value.encode() if isinstance(value, str) else value]
        self.records[name.lower().rstrip(".")] = (parts, ttl)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        self.questions.append(qname)
        found = self.records.get(qname)
        if found is None or request.q.qtype != QTYPE.TXT:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        parts, ttl = found
        reply.add_answer(RR(qname, QTYPE.TXT, rdata=TXT(parts), ttl=ttl))
        return reply


class LocalDns:
    def __init__(self) -> None:
        self.zone = TxtZone()
        quiet = DNSLogger(logf=lambda _line: None)
        self.server = DNSServer(self.zone, address="127.0.0.1", port=0, logger=quiet)
        self.server.start_thread()
        self.port = int(self.server.server.server_address[1])

    def stop(self) -> None:
        self.server.stop()
        self.server.server.server_close()
