"""teecloud.chain: on-chain governance (Vyper contracts) and the one client every component uses.

from teecloud.chain import BootInfo, ChainClient
chain = ChainClient.embedded()          # or ChainClient.rpc("http://127.0.0.1:8545", key)
chain.deploy()                          # KmsAuth + AppAuth factory + NodeRegistry, once
app_id = chain.kms.register_app(owner, compose_hash(app_compose))
ok, reason = chain.kms.is_app_allowed(boot_info)
chain.app(app_id).propose_add_compose_hash(new_hash)   # directly, or through its multisig / timelock
node = chain.registry.node(0)           # a NodeInfo

Modules: transport (JSON-RPC), connection (calls, transactions, events), kmsauth / appauth / governance /
registry (one facade per contract), api (typed results), client (ChainClient: all of it, with where the
contracts are), embedded + rpcserver (the embedded chain), errors.
"""

from teecloud._serve import clamp_recursion_limit

from .api import (
    AppState,
    BootInfo,
    DeploymentEscrow,
    GovernanceAction,
    KmsInfo,
    MultisigProposal,
    NodeInfo,
    PendingUpgrade,
    Slash,
    TimelockCall,
)
from .appauth import AppAuth
from .appcompose import compose_hash, normalize_app_compose
from .client import ChainClient
from .connection import ChainConnection
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
from .governance import Multisig, Timelock
from .kmsauth import KmsAuth
from .registry import Escrow, NodeRegistry
from .rpcserver import ChainRpcServer
from .signer import load_signer_key

__all__ = [
    "DEV_KEYS",
    "AppAuth",
    "AppState",
    "BootInfo",
    "ChainClient",
    "ChainConnection",
    "ChainError",
    "ChainRpcServer",
    "ChainStateError",
    "ChainUnreachable",
    "ContractReverted",
    "DeploymentEscrow",
    "EmbeddedChain",
    "Escrow",
    "GovernanceAction",
    "InsufficientFunds",
    "KmsAuth",
    "KmsInfo",
    "Multisig",
    "MultisigProposal",
    "NodeInfo",
    "NodeRegistry",
    "NotDeployed",
    "PendingUpgrade",
    "Slash",
    "Timelock",
    "TimelockCall",
    "WrongChainId",
    "compose_hash",
    "load_signer_key",
    "normalize_app_compose",
]

# py_ecc (imported under eth_account -> eth_keys, above) raises the recursion limit to 100 000: back to
# a limit at which deeply nested JSON is an error, not a segfault (teecloud._serve.clamp_recursion_limit).
clamp_recursion_limit()
