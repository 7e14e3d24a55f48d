"""Container states from `docker inspect` output, read the same way by the node's Docker backend (on the
host) and by the guest agent (inside a CVM). A module of its own: the guest agent may not import node
internals, and nothing in teecloud.node outside node.runtime may import the Docker backend.

Each state carries the fields of teecloud.node.runtime.base.ContainerState: the Compose service (label
`com.docker.compose.service`), the container name, its state and health, its exit code, and the ports Docker
publishes (`NetworkSettings.Ports`: one entry per host binding).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["container_states"]


def container_states(inspect_output: str | bytes) -> list[dict[str, Any]]:
    """The ContainerState fields of each container in `docker inspect` output (a JSON array), sorted by
    container name, each one's ports sorted by (container port, host port)."""
    states = []
    for c in json.loads(inspect_output):
        labels = (c.get("Config") or {}).get("Labels") or {}
        st = c.get("State") or {}
        ports = []
        for key, binds in ((c.get("NetworkSettings") or {}).get("Ports") or {}).items():
            cport, _, proto = key.partition("/")
            for b in binds or []:
                ports.append(
                    {
                        "container_port": int(cport),
                        "protocol": proto or "tcp",
                        "host_ip": b.get("HostIp"),
                        "host_port": int(b.get("HostPort") or 0),
                    }
                )
        states.append(
            {
                "service": str(labels.get("com.docker.compose.service", "?")),
                "container": str(c.get("Name", "")).lstrip("/"),
                "state": str(st.get("Status", "unknown")),
                "health": (st.get("Health") or {}).get("Status"),
                "exit_code": int(st.get("ExitCode") or 0),
                "ports": sorted(ports, key=lambda p: (p["container_port"], p["host_port"])),
            }
        )
    return sorted(states, key=lambda s: s["container"])
