# pragma version 0.4.3
"""
@title NodeRegistry
@notice The worker-node marketplace. Operators register nodes with a stake; users fund one escrow per
        deployment; a node claims payment for served time against cumulative usage records signed by the
        deployment's usage signer; challengers (the KMS / verifier network) slash nodes whose attestation
        fails, and receive part of the slash. All payouts are credited to `withdrawable` and pulled with
        `withdraw` (pull payments: a reverting recipient cannot block anyone else). Every delay is captured
        when it starts and bounded by MAX_DELAY, so no balance can be locked forever. See docs/economics.md.
"""

MAX_DELAY: constant(uint256) = 30 * 86400
BPS: constant(uint256) = 10000
SECONDS_PER_HOUR: constant(uint256) = 3600
# secp256k1 n / 2: signatures with a higher s are malleable copies (EIP-2)
HALF_N: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168


struct Node:
    operator: address
    tee_kind: String[16]
    device_id: bytes32
    attestation_hash: bytes32
    capacity: uint256
    price_per_hour: uint256
    stake: uint256
    unstaking: uint256
    unstake_ready_at: uint256
    active: bool
    slashed_total: uint256

struct Deployment:
    user: address
    usage_signer: address
    node_id: uint256
    price_per_hour: uint256
    balance: uint256
    served_seconds: uint256
    paid: uint256
    close_ready_at: uint256


event NodeRegistered:
    node_id: indexed(uint256)
    operator: indexed(address)
    tee_kind: String[16]
    device_id: bytes32
    attestation_hash: bytes32
    capacity: uint256
    price_per_hour: uint256
    stake: uint256

event NodeUpdated:
    node_id: indexed(uint256)
    attestation_hash: bytes32
    capacity: uint256
    price_per_hour: uint256

event Staked:
    node_id: indexed(uint256)
    amount: uint256
    stake: uint256

event UnstakeRequested:
    node_id: indexed(uint256)
    amount: uint256
    ready_at: uint256

event Unstaked:
    node_id: indexed(uint256)
    amount: uint256

event NodeActiveSet:
    node_id: indexed(uint256)
    active: bool

event DeploymentOpened:
    deployment_id: indexed(uint256)
    node_id: indexed(uint256)
    user: indexed(address)
    usage_signer: address
    price_per_hour: uint256
    amount: uint256

event DeploymentFunded:
    deployment_id: indexed(uint256)
    amount: uint256

event UsageClaimed:
    deployment_id: indexed(uint256)
    node_id: indexed(uint256)
    served_seconds: uint256
    paid: uint256
    unpaid: uint256

event CloseRequested:
    deployment_id: indexed(uint256)
    ready_at: uint256

event EscrowWithdrawn:
    deployment_id: indexed(uint256)
    amount: uint256

event Slashed:
    node_id: indexed(uint256)
    challenger: indexed(address)
    amount: uint256
    reward: uint256
    evidence_hash: bytes32

event Withdrawn:
    account: indexed(address)
    amount: uint256

event ChallengerSet:
    challenger: indexed(address)
    allowed: bool

event ParametersSet:
    min_stake: uint256
    unstake_delay: uint256
    close_delay: uint256
    challenger_reward_bps: uint256
    treasury: address

event OwnershipTransferStarted:
    previous_owner: indexed(address)
    new_owner: indexed(address)

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)


owner: public(address)
pending_owner: public(address)
treasury: public(address)
min_stake: public(uint256)
unstake_delay: public(uint256)
close_delay: public(uint256)
challenger_reward_bps: public(uint256)
challengers: public(HashMap[address, bool])
nodes: public(HashMap[uint256, Node])
node_count: public(uint256)
deployments: public(HashMap[uint256, Deployment])
deployment_count: public(uint256)
withdrawable: public(HashMap[address, uint256])


@deploy
def __init__(
    owner: address,
    treasury: address,
    min_stake: uint256,
    unstake_delay: uint256,
    close_delay: uint256,
    challenger_reward_bps: uint256,
):
    assert owner != empty(address), "owner is the zero address"
    self.owner = owner
    log OwnershipTransferred(previous_owner=empty(address), new_owner=owner)
    self._set_parameters(min_stake, unstake_delay, close_delay, challenger_reward_bps, treasury)


