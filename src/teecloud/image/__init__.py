"""Guest OS images for the qemu backend: reference measurements (TDX: tdx.py, SEV-SNP: snp.py), computed
from an image's files and a VM shape, for the KMS and verifiers to check real quotes against."""

from teecloud.image.errors import ImageError, ImageFormatError, MeasurementUnavailable

__all__ = ["ImageError", "ImageFormatError", "MeasurementUnavailable"]
