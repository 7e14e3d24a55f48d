"""The third review's attacks reuse the KMS harness (tests/kms/conftest.py) and the real dstack boot of
tests/kms/test_os_image_measured.py."""

from tests.kms.conftest import kms, world  # noqa: F401  (pytest fixtures)
from tests.kms.test_os_image_measured import real_boot  # noqa: F401  (pytest fixture)
