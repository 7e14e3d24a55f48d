"""The eleventh review's attacks reuse the chain tests' embedded chain, the KMS harness (the embedded chain
`world`) and the 3-of-5 threshold env committee of the two-phase commit's tests (`members_3of5`)."""

from tests.chain.conftest import embedded_chain  # noqa: F401  (pytest fixture)
from tests.kms._threshold_env_world import members_3of5  # noqa: F401  (pytest fixture)
from tests.kms.conftest import world  # noqa: F401  (pytest fixture)
