"""The AI agent (teecloud.ai.agent, examples/ai-agent) in-process: its wallet key through a simulated CVM's
real guest-API socket (the same across restarts, another per app, issued by the KMS root), its vector
memory (sqlite-vec) persisting on the volume, and its decisions landing on the embedded chain from the
derived address; the whole step against the real inference app (slow)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from dstack_sdk import DstackClient

from teecloud.agent import AgentRunner, LocalDevKeyProvider, boot
from teecloud.ai.agent import Agent, AgentWallet, InferenceClient, InferenceFailed, decision_hash
from teecloud.ai.errors import MalformedInput
from teecloud.ai.memory import HashingEmbedder, VectorMemory
from teecloud.chain import DEV_KEYS, ChainClient, ContractReverted
from teecloud.chain.agentlog import AgentLog
from teecloud.keys.errors import KeysError
from teecloud.tee.simulated import SimulatedTdx

from .conftest import MODEL_ID, running_stack

ROOT = Path(__file__).resolve().parents[2]


def agent_compose(name: str = "ai-agent") -> dict[str, object]:
    return {
        "manifest_version": 2,
        "name": name,
        "runner": "docker-compose",
        "docker_compose_file": (ROOT / "examples" / "ai-agent" / "docker-compose.yml").read_text(),
        "kms_enabled": True,
        "gateway_enabled": False,
        "public_logs": False,
        "public_sysinfo": True,
        "allowed_envs": [],
        "no_instance_id": False,
        "secure_time": False,
    }


@contextmanager
def cvm(home: Path, name: str = "ai-agent") -> Iterator[DstackClient]:
    """One boot of a simulated CVM for the agent app; its guest API on a real Unix socket."""
    sockdir = Path(tempfile.mkdtemp(prefix="tcagent-", dir="/tmp"))
    state = boot(SimulatedTdx(home), json.dumps(agent_compose(name)), None, None, LocalDevKeyProvider(home))
    runner = AgentRunner(state, dstack_sock=sockdir / "dstack.sock")
    runner.start()
    try:
        client = DstackClient(str(sockdir / "dstack.sock"), timeout=30)
        client.socket_path = str(sockdir / "dstack.sock")  # type: ignore[attr-defined]
        yield client
    finally:
        runner.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent-home")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChainClient]:
    with ChainClient.embedded(tmp_path_factory.mktemp("agent-chain"), DEV_KEYS[0]) as c:
        yield c


def test_wallet_same_across_restarts_other_per_app_issued_by_the_kms(home: Path) -> None:
    with cvm(home) as guest:
        first = AgentWallet.from_guest_api(guest)
    with cvm(home) as guest:  # a restart: a new boot, a new socket
        again = AgentWallet.from_guest_api(guest)
    with cvm(home, "another-agent") as guest:
        other = AgentWallet.from_guest_api(guest)
    assert first.address == again.address and first.secret == again.secret
    assert other.app_id != first.app_id and other.address != first.address
    root = LocalDevKeyProvider(home).root.k256_public_key
    first.verify_chain(root)
    other.verify_chain(root)
    # the chain binds the address to its app: claimed for another app, or under another root, it fails
    with pytest.raises(KeysError):
        AgentWallet(other.app_id, first.secret, first.public_key, first.signature_chain).verify_chain(root)
    with pytest.raises(KeysError):
        first.verify_chain(LocalDevKeyProvider(home / "elsewhere").root.k256_public_key)
    assert first.secret.hex() not in repr(first)


def test_memory_persists_on_the_volume_and_finds_the_nearest(tmp_path: Path) -> None:
    emb = HashingEmbedder(64)
    path = tmp_path / "volume" / "memory.db"
    with VectorMemory(path, dim=64) as mem:
        a = mem.add(
            "the ETH price rose five percent today", emb.embed("the ETH price rose five percent today")
        )
        mem.add("the garden needs water", emb.embed("the garden needs water"), kind="observation")
    with VectorMemory(path, dim=64) as mem:  # reopened, as after a restart
        assert len(mem) == 2
        hits = mem.search(emb.embed("ETH price rose"), k=2)
        assert next(h.id for h in hits) == a and hits[0].distance < hits[1].distance
        assert hits[0].text == "the ETH price rose five percent today" and hits[0].kind == "note"
    with pytest.raises(ValueError, match="64-dimensional"):
        VectorMemory(path, dim=32)


def test_memory_refuses_bad_input_and_writes_all_or_nothing(tmp_path: Path) -> None:
    with VectorMemory(tmp_path / "m.db", dim=8, max_memories=2) as mem:
        for bad in ([1.0] * 7, [float("nan")] + [0.0] * 7, ["x"] * 8):
            with pytest.raises(MalformedInput):
                mem.add("t", bad)  # type: ignore[arg-type]
        with pytest.raises(MalformedInput):
            mem.add("x" * 9000, [1.0] * 8)
        with pytest.raises(MalformedInput):
            mem.add("t", [1.0] * 8, kind="secret")
        with pytest.raises(MalformedInput):
            mem.search([1.0] * 8, k=0)
        # a vector row already holding the next id: the insert fails, and the text row goes with it
        mem._db.execute("INSERT INTO memory_vec (rowid, embedding) VALUES (1, ?)", (bytes(32),))
        with pytest.raises(Exception, match=r"UNIQUE|constraint|already exists"):
            mem.add("lost", [1.0] * 8)
        assert len(mem) == 0
        mem._db.execute("DELETE FROM memory_vec WHERE rowid = 1")
        mem.add("one", [1.0] * 8)
        mem.add("two", [0.5] * 8)
        with pytest.raises(MalformedInput, match="full"):
            mem.add("three", [1.0] * 8)


def test_agentlog_records_by_sender(chain: ChainClient) -> None:
    log = AgentLog.deploy(chain)
    alice = log.with_connection(chain.with_signer(DEV_KEYS[1]))
    seq, _ = alice.record(b"\x01" * 32, "first")
    assert seq == 0 and log.count(alice.conn.address) == 1 and log.count(chain.address) == 0
    assert log.last_decision(alice.conn.address) == b"\x01" * 32
    [ev] = log.decisions(alice.conn.address)
    assert ev["args"]["memo"] == "first" and ev["args"]["decision_hash"] == b"\x01" * 32
    with pytest.raises(ContractReverted, match="empty decision hash"):
        alice.record(bytes(32))
    with pytest.raises(ValueError):
        alice.record(b"\x02" * 32, "m" * 257)


def test_inference_failure_records_and_remembers_nothing(tmp_path: Path) -> None:
    class Log:
        calls = 0

        def record(self, decision_hash: bytes, memo: str = "") -> tuple[int, dict[str, object]]:
            Log.calls += 1
            return 0, {"transactionHash": "0x"}

    emb = HashingEmbedder(16)
    for handler in (
        lambda req: httpx.Response(503, json={"error": "engine down"}),
        lambda req: httpx.Response(200, json={"choices": []}),
        lambda req: httpx.Response(200, content=b"not json"),
    ):
        client = InferenceClient("http://inference", MODEL_ID, transport=httpx.MockTransport(handler))
        with VectorMemory(tmp_path / "m.db", dim=16) as mem:
            agent = Agent(inference=client, memory=mem, embed=emb.embed, log=Log())
            with pytest.raises(InferenceFailed):
                agent.step("something happened")
            assert len(mem) == 0
    assert Log.calls == 0
    # a header that is not a receipt id is not passed on (to the chain memo)
    odd = InferenceClient(
        "http://inference",
        MODEL_ID,
        transport=httpx.MockTransport(
            lambda req: httpx.Response(
                200,
                headers={"x-receipt-id": "r" * 65 + ";memo"},
                json={"choices": [{"message": {"content": "buy"}}]},
            )
        ),
    )
    assert odd.chat([{"role": "user", "content": "x"}]) == ("buy", "")
    with VectorMemory(tmp_path / "m.db", dim=16) as mem:
        agent = Agent(inference=client, memory=mem, embed=emb.embed, log=Log())
        for bad in ("", " \n", "x" * 5000):
            with pytest.raises(MalformedInput):
                agent.step(bad)


@pytest.mark.slow
def test_agent_decides_with_the_model_and_signs_from_its_derived_address(
    home: Path, chain: ChainClient, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log = AgentLog.deploy(chain)
    volume = tmp_path_factory.mktemp("agent-volume")
    emb = HashingEmbedder(128)
    with running_stack(tmp_path_factory.mktemp("agent-llm")) as llm:
        steps = []
        for observation in ("the ETH price rose five percent", "the ETH price rose again"):
            with cvm(home) as guest:  # each step in a new boot of the agent's CVM: a restart
                wallet = AgentWallet.from_guest_api(guest)
                if chain.balance(wallet.address) == 0:
                    chain.send(wallet.address, b"", value=10**18)  # gas money from the dev account
                client = InferenceClient(llm.front.url, MODEL_ID)
                with VectorMemory(volume / "memory.db", dim=128) as mem:
                    agent = Agent(
                        inference=client,
                        memory=mem,
                        embed=emb.embed,
                        log=log.with_connection(chain.with_signer(wallet.signer_key())),
                    )
                    steps.append((wallet.address, agent.step(observation)))
                client.close()
        (addr1, s1), (addr2, s2) = steps
        assert addr1 == addr2
        # the first step recalled nothing; the second recalled the first observation, nearest first
        assert s1.recalled == [] and s2.recalled[0].text == "the ETH price rose five percent"
        assert (s1.seq, s2.seq) == (0, 1) and log.count(addr1) == 2 and log.count(chain.address) == 0
        events = log.decisions(addr1)
        assert [e["args"]["decision_hash"] for e in events] == [s1.decision_hash, s2.decision_hash]
        assert s2.decision_hash == decision_hash(
            observation=s2.observation, decision=s2.decision, model=MODEL_ID, receipt_id=s2.receipt_id
        )
        # the memo names the inference app's signed receipt of the answer behind the decision
        assert events[1]["args"]["memo"] == f"receipt:{s2.receipt_id}"
        r = httpx.get(f"{llm.front.url}/v1/receipts/{s2.receipt_id}", timeout=10)
        assert r.status_code == 200 and r.json()["receipt"]["body"]["model"] == MODEL_ID


@pytest.mark.slow
def test_example_app_as_a_process(
    home: Path, chain: ChainClient, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """examples/ai-agent/agent.py as the container runs it: keys through the guest-API socket, the chain
    through JSON-RPC, observations from a file on the volume; lines are consumed once."""
    import os
    import subprocess
    import sys

    from teecloud.chain import ChainRpcServer

    log = AgentLog.deploy(chain)
    rpc = ChainRpcServer(chain.transport.chain).start()  # type: ignore[attr-defined]
    volume = tmp_path_factory.mktemp("agent-app-volume")
    (volume / "observations.txt").write_text("the ETH price fell\n\nthe ETH price rose\n")
    try:
        with running_stack(tmp_path_factory.mktemp("agent-app-llm")) as llm, cvm(home) as guest:
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT / "src"),
                "DSTACK_SIMULATOR_ENDPOINT": guest.socket_path,  # type: ignore[attr-defined]
                "INFERENCE_URL": llm.front.url,
                "MODEL_ID": MODEL_ID,
                "CHAIN_RPC_URL": rpc.url,
                "AGENTLOG_ADDRESS": log.address,
                "MEMORY_DB": str(volume / "memory.db"),
                "OBSERVATIONS": str(volume / "observations.txt"),
                "INTERVAL": "0.2",
                "STEPS": "2",
            }
            script = str(ROOT / "examples" / "ai-agent" / "agent.py")
            addr = subprocess.run(
                [sys.executable, script, "--address"], env=env, capture_output=True, text=True, timeout=60
            )
            assert addr.returncode == 0, addr.stderr
            wallet = addr.stdout.strip()
            assert wallet == AgentWallet.from_guest_api(guest).address
            chain.send(wallet, b"", value=10**18)
            out = subprocess.run(
                [sys.executable, script], env=env, capture_output=True, text=True, timeout=120
            )
            assert out.returncode == 0, out.stderr[-2000:]
        assert log.count(wallet) == 2
        assert (volume / "observations.txt.cursor").read_text() == str(
            len("the ETH price fell\n\nthe ETH price rose\n")
        )
        with VectorMemory(volume / "memory.db", dim=256) as mem:
            assert len(mem) == 4  # two observations and two decisions; the blank line was skipped
    finally:
        rpc.stop()


def test_run_loop_retries_a_failed_step_and_skips_bad_input() -> None:
    from teecloud.ai.agent import run_loop

    class Source:
        def __init__(self, items: list[str]) -> None:
            self.items = items
            self.committed: list[str] = []

        def peek(self) -> str | None:
            return self.items[0] if self.items else None

        def commit(self) -> None:
            self.committed.append(self.items.pop(0))

    class FlakyAgent:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def step(self, obs: str) -> None:
            self.calls.append(obs)
            if obs == "bad":
                raise MalformedInput("bad observation")
            if len(self.calls) == 1:
                raise InferenceFailed("inference app answered 503")

    src, agent = Source(["a", "bad", "b"]), FlakyAgent()
    assert run_loop(agent, src, interval=0.01, steps=2) == 2  # type: ignore[arg-type]
    assert agent.calls == ["a", "a", "bad", "b"] and src.committed == ["a", "bad", "b"]


@pytest.mark.slow
def test_the_agent_decides_through_the_verifying_proxy(
    home: Path, chain: ChainClient, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """INFERENCE_URL at `teecloud ai proxy` (verifying the inference app's quote, key set and every receipt):
    the agent's decision is one the proxy checked, and its memo names that receipt."""
    log = AgentLog.deploy(chain)
    emb = HashingEmbedder(64)
    with running_stack(tmp_path_factory.mktemp("agent-proxy-llm")) as llm:
        proxy = llm.proxy().start()
        try:
            with cvm(home, "agent-behind-proxy") as guest:
                wallet = AgentWallet.from_guest_api(guest)
                chain.send(wallet.address, b"", value=10**18)
                client = InferenceClient(proxy.url, MODEL_ID)
                with VectorMemory(tmp_path_factory.mktemp("v") / "memory.db", dim=64) as mem:
                    agent = Agent(
                        inference=client,
                        memory=mem,
                        embed=emb.embed,
                        log=log.with_connection(chain.with_signer(wallet.signer_key())),
                    )
                    step = agent.step("the ETH price rose")
                client.close()
        finally:
            proxy.stop()
    assert step.receipt_id and log.count(wallet.address) == 1
    assert log.decisions(wallet.address)[0]["args"]["memo"] == f"receipt:{step.receipt_id}"
