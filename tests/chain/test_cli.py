"""`teecloud chain|app|node` on the embedded chain (opened in-process by each command)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from teecloud.chain import DEV_KEYS, ChainClient, compose_hash
from teecloud.cli import app as cli

from .conftest import Anvil, anvil_keys

runner = CliRunner()


FRESH_KEY = "0x" + "42" * 32  # an account with no funds
USER_KEY = "0x" + "5a" * 32  # funded by the tests that use it
# DEV_KEYS are the integers 1..10, indistinguishable from ABI-encoded numbers: look for these two instead
SECRETS = [k.removeprefix("0x") for k in (FRESH_KEY, USER_KEY)]


def run(*args: str, ok: bool = True) -> str:
    r = runner.invoke(cli, list(args))
    if ok:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code != 0, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        assert "Traceback" not in r.output
    low = r.output.lower()
    assert not any(k in low for k in SECRETS), "a private key was printed"
    return r.output


def test_register_upgrade_show(tmp_path: Path, teecloud_home: Path) -> None:
    compose = {"name": "demo", "runner": "docker-compose", "manifest_version": 2, "docker_compose_file": "x"}
    f = tmp_path / "app-compose.json"
    f.write_text(json.dumps(compose))
    run("chain", "deploy")
    k2 = tmp_path / "k2"
    k2.write_text(DEV_KEYS[1])
    a0 = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
    a1 = "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF"
    out = run("app", "register", str(f), "--multisig", f"{a0},{a1}", "--threshold", "2")
    app_id = re.search(r"app_id: (0x[0-9a-fA-F]{40})", out).group(1)  # type: ignore[union-attr]
    assert f"0x{compose_hash(compose).hex()}" in out
    new = "cd" * 32
    assert "proposal 0" in run("app", "upgrade", "propose", app_id, new)
    assert "not enough approvals" in run("app", "upgrade", "execute", app_id, "0", ok=False)
    assert "2/2" in run("app", "--key-file", str(k2), "upgrade", "approve", app_id, "0")
    run("app", "upgrade", "execute", app_id, "0")
    state = json.loads(run("app", "show", app_id, "--json"))
    assert "0x" + new in state["allowed_compose_hashes"] and state["owner_kind"] == "multisig"
    assert "governed by a multisig" in run("app", "allow-hash", app_id, "ef" * 32, ok=False)


def test_owner_flow_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text('{"name": "a"}')
    run("chain", "deploy")
    app_id = re.search(r"app_id: (0x\w+)", run("app", "register", str(f))).group(1)  # type: ignore[union-attr]
    run("app", "allow-hash", app_id, "11" * 32)
    run("app", "remove-hash", app_id, "11" * 32)
    assert "compose hash not allowed" in run("app", "remove-hash", app_id, "11" * 32, ok=False)
    assert "32 bytes of hex" in run("app", "allow-hash", app_id, "zz", ok=False)
    assert "not an address" in run("app", "show", "0x12", ok=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert "not valid JSON" in run("app", "register", str(bad), ok=False)
    stranger = tmp_path / "k"
    stranger.write_text(DEV_KEYS[4])
    assert "not by this signer" in run(
        "app", "--key-file", str(stranger), "allow-hash", app_id, "11" * 32, ok=False
    )
    assert "cannot reach" in run("chain", "--rpc-url", "http://127.0.0.1:9", "status", ok=False)


def test_timelock_register(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text('{"name": "t"}')
    run("chain", "deploy")
    out = run("app", "register", str(f), "--timelock", "3600")
    app_id = re.search(r"app_id: (0x\w+)", out).group(1)  # type: ignore[union-attr]
    out = run("app", "upgrade", "propose", app_id, "22" * 32)
    cid = re.search(r"call id (0x[0-9a-f]{64})", out).group(1)  # type: ignore[union-attr]
    assert "too early" in run("app", "upgrade", "execute", app_id, cid, ok=False)
    assert cid in run("app", "show", app_id)


def test_node_commands(tmp_path: Path) -> None:
    run("chain", "deploy")
    out = run(
        "node",
        "register",
        "--device-id",
        "aa" * 32,
        "--attestation-hash",
        "bb" * 32,
        "--capacity",
        "2",
        "--price",
        "1gwei",
        "--stake",
        "1eth",
    )
    assert "node_id: 0" in out
    run("node", "stake", "0", "0.5eth")
    assert "unstaking 500000000000000000 wei" in run("node", "unstake", "0", "0.5eth")
    assert "unstake delay not over" in run("node", "unstake", "0", "--withdraw", ok=False)
    assert "not an amount" in run("node", "stake", "0", "lots", ok=False)
    assert "stake below the minimum" in run(
        "node",
        "register",
        "--device-id",
        "aa" * 32,
        "--attestation-hash",
        "bb" * 32,
        "--capacity",
        "2",
        "--price",
        "1",
        "--stake",
        "1",
        ok=False,
    )


# --- marketplace: escrow (user side), node (operator and challenger side) -----------------------------------


def key_file(tmp_path: Path, key: str, name: str) -> str:
    f = tmp_path / name
    f.write_text(key)
    return str(f)


def signature(output: str) -> str:
    m = re.search(r"0x[0-9a-f]{130}", output)
    assert m, output
    return m.group(0)


def address(key: str) -> str:
    return str(Account.from_key(key).address)


def fund(home: Path, key: str, wei: int = 10**18) -> None:
    with ChainClient.embedded(home) as c:
        c.send(address(key), b"", value=wei)


def advance(home: Path, seconds: int) -> None:
    with ChainClient.embedded(home) as c:
        c.increase_time(seconds)


def register_node(op: str, *, price: str = "3600000", stake: str = "1eth") -> str:
    return run(
        "node",
        "--key-file",
        op,
        "register",
        "--device-id",
        "aa" * 32,
        "--attestation-hash",
        "bb" * 32,
        "--capacity",
        "2",
        "--price",
        price,
        "--stake",
        stake,
    )


def test_escrow_lifecycle(tmp_path: Path, teecloud_home: Path) -> None:
    """open, fund, sign usage, claim (twice: refused), close, withdraw: too early, then after the delay."""
    run("chain", "deploy")
    op = key_file(tmp_path, DEV_KEYS[1], "operator")
    fund(teecloud_home, USER_KEY)
    user = key_file(tmp_path, USER_KEY, "user")
    stranger = key_file(tmp_path, DEV_KEYS[3], "stranger")
    assert "node_id: 0" in register_node(op)  # 3600000 wei per hour = 1000 wei per second

    out = run("escrow", "--key-file", user, "open", "0", "--deposit", "1000000")
    assert "deployment_id: 0" in out and address(USER_KEY) in out
    assert "escrow: 1500000 wei" in run("escrow", "--key-file", stranger, "fund", "0", "500000")
    assert "no such deployment: 7" in run("escrow", "fund", "7", "1", ok=False)
    assert "no such node: 5" in run("escrow", "--key-file", user, "open", "5", "--deposit", "1", ok=False)

    sig = signature(run("escrow", "--key-file", user, "sign-usage", "0", "600"))
    assert re.fullmatch(r"0x[0-9a-f]{130}", sig)
    # only the operator may claim, only with the usage signer's record
    assert "caller is not the node's operator" in run(
        "node", "--key-file", stranger, "claim", "0", "600", sig, ok=False
    )
    forged = run("escrow", "--key-file", op, "sign-usage", "0", "600")
    assert "not this deployment's usage signer" in forged
    assert "usage record not signed by the usage signer" in run(
        "node", "--key-file", op, "claim", "0", "600", signature(forged), ok=False
    )
    assert "paid: 600000 wei" in run("node", "--key-file", op, "claim", "0", "600", sig)
    # the same record twice: refused with the contract's reason, nothing paid
    out = run("node", "--key-file", op, "claim", "0", "600", sig, ok=False)
    assert "usage already claimed" in out and "paid:" not in out
    assert "65 bytes of hex" in run("node", "--key-file", op, "claim", "0", "700", "0x1234", ok=False)

    shown = json.loads(run("escrow", "show", "0", "--json"))
    assert shown["balance"] == 900000 and shown["paid"] == 600000 and shown["served_seconds"] == 600
    assert "deployment 0  node 0  open  escrow 900000 wei" in run("node", "deployments", "0")
    assert "deployment 0" in run("escrow", "--key-file", user, "list", "--mine")
    assert "no deployments" in run("escrow", "--key-file", op, "list", "--mine")

    # leaving: withdraw needs close first, then the close delay (1 day)
    assert "close not requested" in run("escrow", "--key-file", user, "withdraw", "0", ok=False)
    assert "caller is not the deployment's user" in run(
        "escrow", "--key-file", stranger, "close", "0", ok=False
    )
    assert "(in 86400 s)" in run("escrow", "--key-file", user, "close", "0")
    assert "close already requested" in run("escrow", "--key-file", user, "close", "0", ok=False)
    assert "deployment is closing" in run("escrow", "fund", "0", "1", ok=False)
    out = run("escrow", "--key-file", user, "withdraw", "0", ok=False)
    assert "claim window not over" in out and re.search(r"in \d+ s\)", out)
    # during the window the node can still claim what it served
    sig = signature(run("escrow", "--key-file", user, "sign-usage", "0", "700"))
    assert "paid: 100000 wei" in run("node", "--key-file", op, "claim", "0", "700", sig)

    advance(teecloud_home, 86400)
    with ChainClient.embedded(teecloud_home) as c:
        before = c.balance(address(USER_KEY))
    out = run("escrow", "--key-file", user, "withdraw", "0")
    assert "escrow refunded: 800000 wei; withdrawn: 800000 wei" in out
    with ChainClient.embedded(teecloud_home) as c:
        after = c.balance(address(USER_KEY))
        assert c.withdrawable(address(USER_KEY)) == 0
    assert after > before - 10**16  # refunded (minus gas); the registry no longer holds it
    assert "escrow is empty" in run("escrow", "--key-file", user, "withdraw", "0", ok=False)
    assert "closed" in run("escrow", "list", "--node", "0")
    assert "withdrawable: 700000 wei" in run("node", "balance", address(DEV_KEYS[1]))
    assert "withdrawn: 700000 wei" in run("node", "--key-file", op, "withdraw")
    assert "nothing to withdraw" in run("node", "--key-file", op, "withdraw", ok=False)


def test_escrow_exhausted_then_topped_up(tmp_path: Path) -> None:
    run("chain", "deploy")
    op = key_file(tmp_path, DEV_KEYS[1], "operator")
    register_node(op)
    run("escrow", "open", "0", "--deposit", "1000")
    sig = signature(run("escrow", "sign-usage", "0", "5"))
    assert "paid: 1000 wei" in run("node", "--key-file", op, "claim", "0", "5", sig)  # 5000 owed, 1000 there
    sig = signature(run("escrow", "sign-usage", "0", "6"))
    assert "escrow exhausted" in run("node", "--key-file", op, "claim", "0", "6", sig, ok=False)
    run("escrow", "fund", "0", "10000")
    assert "paid: 5000 wei" in run("node", "--key-file", op, "claim", "0", "6", sig)  # the gap is paid


def test_node_show_slash_and_challenger(tmp_path: Path, teecloud_home: Path) -> None:
    run("chain", "deploy")  # owner = DEV_KEYS[0], the default signer
    op = key_file(tmp_path, DEV_KEYS[1], "operator")
    challenger = key_file(tmp_path, DEV_KEYS[5], "challenger")
    register_node(op)
    run("node", "--key-file", op, "unstake", "0", "0.5eth")
    out = run("node", "show", "0")
    assert "node 0: active" in out and "stake: 500000000000000000 wei (0.5 ETH)" in out
    m = re.search(
        r"pending unstake: 500000000000000000 wei \(0\.5 ETH\), withdrawable from unix time \d+ "
        r"\(in (\d+) s\)",
        out,
    )
    assert m and 0 < int(m.group(1)) <= 7 * 86400, out
    assert "unstake delay not over" in run("node", "--key-file", op, "unstake", "0", "--withdraw", ok=False)
    assert "caller is not the node's operator" in run("node", "unstake", "0", "1", ok=False)
    assert "no such node: 3" in run("node", "show", "3", ok=False)

    ev = "ee" * 32
    # nobody but a challenger can slash, and only the registry owner appoints challengers
    out = run("node", "--key-file", challenger, "slash", "0", "0.1eth", "--evidence", ev, ok=False)
    assert "caller is not a challenger" in out
    assert "caller is not the owner" in run(
        "node", "--key-file", op, "set-challenger", address(DEV_KEYS[1]), ok=False
    )
    assert "challenger allowed" in run("node", "set-challenger", address(DEV_KEYS[5]))
    assert "32 bytes of hex" in run(
        "node", "--key-file", challenger, "slash", "0", "1", "--evidence", "x", ok=False
    )
    # 0.6 eth: all 0.5 of the stake, then 0.1 of what is still unstaking; 20% to the challenger
    out = run("node", "--key-file", challenger, "slash", "0", "0.6eth", "--evidence", ev)
    assert "slashed node 0: 600000000000000000 wei; reward 120000000000000000 wei" in out
    n = json.loads(run("node", "show", "0", "--json"))
    assert n["active"] is False and n["stake"] == 0 and n["unstaking"] == 4 * 10**17
    assert n["slashed_total"] == 6 * 10**17
    assert "amount above the node's stake" in run(
        "node", "--key-file", challenger, "slash", "0", "1eth", "--evidence", ev, ok=False
    )
    assert "node is not active" in run("escrow", "open", "0", "--deposit", "1", ok=False)
    assert "node 0  inactive" in run("node", "list")
    assert "withdrawn: 120000000000000000 wei" in run("node", "--key-file", challenger, "withdraw")
    run("node", "set-challenger", address(DEV_KEYS[5]), "--revoke")
    assert "caller is not a challenger" in run(
        "node", "--key-file", challenger, "slash", "0", "1", "--evidence", ev, ok=False
    )
    # the rest of the unstaking stake comes back after the delay
    advance(teecloud_home, 7 * 86400)
    assert "withdrawn: 400000000000000000 wei" in run("node", "--key-file", op, "unstake", "0", "--withdraw")


def test_marketplace_errors_are_clear(tmp_path: Path) -> None:
    assert "chain deploy" in run("node", "list", ok=False)  # nothing deployed yet
    run("chain", "deploy")
    op = key_file(tmp_path, DEV_KEYS[1], "operator")
    poor = key_file(tmp_path, FRESH_KEY, "poor")
    register_node(op)
    out = run("escrow", "--key-file", poor, "open", "0", "--deposit", "1eth", ok=False)
    assert f"insufficient funds: {address(FRESH_KEY)} (balance 0 wei)" in out
    out = run("escrow", "open", "0", "--deposit", "10000000eth", ok=False)
    assert "insufficient funds" in out
    assert "more than an EVM amount can hold" in run("escrow", "open", "0", "--deposit", "9" * 80, ok=False)
    run("escrow", "open", "0", "--deposit", "1000")
    assert "out of range for the contract" in run("escrow", "sign-usage", "0", "9" * 80, ok=False)
    assert "not an address" in run(
        "escrow", "open", "0", "--deposit", "1", "--usage-signer", "0x12", ok=False
    )
    for args in (
        ("escrow", "show", "0"),
        ("node", "show", "0"),
        ("node", "claim", "0", "1", "0x" + "11" * 65),
    ):
        out = run(args[0], "--rpc-url", "http://127.0.0.1:9", *args[1:], ok=False)
        assert "cannot reach the chain at http://127.0.0.1:9" in out
    bad = tmp_path / "badkey"
    bad.write_text("0x" + "zz" * 32)
    out = run("escrow", "--key-file", str(bad), "close", "0", ok=False)
    assert "does not hold a 32-byte hex private key" in out and "zz" * 32 not in out


def test_unfunded_signer_can_read(tmp_path: Path) -> None:
    """Reads cost nothing (eth_call): a key with no funds can still look at nodes and escrows."""
    run("chain", "deploy")
    register_node(key_file(tmp_path, DEV_KEYS[1], "operator"))
    run("escrow", "open", "0", "--deposit", "1000")
    poor = key_file(tmp_path, FRESH_KEY, "poor")
    assert "escrow: 1000 wei" in run("escrow", "--key-file", poor, "show", "0")
    assert "node 0: active" in run("node", "--key-file", poor, "show", "0")
    assert "withdrawable: 0 wei" in run("node", "--key-file", poor, "balance")


# --- app governance: multisig, timelock, both -------------------------------------------------------------

A0 = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"  # DEV_KEYS[0], the default signer
A1 = "0x2B5AD5c4795c026514f8317c7a215E218DcCD6cF"  # DEV_KEYS[1]


def compose_file(tmp_path: Path, name: str) -> str:
    f = tmp_path / f"{name}.json"
    f.write_text(json.dumps({"name": name, "runner": "docker-compose", "docker_compose_file": "x"}))
    return str(f)


def app_id_of(output: str) -> str:
    m = re.search(r"app_id: (0x[0-9a-fA-F]{40})", output)
    assert m, output
    return m.group(1)


def test_app_show_lists_timelocked_hash_with_eta(tmp_path: Path, teecloud_home: Path) -> None:
    run("chain", "deploy")
    out = run("app", "register", compose_file(tmp_path, "tl"), "--timelock", "3600")
    assert "timelock (3600 s): 0x" in out
    app_id = app_id_of(out)
    new = "22" * 32
    out = run("app", "upgrade", "propose", app_id, new)
    m = re.search(r"call id (0x[0-9a-f]{64}), executable from unix time (\d+)", out)
    assert m, out
    cid, eta = m.group(1), int(m.group(2))

    shown = run("app", "show", app_id)
    assert "pending upgrades:" in shown and "pending upgrades: none" not in shown
    line = next(x for x in shown.splitlines() if cid in x)
    assert f"add_compose_hash(0x{new})" in line and f"executable from unix time {eta}" in line
    assert "CallQueued" in shown
    state = json.loads(run("app", "show", app_id, "--json"))
    assert [(p["kind"], p["ident"], p["eta"]) for p in state["pending"]] == [("timelock", cid, eta)]
    assert "0x" + new not in state["allowed_compose_hashes"]
    assert state["governance"]["timelock"]["min_delay"] == 3600

    stranger = key_file(tmp_path, DEV_KEYS[4], "stranger")
    assert "caller is not the admin" in run(
        "app", "--key-file", stranger, "upgrade", "propose", app_id, "33" * 32, ok=False
    )
    assert "timelock: too early" in run("app", "upgrade", "execute", app_id, cid, ok=False)
    # a second queued change, cancelled by the admin: it leaves the pending list
    out = run("app", "upgrade", "propose", app_id, "66" * 32)
    cid2 = re.search(r"call id (0x[0-9a-f]{64})", out).group(1)  # type: ignore[union-attr]
    assert cid2 in run("app", "show", app_id)
    assert "caller is not the admin" in run(
        "app", "--key-file", stranger, "upgrade", "cancel", app_id, cid2, ok=False
    )
    assert f"cancelled {cid2}" in run("app", "upgrade", "cancel", app_id, cid2)
    assert cid2 not in "".join(x for x in run("app", "show", app_id).splitlines() if "executable" in x)
    advance(teecloud_home, 3600)
    assert "executed" in run("app", "--key-file", stranger, "upgrade", "execute", app_id, cid)  # anyone
    state = json.loads(run("app", "show", app_id, "--json"))
    assert "0x" + new in state["allowed_compose_hashes"] and state["pending"] == []
    assert "0x" + "66" * 32 not in state["allowed_compose_hashes"]  # cancelled, never applied
    assert "pending upgrades: none" in run("app", "show", app_id)
    assert "call not queued" in run("app", "upgrade", "execute", app_id, cid, ok=False)


def test_multisig_rules_from_the_cli(tmp_path: Path) -> None:
    run("chain", "deploy")
    f = compose_file(tmp_path, "ms")
    assert "go together" in run("app", "register", f, "--multisig", f"{A0},{A1}", ok=False)
    assert "excludes" in run(
        "app", "register", f, "--owner", A0, "--multisig", A1, "--threshold", "1", ok=False
    )
    assert "threshold out of range" in run(
        "app", "register", f, "--multisig", f"{A0},{A1}", "--threshold", "3", ok=False
    )
    out = run("app", "register", f, "--multisig", f"{A0},{A1}", "--threshold", "2")
    assert "multisig (2-of-2): 0x" in out
    app_id = app_id_of(out)
    new = "44" * 32
    assert "proposal 0 in multisig" in run("app", "upgrade", "propose", app_id, new)
    line = next(x for x in run("app", "show", app_id).splitlines() if x.strip().startswith("multisig 0:"))
    assert f"add_compose_hash(0x{new})" in line and "approvals 1/2" in line
    # the proposer's approval already counts; approving twice is refused; outsiders cannot approve
    assert "already approved" in run("app", "upgrade", "approve", app_id, "0", ok=False)
    stranger = key_file(tmp_path, DEV_KEYS[4], "stranger")
    assert "caller is not an owner" in run(
        "app", "--key-file", stranger, "upgrade", "approve", app_id, "0", ok=False
    )
    assert "not enough approvals" in run("app", "upgrade", "execute", app_id, "0", ok=False)
    k1 = key_file(tmp_path, DEV_KEYS[1], "k1")
    assert "approved: 2/2" in run("app", "--key-file", k1, "upgrade", "approve", app_id, "0")
    run("app", "upgrade", "execute", app_id, "0")
    assert "proposal already executed" in run("app", "upgrade", "execute", app_id, "0", ok=False)
    state = json.loads(run("app", "show", app_id, "--json"))
    assert "0x" + new in state["allowed_compose_hashes"] and state["pending"] == []
    assert state["governance"]["multisig"]["owners"] == [A0, A1]
    assert "no such proposal" in run("app", "upgrade", "approve", app_id, "9", ok=False)


def test_multisig_administered_timelock(tmp_path: Path, teecloud_home: Path) -> None:
    """--multisig A,B --threshold 2 --timelock S: propose, approve, execute (queues), wait, execute."""
    run("chain", "deploy")
    out = run(
        "app",
        "register",
        compose_file(tmp_path, "both"),
        "--multisig",
        f"{A0},{A1}",
        "--threshold",
        "2",
        "--timelock",
        "60",
    )
    assert "multisig (2-of-2)" in out and "timelock (60 s)" in out
    app_id = app_id_of(out)
    new = "55" * 32
    assert "(multisig->timelock)" in run("app", "upgrade", "propose", app_id, new)
    k1 = key_file(tmp_path, DEV_KEYS[1], "k1")
    run("app", "--key-file", k1, "upgrade", "approve", app_id, "0")
    run("app", "upgrade", "execute", app_id, "0")  # the multisig queues the call in the timelock
    state = json.loads(run("app", "show", app_id, "--json"))
    queued = [p for p in state["pending"] if p["kind"] == "timelock"]
    assert len(queued) == 1 and queued[0]["function"] == "add_compose_hash" and queued[0]["eta"] > 0
    assert "0x" + new not in state["allowed_compose_hashes"]
    cid = queued[0]["ident"]
    assert f"executable from unix time {queued[0]['eta']}" in run("app", "show", app_id)
    assert "timelock: too early" in run("app", "upgrade", "execute", app_id, cid, ok=False)
    advance(teecloud_home, 60)
    run("app", "upgrade", "execute", app_id, cid)
    assert "0x" + new in json.loads(run("app", "show", app_id, "--json"))["allowed_compose_hashes"]


@pytest.mark.anvil
def test_marketplace_cli_on_anvil(tmp_path: Path, anvil: Anvil) -> None:
    """The same commands through --rpc-url against a second EVM (anvil)."""
    keys = anvil_keys(4)
    owner, op, user, stranger = (key_file(tmp_path, k, f"k{i}") for i, k in enumerate(keys))

    def on(group: str, key: str, *args: str, ok: bool = True) -> str:
        return run(group, "--rpc-url", anvil.url, "--key-file", key, *args, ok=ok)

    on("chain", owner, "deploy")
    out = on(
        "node", op, "register", "--device-id", "aa" * 32, "--attestation-hash", "bb" * 32,
        "--capacity", "1", "--price", "3600000", "--stake", "1eth",
    )  # fmt: skip
    nid = re.search(r"node_id: (\d+)", out).group(1)  # type: ignore[union-attr]
    out = on("escrow", user, "open", nid, "--deposit", "1000000")
    dep = re.search(r"deployment_id: (\d+)", out).group(1)  # type: ignore[union-attr]
    sig = signature(on("escrow", user, "sign-usage", dep, "100"))
    assert "paid: 100000 wei" in on("node", op, "claim", dep, "100", sig)
    assert "usage already claimed" in on("node", op, "claim", dep, "100", sig, ok=False)
    assert "caller is not a challenger" in on(
        "node", stranger, "slash", nid, "1", "--evidence", "ee" * 32, ok=False
    )
    on("escrow", user, "close", dep)
    assert "claim window not over" in on("escrow", user, "withdraw", dep, ok=False)
    with ChainClient.rpc(anvil.url) as c:
        c.increase_time(86400)
    assert "escrow refunded: 900000 wei" in on("escrow", user, "withdraw", dep)
    assert "pending unstake: none" in on("node", stranger, "show", nid)


def test_no_dev_key_default_on_another_rpc(
    tmp_path: Path, anvil: Anvil, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against any RPC but the embedded chain, the CLI never signs with the public dev key: it asks."""
    monkeypatch.delenv("TEECLOUD_CHAIN_KEY", raising=False)
    compose = tmp_path / "app-compose.json"
    compose.write_text(json.dumps({"name": "x", "runner": "docker-compose", "docker_compose_file": "x"}))
    dev0 = Account.from_key(DEV_KEYS[0]).address
    with ChainClient.rpc(anvil.url) as c:
        before = c.rpc_call("eth_getTransactionCount", dev0, "latest")

    def refused(*args: str) -> None:
        out = run(args[0], "--rpc-url", anvil.url, *args[1:], ok=False)
        assert "no signer key" in out and "--key-file" in out and "TEECLOUD_CHAIN_KEY" in out, out

    refused("chain", "deploy")
    assert "not deployed" in run("chain", "--rpc-url", anvil.url, "status")  # reads need no key
    # with a key given through the environment, the same command signs with it
    monkeypatch.setenv("TEECLOUD_CHAIN_KEY", anvil_keys(6)[5])
    assert "KmsAuth: 0x" in run("chain", "--rpc-url", anvil.url, "deploy")
    monkeypatch.delenv("TEECLOUD_CHAIN_KEY")
    refused("app", "register", str(compose))
    with ChainClient.rpc(anvil.url) as c:
        assert c.rpc_call("eth_getTransactionCount", dev0, "latest") == before  # the dev key signed nothing
