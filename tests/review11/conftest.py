"""The eleventh review's attacks reuse the chain tests' embedded chain and the KMS harness (`world`)."""

from tests.chain.conftest import embedded_chain  # noqa: F401  (pytest fixture)