@internal
def _set_parameters(min_stake: uint256, unstake_delay: uint256, close_delay: uint256, bps: uint256, treasury: address):
    assert unstake_delay <= MAX_DELAY, "unstake delay above maximum"
    assert close_delay <= MAX_DELAY, "close delay above maximum"
    assert bps <= BPS, "reward above 100%"
    assert treasury != empty(address), "treasury is the zero address"
    self.min_stake = min_stake
    self.unstake_delay = unstake_delay
    self.close_delay = close_delay
    self.challenger_reward_bps = bps
    self.treasury = treasury
    log ParametersSet(min_stake=min_stake, unstake_delay=unstake_delay, close_delay=close_delay, challenger_reward_bps=bps, treasury=treasury)


@internal
@view
def _only_owner():
    assert msg.sender == self.owner, "caller is not the owner"


@internal
@view
def _only_operator(node_id: uint256):
    assert node_id < self.node_count, "no such node"
    assert msg.sender == self.nodes[node_id].operator, "caller is not the node's operator"


# --- nodes -------------------------------------------------------------------------------------------

@external
@payable
def register_node(
    tee_kind: String[16],
    device_id: bytes32,
    attestation_hash: bytes32,
    capacity: uint256,
    price_per_hour: uint256,
) -> uint256:
    assert msg.value >= self.min_stake, "stake below the minimum"
    assert capacity > 0, "capacity is zero"
    node_id: uint256 = self.node_count
    self.node_count = node_id + 1
    self.nodes[node_id] = Node(
        operator=msg.sender,
        tee_kind=tee_kind,
        device_id=device_id,
        attestation_hash=attestation_hash,
        capacity=capacity,
        price_per_hour=price_per_hour,
        stake=msg.value,
        unstaking=0,
        unstake_ready_at=0,
        active=True,
        slashed_total=0,
    )
    log NodeRegistered(node_id=node_id, operator=msg.sender, tee_kind=tee_kind, device_id=device_id, attestation_hash=attestation_hash, capacity=capacity, price_per_hour=price_per_hour, stake=msg.value)
    return node_id


@external
def update_node(node_id: uint256, attestation_hash: bytes32, capacity: uint256, price_per_hour: uint256):
    """@notice A new price applies to deployments opened from now on, never to running ones."""
    self._only_operator(node_id)
    assert capacity > 0, "capacity is zero"
    self.nodes[node_id].attestation_hash = attestation_hash
    self.nodes[node_id].capacity = capacity
    self.nodes[node_id].price_per_hour = price_per_hour
    log NodeUpdated(node_id=node_id, attestation_hash=attestation_hash, capacity=capacity, price_per_hour=price_per_hour)


@external
@payable
def stake(node_id: uint256):
    self._only_operator(node_id)
    assert msg.value > 0, "nothing to stake"
    self.nodes[node_id].stake += msg.value
    log Staked(node_id=node_id, amount=msg.value, stake=self.nodes[node_id].stake)


@external
def set_active(node_id: uint256, active: bool):
    """@notice An inactive node takes no new deployments; running ones keep their escrow and claims."""
    self._only_operator(node_id)
    if active:
        assert self.nodes[node_id].stake >= self.min_stake, "stake below the minimum"
    self.nodes[node_id].active = active
    log NodeActiveSet(node_id=node_id, active=active)


@external
def request_unstake(node_id: uint256, amount: uint256):
    """@notice Moves stake to `unstaking`; it stays slashable until the delay (fixed now) has passed.
               A later request adds to the amount and restarts the delay for the whole amount."""
    self._only_operator(node_id)
    assert amount > 0, "nothing to unstake"
    assert amount <= self.nodes[node_id].stake, "amount above the stake"
    self.nodes[node_id].stake -= amount
    self.nodes[node_id].unstaking += amount
    ready: uint256 = block.timestamp + self.unstake_delay
    self.nodes[node_id].unstake_ready_at = ready
    if self.nodes[node_id].stake < self.min_stake and self.nodes[node_id].active:
        self.nodes[node_id].active = False
        log NodeActiveSet(node_id=node_id, active=False)
    log UnstakeRequested(node_id=node_id, amount=amount, ready_at=ready)


