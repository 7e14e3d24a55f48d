"""pebble (Let's Encrypt's ACME test CA, Debian package) on 127.0.0.1 for tests: its own config in a temporary
directory, a TLS certificate for its listeners made here (so the test trusts exactly it), its DNS resolver
pointed at a local DNS server, no validation sleeps, no nonce rejections, no authorization reuse."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from teecloud.keys.certs import cert_to_pem, issue_cert, key_to_pem


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pebble_path() -> str:
    path = shutil.which("pebble")
    if path is None:
        raise RuntimeError("pebble is missing: apt-get install pebble (scripts/setup.sh does)")
    return path


class Pebble:
    def __init__(self, workdir: Path, dns_port: int) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        now = int(time.time())
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = issue_cert(
            ca_key.public_key(),
            issuer_key=ca_key,
            issuer_name=None,
            subject_cn="pebble listener test CA",
            not_before=now - 60,
            not_after=now + 3600,
            ca=True,
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_cert(
            key.public_key(),
            issuer_key=ca_key,
            issuer_name=ca.subject,
            subject_cn="localhost",
            not_before=now - 60,
            not_after=now + 3600,
            alt_names=("127.0.0.1", "localhost"),
            server_auth=True,
        )
        self.ca_bundle = str(workdir / "listener-ca.pem")
        Path(self.ca_bundle).write_text(cert_to_pem(ca))
        (workdir / "cert.pem").write_text(cert_to_pem(cert))
        (workdir / "key.pem").write_text(key_to_pem(key))
        self.port = free_port()
        self.mgmt_port = free_port()
        config = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(workdir / "cert.pem"),
            "privateKey": str(workdir / "key.pem"),
            "httpPort": free_port(),
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        (workdir / "pebble.json").write_text(json.dumps({"pebble": config}))
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        }
        self.log = open(workdir / "pebble.log", "wb")
        self.proc = subprocess.Popen(
            [pebble_path(), "-config", str(workdir / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns_port}"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self._get(f"{self.directory_url}")
                break
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = (workdir / "pebble.log").read_text()[-2000:]
                    raise RuntimeError(f"pebble did not start: {tail}") from exc
                time.sleep(0.1)

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=self.ca_bundle)
        with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
            return bytes(r.read())

    def root_pem(self) -> str:
        """The issuing root, from pebble's management interface (it makes a new one at every start)."""
        return self._get(f"https://127.0.0.1:{self.mgmt_port}/roots/0").decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()
