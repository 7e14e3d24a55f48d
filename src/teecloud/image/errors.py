"""Errors of teecloud.image: one base class, a subclass per cause."""

from __future__ import annotations

from teecloud.errors import Error

__all__ = ["ImageError", "ImageFormatError", "MeasurementUnavailable"]


class ImageError(Error):
    """Base class of every error about a guest image; `str(err)` is a message a user can act on."""


class ImageFormatError(ImageError, ValueError):
    """An image file (kernel, firmware, initrd) is not what its role needs, or is malformed."""


class MeasurementUnavailable(ImageError):
    """A reference measurement cannot be computed for this image and shape (with the reason)."""
