"""Runtime backends that run a CVM's app, behind `Runtime` (base.py). `docker`: Docker Engine + Compose."""

from teecloud.node.runtime.base import ComposeSpec, ContainerState, LogSource, ResourceLimits, Runtime
from teecloud.node.runtime.docker import DockerRuntime, make_override

__all__ = [
    "ComposeSpec",
    "ContainerState",
    "DockerRuntime",
    "LogSource",
    "ResourceLimits",
    "Runtime",
    "make_override",
]
