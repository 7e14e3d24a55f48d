"""hello: a tiny web service that runs inside a teecloud CVM.

It talks to the guest agent through the official dstack-sdk client (over /var/run/dstack.sock), and serves:
  GET /          app identity (Info), a derived key and its signature chain
  GET /quote     a fresh quote binding ?nonce= (hex, <= 64 bytes) plus the event log, for verifiers
  GET /secret    whether the SECRET (or ?name=) env var arrived, and its sha256 (never the value)
  GET /note      the text stored on the encrypted volume (/data/note.txt)
  PUT /note      store the request body on the encrypted volume
Only the Python standard library and dstack-sdk are used.
"""

from __future__ import annotations

import hashlib
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from dstack_sdk import DstackClient

DATA = Path(os.environ.get("HELLO_DATA", "/data"))
PORT = int(os.environ.get("HELLO_PORT", "8080"))
MAX_BODY = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    server_version = "hello/0.1"

    def log_message(self, format: str, *args: object) -> None:
        print("hello:", format % args, flush=True)

    def _send(self, status: int, body: dict) -> None:
        data = (json.dumps(body, indent=2) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        try:
            if url.path == "/":
                client = DstackClient()
                info = client.info()
                key = client.get_key("hello", "demo")
                self._send(
                    200,
                    {
                        "app_id": info.app_id,
                        "instance_id": info.instance_id,
                        "compose_hash": info.compose_hash,
                        "app_name": info.app_name,
                        "key": key.key,
                        "signature_chain": key.signature_chain,
                    },
                )
            elif url.path == "/quote":
                nonce = parse_qs(url.query).get("nonce", [""])[0]
                report_data = bytes.fromhex(nonce) if nonce else b"hello"
                quote = DstackClient().get_quote(report_data)
                self._send(200, {"quote": quote.quote, "event_log": quote.event_log})
            elif url.path == "/secret":
                name = parse_qs(url.query).get("name", ["SECRET"])[0]
                value = os.environ.get(name)
                digest = hashlib.sha256(value.encode()).hexdigest() if value is not None else None
                self._send(200, {"present": value is not None, "sha256": digest})
            elif url.path == "/note":
                note = DATA / "note.txt"
                self._send(200, {"note": note.read_text() if note.exists() else None})
            elif url.path == "/health":
                self._send(200, {"ok": True})
            else:
                self._send(404, {"error": "not found"})
        except ValueError as exc:
            self._send(400, {"error": str(exc)})
        except Exception as exc:  # report, keep serving
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_PUT(self) -> None:
        if urlparse(self.path).path != "/note":
            self._send(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._send(413, {"error": "note too large"})
            return
        body = self.rfile.read(length).decode("utf-8", "replace")
        DATA.mkdir(parents=True, exist_ok=True)
        tmp = DATA / ".note.tmp"
        tmp.write_text(body)
        os.replace(tmp, DATA / "note.txt")
        self._send(200, {"stored": len(body)})


if __name__ == "__main__":
    print(f"hello: listening on :{PORT}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
