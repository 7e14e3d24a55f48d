"""The fifth review's attacks on review 4's fixes (R4-1..R4-6) reuse the KMS harness and the committees of
the authors' tests."""

from tests.kms.conftest import kms, server, world  # noqa: F401  (pytest fixtures)
from tests.kms.test_threshold_net_peering import committee  # noqa: F401  (pytest fixture)
from tests.kms.test_threshold_net_presign import members  # noqa: F401  (pytest fixture)
