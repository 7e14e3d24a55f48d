"""A real BIND9 `named` (Debian bind9) on a loopback address for tests: its own config in a temporary
directory, one local primary zone, dynamic updates allowed only to one TSIG key and only for
`_acme-challenge.<zone>` TXT. With `secondaries` the zone's NS set names them too and the primary NOTIFYs
them and allows them zone transfers; `Bind(..., primary=(ip, port))` is such a secondary (AXFR / IXFR)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from .pebble import free_port


def named_path() -> str:
    path = shutil.which("named") or ("/usr/sbin/named" if os.path.exists("/usr/sbin/named") else None)
    if path is None:
        raise RuntimeError("named is missing: apt-get install bind9 (scripts/setup.sh does)")
    return path


class Bind:
    def __init__(
        self,
        workdir: Path,
        zone: str,
        *,
        key_name: str = "acme-gw",
        listen: str = "127.0.0.1",
        port: int | None = None,
        secondaries: tuple[str, ...] = (),
        notify: bool = True,
        primary: tuple[str, int] | None = None,
    ) -> None:
        self.workdir = workdir
        self.zone = zone
        self.listen = listen
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o777)  # named may drop to the `bind` user; it writes the zone's journal here
        self.port = port or free_port()
        self.key_name = key_name
        self.secret = base64.b64encode(os.urandom(32)).decode()
        self.key_file = workdir / "acme.key"
        self.key_file.write_text(
            f'key "{key_name}" {{\n\talgorithm hmac-sha256;\n\tsecret "{self.secret}";\n}};\n'
        )
        self.key_file.chmod(0o600)
        ns = "".join(
            f"@ IN NS ns{i + 2}.{zone}.\nns{i + 2} IN {'AAAA' if ':' in ip else 'A'} {ip}\n"
            for i, ip in enumerate(secondaries)
        )
        (workdir / f"{zone}.zone").write_text(
            f"$TTL 60\n@ IN SOA ns1.{zone}. hostmaster.{zone}. 1 3600 600 86400 60\n"
            f"@ IN NS ns1.{zone}.\nns1 IN {'AAAA' if ':' in listen else 'A'} {listen}\n{ns}"
        )
        (workdir / f"{zone}.zone").chmod(0o666)
        v6 = ":" in listen  # named listens only on interface addresses (here 127.0.0.1 and ::1)
        if primary is not None:  # a secondary: the zone comes by transfer (refresh 3600 s: only NOTIFY)
            zone_conf = f"""    type secondary;
    primaries {{ {primary[0]} port {primary[1]}; }};
    allow-notify {{ 127.0.0.1; ::1; }};  # the primary's NOTIFY to ::1 comes from ::1
    file "{workdir}/{zone}.secondary";"""
        else:
            also = "".join(f"{ip} port {self.port}; " for ip in secondaries)
            zone_conf = f"""    type primary;
    file "{workdir}/{zone}.zone";
    update-policy {{ grant {key_name} name _acme-challenge.{zone}. TXT; }};
    allow-transfer {{ 127.0.0.0/8; }};
    notify {"explicit" if notify and secondaries else "no"};
    {f"also-notify {{ {also}}};" if notify and secondaries else ""}"""
        conf = workdir / "named.conf"
        conf.write_text(
            f"""
include "{self.key_file}";
options {{
    directory "{workdir}";
    pid-file "{workdir}/named.pid";
    session-keyfile "{workdir}/session.key";
    listen-on port {self.port} {{ {"none" if v6 else listen}; }};
    listen-on-v6 port {self.port} {{ {listen if v6 else "none"}; }};
    recursion no;
    dnssec-validation no;
    notify no;
}};
controls {{ }};
zone "{zone}" {{
{zone_conf}
}};
"""
        )
        self._log = open(workdir / "named.log", "wb")
        self.proc = subprocess.Popen(
            [named_path(), "-g", "-c", str(conf)], stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait()

    def _wait(self) -> None:
        """Until named answers the zone's SOA authoritatively (a secondary: after its first transfer). Its
        "running" log line is not enough: under load it answered SERVFAIL for a moment after it."""
        deadline = time.monotonic() + 15
        query = dns.message.make_query(self.zone + ".", dns.rdatatype.SOA)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"named exited: {(self.workdir / 'named.log').read_text()[-2000:]}")
            try:
                reply = dns.query.udp(query, self.listen, timeout=0.5, port=self.port)
                if reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA and reply.answer:
                    return
            except (dns.exception.DNSException, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("named did not serve its zone within 15 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
