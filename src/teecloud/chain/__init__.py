"""teecloud.chain: on-chain governance (Vyper contracts) and the one client every component uses.

from teecloud.chain import BootInfo, ChainClient
chain = ChainClient.embedded()          # or ChainClient.rpc("http://127.0.0.1:8545", key)
chain.deploy()                          # KmsAuth + AppAuth factory + NodeRegistry, once
app_id = chain.register_app(owner, compose_hash(app_compose))
ok, reason = chain.is_app_allowed(boot_info)
"""

from .api import AppState, BootInfo, PendingUpgrade
from .appcompose import compose_hash, normalize_app_compose
from .client import ChainClient, load_signer_key
from .embedded import DEV_KEYS, EmbeddedChain
from .errors import (
    ChainError,
    ChainStateError,
    ChainUnreachable,
    ContractReverted,
    InsufficientFunds,
    NotDeployed,
    WrongChainId,
)
from .rpcserver import ChainRpcServer

__all__ = [
    "DEV_KEYS",
    "AppState",
    "BootInfo",
    "ChainClient",
    "ChainError",
    "ChainRpcServer",
    "ChainStateError",
    "ChainUnreachable",
    "ContractReverted",
    "EmbeddedChain",
    "InsufficientFunds",
    "NotDeployed",
    "PendingUpgrade",
    "WrongChainId",
    "compose_hash",
    "load_signer_key",
    "normalize_app_compose",
]
