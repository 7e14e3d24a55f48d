"""The guest agent's host-facing listener inside a qemu-backend VM (what `teecloud image build` installs as
/opt/teecloud/vm_agent.py and the guest's init starts).

Standard library only: the image copies this file into the rootfs as a script (the guest has Debian's
python3, none of teecloud's dependencies), so it imports nothing from teecloud.

What the host may ask (and nothing else; never a quote over bytes the host chose):
    GET /info   {"guest", "compose_hash", "tee"}: the compose hash is sha256 of app-compose.json as read
                from the read-only host share by the guest itself (dstack's compose hash), so the node can
                check that the VM runs the instance it launched
Any other method or path is a 404/405. Requests are bounded by http.server (64 KiB request line, 100
headers) and a per-connection timeout.

Not done here (docs/node.md, "What is not done yet"): the boot sequence in the guest (RTMR3, keys from the
KMS, env, LUKS2, Compose, /var/run/dstack.sock) and `GET /attest`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

GUEST_NAME = "teecloud-guest"
AGENT_PORT = 8090
GUEST_ADDRESS = "10.0.2.10"
MAX_APP_COMPOSE = 512 * 1024
# plain mode: no TEE at all (a simulated one is not reachable from this stdlib-only listener)
TEE = "none (plain mode: not confidential)"


def read_info(shared: Path) -> dict[str, str]:
    """What `GET /info` answers, read once at start from the host share."""
    raw = (shared / "app-compose.json").read_bytes()[: MAX_APP_COMPOSE + 1]
    if len(raw) > MAX_APP_COMPOSE:
        raise ValueError(f"app-compose.json is larger than {MAX_APP_COMPOSE} bytes")
    return {"guest": GUEST_NAME, "compose_hash": hashlib.sha256(raw).hexdigest(), "tee": TEE}


def make_handler(info: dict[str, str]) -> type[BaseHTTPRequestHandler]:
    body = json.dumps(info).encode()

    class Handler(BaseHTTPRequestHandler):
        timeout = 10
        server_version = "teecloud-vm-agent"

        def do_GET(self) -> None:  # http.server's name
            if self.path != "/info":
                self.send_error(404, "not found")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write("vm-agent: " + (format % args) + "\n")

    return Handler


def main(argv: list[str]) -> int:
    shared = Path(argv[1]) if len(argv) > 1 else Path("/dstack/.host-shared")
    try:
        info = read_info(shared)
    except (OSError, ValueError) as exc:
        print(f"vm-agent: cannot read the host share {shared}: {exc}", file=sys.stderr)
        return 1
    print(f"vm-agent: compose hash {info['compose_hash']}; listening on port {AGENT_PORT}", flush=True)
    # the address QEMU's user network forwards the host's loopback port to (the init configures it)
    HTTPServer((GUEST_ADDRESS, AGENT_PORT), make_handler(info)).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
