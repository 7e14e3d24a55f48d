"""The sixth review's attacks on the threshold env-secret path (branch threshold-env) reuse the KMS harness
and the five-member committee of the authors' tests."""

from tests.kms._threshold_env_world import members  # noqa: F401  (pytest fixture)
from tests.kms.conftest import world  # noqa: F401  (pytest fixture)
