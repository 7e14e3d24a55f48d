"""The ninth review's attacks reuse the KMS harness (the embedded chain `world`) and the 3-of-5 threshold env
committee of the two-phase commit's tests (members in this process, real listeners)."""

from tests.kms._threshold_env_world import members_3of5  # noqa: F401  (pytest fixture)
from tests.kms.conftest import world  # noqa: F401  (pytest fixture)
