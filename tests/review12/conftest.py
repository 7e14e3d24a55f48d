"""The twelfth review's attacks reuse the KMS harness (the embedded chain `world`, a dev KMS and its real
TLS listeners) and the pinning tests' client credential."""

from tests.chain.conftest import embedded_chain  # noqa: F401  (pytest fixture)
from tests.kms.conftest import kms, server, world  # noqa: F401  (pytest fixture)
from tests.kms.test_client_pinning import client_cred  # noqa: F401  (pytest fixture)
