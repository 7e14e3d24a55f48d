"""The app's port policy, read from its app-compose.json after checking that file is the attested one, pure.

dstack's field (`dstack-types` `AppCompose.port_policy`):

    "port_policy": {"restrict_mode": true, "ports": [{"port": 8080, "pp": false}, ...]}

`restrict_mode` true: only the listed ports are routed; false or no `port_policy`: every registered port is.
`pp` asks for PROXY protocol v2 toward the CVM: the gateway's connections to that port start with the
header carrying the client's address (teecloud.gateway.haproxy, `send-proxy-v2`).

teecloud's one extension, per port: `"h2c": true` says the app serves HTTP/2 cleartext (prior knowledge)
on that port, so the gateway speaks h2c to it for the port's plain (terminated) names too, not only for
its `g` names. dstack's `PortAttrs` ignores fields it does not know (serde without deny_unknown_fields), so
a policy with it still reads there; absent or false: HTTP/1.1 as before, and `to_json` writes no `h2c` key
(a policy without it hashes as before).

`port_policy_of(app_compose, compose_hash)` (1) parses the bytes (size- and depth-bounded,
teecloud.appcompose.parse_app_compose), (2) recomputes sha256 of the normalized form and compares it with
the compose hash from the attested certificate's boot_info — so the policy is a fact recomputed from
measured values, never the sender's word — then (3) reads the policy. Each failure is a BadPortPolicy.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from teecloud.appcompose import AppComposeError, compose_hash, parse_app_compose
from teecloud.gateway.errors import GatewayError

__all__ = [
    "MAX_POLICY_PORTS",
    "UNRESTRICTED",
    "BadPortPolicy",
    "ComposeHashMismatch",
    "PortPolicy",
    "parse_port_policy",
    "port_policy_of",
]

MAX_POLICY_PORTS = 256


class BadPortPolicy(GatewayError):
    """The app-compose.json sent at registration is unusable, or its port policy is malformed."""


class ComposeHashMismatch(BadPortPolicy):
    """The app-compose.json sent at registration is not the one the CVM booted (its hash differs)."""


@dataclass(frozen=True)
class PortPolicy:
    restrict_mode: bool = False
    ports: tuple[tuple[int, bool], ...] = ()  # (port, pp), sorted
    h2c: tuple[int, ...] = ()  # listed ports whose backend speaks h2c (teecloud's extension), sorted

    def allows(self, port: int) -> bool:
        return not self.restrict_mode or any(p == port for p, _pp in self.ports)

    def wants_proxy_protocol(self, port: int) -> bool:
        return any(p == port and pp for p, pp in self.ports)

    def wants_h2c(self, port: int) -> bool:
        return port in self.h2c

    def to_json(self) -> dict[str, Any]:
        """dstack's form (with `h2c` only on the ports that have it), as written into app-compose.json."""
        ports = [{"port": p, "pp": pp, **({"h2c": True} if p in self.h2c else {})} for p, pp in self.ports]
        return {"restrict_mode": self.restrict_mode, "ports": ports}


UNRESTRICTED = PortPolicy()


def _policy(doc: dict[str, Any]) -> PortPolicy:
    return parse_port_policy(doc.get("port_policy"))


def parse_port_policy(raw: object) -> PortPolicy:
    """A `port_policy` value (dstack's form; None: no policy), strictly: BadPortPolicy for anything else."""
    if raw is None:
        return UNRESTRICTED
    if not isinstance(raw, dict) or set(raw) - {"restrict_mode", "ports"}:
        raise BadPortPolicy("port_policy must be an object with 'restrict_mode' and 'ports' only")
    restrict = raw.get("restrict_mode", False)
    ports = raw.get("ports", [])
    if not isinstance(restrict, bool):
        raise BadPortPolicy("port_policy.restrict_mode must be true or false")
    if not isinstance(ports, list) or len(ports) > MAX_POLICY_PORTS:
        raise BadPortPolicy(f"port_policy.ports must be a list of at most {MAX_POLICY_PORTS}")
    out: dict[int, bool] = {}
    h2c: set[int] = set()
    shape = "each port_policy.ports entry must be {'port': <1..65535>, 'pp': <bool>, 'h2c': <bool>}"
    for item in ports:
        if not isinstance(item, dict) or set(item) - {"port", "pp", "h2c"}:
            raise BadPortPolicy(shape)
        port, pp, h2 = item.get("port"), item.get("pp", False), item.get("h2c", False)
        if (
            type(port) is not int
            or not 1 <= port <= 65535
            or not isinstance(pp, bool)
            or not isinstance(h2, bool)
        ):
            raise BadPortPolicy(shape)
        if port in out:
            raise BadPortPolicy(f"port {port} is listed twice in port_policy.ports")
        out[port] = pp
        if h2:
            h2c.add(port)
    return PortPolicy(restrict, tuple(sorted(out.items())), tuple(sorted(h2c)))


def port_policy_of(app_compose: bytes, attested_compose_hash: bytes) -> PortPolicy:
    """The port policy of the app-compose.json hashing to `attested_compose_hash` (from verified evidence)."""
    # (1): parse, bounded
    try:
        doc = parse_app_compose(app_compose)
        # (2): the file the CVM booted, recomputed from the measured hash
        digest = compose_hash(doc)
    except (AppComposeError, ValueError, TypeError) as exc:
        raise BadPortPolicy(f"the app-compose.json sent is unusable: {str(exc)[:200]}") from exc
    if not hmac.compare_digest(digest, attested_compose_hash):
        raise ComposeHashMismatch(
            "the app-compose.json sent does not hash (normalized sha256) to the attested compose hash "
            f"{attested_compose_hash.hex()[:16]}..."
        )
    # (3): its policy
    return _policy(doc)