@external
def withdraw_unstaked(node_id: uint256):
    self._only_operator(node_id)
    amount: uint256 = self.nodes[node_id].unstaking
    assert amount > 0, "nothing unstaking"
    assert block.timestamp >= self.nodes[node_id].unstake_ready_at, "unstake delay not over"
    self.nodes[node_id].unstaking = 0
    self.withdrawable[msg.sender] += amount
    log Unstaked(node_id=node_id, amount=amount)


@external
def slash(node_id: uint256, amount: uint256, evidence_hash: bytes32):
    """@notice A challenger slashes a node whose attestation failed (evidence_hash names the evidence,
               published off-chain). Stake is taken first, then stake still unstaking."""
    assert self.challengers[msg.sender], "caller is not a challenger"
    assert node_id < self.node_count, "no such node"
    assert amount > 0, "nothing to slash"
    staked: uint256 = self.nodes[node_id].stake
    unstaking: uint256 = self.nodes[node_id].unstaking
    assert amount <= staked + unstaking, "amount above the node's stake"
    from_stake: uint256 = min(amount, staked)
    self.nodes[node_id].stake = staked - from_stake
    self.nodes[node_id].unstaking = unstaking - (amount - from_stake)
    self.nodes[node_id].slashed_total += amount
    if self.nodes[node_id].active:
        self.nodes[node_id].active = False
        log NodeActiveSet(node_id=node_id, active=False)
    reward: uint256 = amount * self.challenger_reward_bps // BPS
    self.withdrawable[msg.sender] += reward
    self.withdrawable[self.treasury] += amount - reward
    log Slashed(node_id=node_id, challenger=msg.sender, amount=amount, reward=reward, evidence_hash=evidence_hash)


# --- deployments ---------------------------------------------------------------------------------

@external
@payable
def open_deployment(node_id: uint256, usage_signer: address) -> uint256:
    """@notice Escrow for one deployment on one node, at the node's current price (fixed for its life).
               `usage_signer` signs the usage records (the user, or a control plane acting for them)."""
    assert node_id < self.node_count, "no such node"
    assert self.nodes[node_id].active, "node is not active"
    assert msg.value > 0, "empty escrow"
    assert usage_signer != empty(address), "usage signer is the zero address"
    dep_id: uint256 = self.deployment_count
    self.deployment_count = dep_id + 1
    price: uint256 = self.nodes[node_id].price_per_hour
    self.deployments[dep_id] = Deployment(
        user=msg.sender,
        usage_signer=usage_signer,
        node_id=node_id,
        price_per_hour=price,
        balance=msg.value,
        served_seconds=0,
        paid=0,
        close_ready_at=0,
    )
    log DeploymentOpened(deployment_id=dep_id, node_id=node_id, user=msg.sender, usage_signer=usage_signer, price_per_hour=price, amount=msg.value)
    return dep_id


@external
@payable
def fund_deployment(dep_id: uint256):
    assert dep_id < self.deployment_count, "no such deployment"
    assert self.deployments[dep_id].close_ready_at == 0, "deployment is closing"
    assert msg.value > 0, "nothing to fund"
    self.deployments[dep_id].balance += msg.value
    log DeploymentFunded(deployment_id=dep_id, amount=msg.value)


@external
@view
def usage_digest(dep_id: uint256, served_seconds: uint256) -> bytes32:
    """@notice What the usage signer signs, as an EIP-191 personal message over this 32-byte hash:
               keccak256(abi_encode(registry, chain_id, deployment_id, served_seconds))."""
    return keccak256(abi_encode(self, chain.id, dep_id, served_seconds))


