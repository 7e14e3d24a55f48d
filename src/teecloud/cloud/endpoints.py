"""Where a running cloud listens: the contract between the process that starts it (teecloud.devstack, or any
deployment) and the clients that orchestrate over it (teecloud.cloud.deploy, the CLI)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teecloud._fs import data_home

__all__ = ["ENDPOINTS_FILE", "CloudEndpoints", "endpoints_path", "read_endpoints"]

ENDPOINTS_FILE = "endpoints.json"


def endpoints_path(home: Path | None = None) -> Path:
    return (Path(home) if home is not None else data_home()) / "cloud" / ENDPOINTS_FILE


@dataclass
class CloudEndpoints:
    chain_rpc: str
    kms: str
    kms_admin: str
    node: str
    pid: int
    node_token_file: str
    contracts: dict[str, Any] = field(default_factory=dict)
    # the local gateway (teecloud.gateway): public_port, base_domain, ca_file, registration, admin; {} if none
    gateway: dict[str, Any] = field(default_factory=dict)
    # the start time of `pid` (proc(5) /proc/PID/stat field 22): `teecloud down` signals `pid` only while it
    # is this very process, never a later holder of a reused pid (review 11, R11-3); None: an older record
    pid_start_time: int | None = None


def read_endpoints(home: Path | None = None) -> CloudEndpoints | None:
    """The endpoints of the running `teecloud up` for this data directory (None if it is not running)."""
    path = endpoints_path(home)
    try:
        data = json.loads(path.read_text())
        ep = CloudEndpoints(**data)
    except (OSError, ValueError, TypeError):
        return None
    try:
        os.kill(ep.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ep
