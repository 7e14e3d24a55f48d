"""The phases a CVM boot reports (the boot itself is each backend's: teecloud.node.runtime)."""

from teecloud.node.runtime.base import BOOT_PHASES

PHASES = BOOT_PHASES

__all__ = ["PHASES"]
