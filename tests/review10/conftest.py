"""The tenth review's attacks reuse the KMS harness (the embedded chain `world`), the DKG tests' five
share-less dealers on real listeners (`dealers`), and the chain tests' embedded chain."""

from tests.chain.conftest import embedded_chain  # noqa: F401  (pytest fixture)
from tests.kms.conftest import world  # noqa: F401  (pytest fixture)
from tests.kms.test_threshold_dkg import dealers  # noqa: F401  (pytest fixture)
