"""The fourth review's attacks on the channel between running threshold KMS nodes (teecloud.kms.peering,
teecloud.kms.threshold_net) reuse the KMS harness and the committees of the authors' tests."""

from tests.kms.conftest import world  # noqa: F401  (pytest fixture)
from tests.kms.test_threshold_net_peering import committee  # noqa: F401  (pytest fixture)
from tests.kms.test_threshold_net_presign import members  # noqa: F401  (pytest fixture)