@internal
@view
def _recover(digest: bytes32, signature: Bytes[65]) -> address:
    assert len(signature) == 65, "signature must be 65 bytes"
    r: uint256 = extract32(signature, 0, output_type=uint256)
    s: uint256 = extract32(signature, 32, output_type=uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    if v < 27:
        v += 27
    assert s <= HALF_N, "malleable signature"
    signed: bytes32 = keccak256(concat(b"\x19Ethereum Signed Message:\n32", digest))
    return ecrecover(signed, v, r, s)


@external
def claim(dep_id: uint256, served_seconds: uint256, signature: Bytes[65]) -> uint256:
    """@notice Pays the node for served time. Records are cumulative (total seconds served since the
               deployment opened), so replaying an old record pays nothing and is refused."""
    assert dep_id < self.deployment_count, "no such deployment"
    node_id: uint256 = self.deployments[dep_id].node_id
    assert msg.sender == self.nodes[node_id].operator, "caller is not the node's operator"
    assert served_seconds > self.deployments[dep_id].served_seconds, "usage already claimed"
    digest: bytes32 = keccak256(abi_encode(self, chain.id, dep_id, served_seconds))
    signer: address = self._recover(digest, signature)
    assert signer != empty(address) and signer == self.deployments[dep_id].usage_signer, "usage record not signed by the usage signer"
    balance: uint256 = self.deployments[dep_id].balance
    assert balance > 0, "escrow exhausted"
    owed: uint256 = served_seconds * self.deployments[dep_id].price_per_hour // SECONDS_PER_HOUR - self.deployments[dep_id].paid
    pay: uint256 = min(owed, balance)
    self.deployments[dep_id].served_seconds = served_seconds
    self.deployments[dep_id].paid += pay
    self.deployments[dep_id].balance = balance - pay
    self.withdrawable[msg.sender] += pay
    log UsageClaimed(deployment_id=dep_id, node_id=node_id, served_seconds=served_seconds, paid=pay, unpaid=owed - pay)
    return pay


@external
def request_close(dep_id: uint256):
    """@notice Starts the claim window (close_delay, fixed now); the node can still claim until then."""
    assert dep_id < self.deployment_count, "no such deployment"
    assert msg.sender == self.deployments[dep_id].user, "caller is not the deployment's user"
    assert self.deployments[dep_id].close_ready_at == 0, "close already requested"
    ready: uint256 = block.timestamp + self.close_delay
    self.deployments[dep_id].close_ready_at = ready
    log CloseRequested(deployment_id=dep_id, ready_at=ready)


@external
def withdraw_escrow(dep_id: uint256):
    assert dep_id < self.deployment_count, "no such deployment"
    assert msg.sender == self.deployments[dep_id].user, "caller is not the deployment's user"
    ready: uint256 = self.deployments[dep_id].close_ready_at
    assert ready != 0, "close not requested"
    assert block.timestamp >= ready, "claim window not over"
    amount: uint256 = self.deployments[dep_id].balance
    assert amount > 0, "escrow is empty"
    self.deployments[dep_id].balance = 0
    self.withdrawable[msg.sender] += amount
    log EscrowWithdrawn(deployment_id=dep_id, amount=amount)


@external
@nonreentrant
def withdraw() -> uint256:
    amount: uint256 = self.withdrawable[msg.sender]
    assert amount > 0, "nothing to withdraw"
    self.withdrawable[msg.sender] = 0
    raw_call(msg.sender, b"", value=amount)
    log Withdrawn(account=msg.sender, amount=amount)
    return amount


# --- governance ----------------------------------------------------------------------------------

@external
def set_challenger(challenger: address, allowed: bool):
    self._only_owner()
    self.challengers[challenger] = allowed
    log ChallengerSet(challenger=challenger, allowed=allowed)


@external
def set_parameters(min_stake: uint256, unstake_delay: uint256, close_delay: uint256, challenger_reward_bps: uint256, treasury: address):
    """@notice New delays apply to requests made from now on, never to ones already running."""
    self._only_owner()
    self._set_parameters(min_stake, unstake_delay, close_delay, challenger_reward_bps, treasury)


@external
def transfer_ownership(new_owner: address):
    self._only_owner()
    self.pending_owner = new_owner
    log OwnershipTransferStarted(previous_owner=self.owner, new_owner=new_owner)


@external
def accept_ownership():
    assert msg.sender == self.pending_owner, "caller is not the pending owner"
    log OwnershipTransferred(previous_owner=self.owner, new_owner=msg.sender)
    self.owner = msg.sender
    self.pending_owner = empty(address)
