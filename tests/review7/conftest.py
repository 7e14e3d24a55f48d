"""The seventh review's attacks reuse the KMS harness (the embedded chain `world`) and the five-member
threshold env committee of the authors' tests."""

from tests.kms._threshold_env_world import members  # noqa: F401  (pytest fixture)
from tests.kms.conftest import world  # noqa: F401  (pytest fixture)
