"""Runtime backends that run a CVM's app. `docker`: Docker Engine + Compose (v1 or v2)."""

from teecloud.node.runtime.docker import ComposeSpec, DockerRuntime, ResourceLimits, make_override

__all__ = ["ComposeSpec", "DockerRuntime", "ResourceLimits", "make_override"]
