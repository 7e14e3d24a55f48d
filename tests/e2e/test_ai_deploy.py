"""The inference app and the AI agent deployed for real on the local cloud (docs/ai.md, issue 21).

examples/llm is built (teecloud/llm:0.1: llama-cpp-python's server on CPU, teecloud.ai's front, a tiny model
whose sha256 the compose file pins) and deployed with `deploy` unchanged: an attested CVM whose compose hash
is on chain and whose keys come only from its guest agent. Through the gateway's TLS passthrough (TLS ends in
the CVM): chat completions, streamed too; the attestation route verified by the client side; a receipt
checked by `teecloud ai verify`; `teecloud ai proxy` in front of it used by the official openai client; the
engine killed inside the container -> 503, then it recovers.

examples/ai-agent is built (teecloud/ai-agent:0.1) and deployed unchanged, its settings sealed to the app
(encrypted env). It asks the inference app through the verifying proxy, keeps its memory in sqlite-vec on the
encrypted volume with the engine's own embeddings (llama.cpp /v1/embeddings), and records each decision on
chain (AgentLog) with a wallet key from GetKey; after a restart of its CVM its memory and wallet address are
the same.

The CVMs' containers sit on Docker bridges; host services bind loopback. The chain's JSON-RPC and the proxy
are reached from the agent's container through TCP relays on the Docker host bridge's address (reachable from
the host and its containers only), as in test_functions."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ROOT, _docker_ok, _fail_or_skip
from tests.e2e.test_functions import _bridge_ip, _Relay

pytestmark = [pytest.mark.docker, pytest.mark.slow]

LLM = ROOT / "examples" / "llm"
AGENT = ROOT / "examples" / "ai-agent"
MODEL_ID = "tiny-llama"
PROMPT = "hello world, the model is"


def _build(example: Path) -> str:
    if not _docker_ok():
        _fail_or_skip("no Docker engine reachable (start one with `bash scripts/dockerd.sh`)")
    spec = importlib.util.spec_from_file_location(f"{example.name}_build_image", example / "build_image.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t0 = time.monotonic()
    image = str(mod.build())
    print(f"\n[timing] {image} build (or cache check): {time.monotonic() - t0:.1f} s")
    return image


@pytest.fixture(scope="module")
def llm_image() -> str:
    return _build(LLM)


@pytest.fixture(scope="module")
def agent_image() -> str:
    return _build(AGENT)


def _insecure_tls() -> ssl.SSLContext:
    # The app's certificate chains to its KMS-derived app CA, which no public root vouches for: the test
    # compares the connection's key with the attested key set instead (as the proxy does).
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _containers(instance_id: str) -> list[str]:
    project = f"tc-{instance_id[:16]}"
    return subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def _exec(instance_id: str, *argv: str, timeout: float = 60) -> str:
    (cid,) = _containers(instance_id)
    r = subprocess.run(["docker", "exec", cid, *argv], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _kms_root(session: Any) -> bytes:
    k = session.chain.kms.info().k256_pubkey
    return bytes.fromhex(k) if isinstance(k, str) else bytes(k)


@dataclass
class LlmApp:
    deployed: Any  # DeployResult
    url: str  # https through the gateway's TLS passthrough: <app_id>-8000s.<base_domain>
    kms_root: bytes
    http: httpx.Client
    deploy_to_first_token_s: float


@pytest.fixture(scope="module")
def llm(llm_image: str, cloud: Any, session: Any) -> Iterator[LlmApp]:
    from teecloud.cloud.deploy import deploy

    gw = session.endpoints.gateway
    if not gw:
        _fail_or_skip("`teecloud up` started no gateway here (HAProxy missing)")
    t0 = time.monotonic()
    r = deploy(session, LLM / "docker-compose.yml", name="llm")
    assert r.status == "running", r.error
    url = f"https://{r.app_id}-8000s.{gw['base_domain']}:{gw['public_port']}"
    http = httpx.Client(base_url=url, verify=_insecure_tls(), timeout=120, trust_env=False)
    try:
        first_token = _first_streamed_token(http, deadline=time.monotonic() + 300)
        took = first_token - t0
        print(f"\n[timing] deploy of examples/llm to its first streamed token: {took:.1f} s")
        print(f"[timing] deploy phases: {r.timings}; boot: {r.boot_timings}")
        yield LlmApp(r, url, _kms_root(session), http, took)
    finally:
        http.close()
        session.node.remove(r.instance_id)


def _first_streamed_token(http: httpx.Client, deadline: float) -> float:
    """Waits until the app serves (the engine loads the model after the CVM booted); the time of the first
    token of a streamed answer."""
    last = ""
    while time.monotonic() < deadline:
        try:
            with http.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": MODEL_ID, "messages": [{"role": "user", "content": PROMPT}], "stream": True},
            ) as resp:
                if resp.status_code == 200:
                    first = None
                    for line in resp.iter_lines():
                        if first is None and line.startswith("data: {") and '"content"' in line:
                            first = time.monotonic()
                    if first is not None:
                        return first
                last = f"{resp.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise AssertionError(f"the deployed inference app did not answer in time (last: {last})")


def _keyset(llm: LlmApp) -> Any:
    from teecloud.ai.keyset import KeySet

    rep = llm.http.get("/v1/attestation/report", params={"nonce": os.urandom(16).hex()})
    assert rep.status_code == 200, rep.text
    return KeySet.from_json(rep.json()["keyset"])


def test_the_inference_app_is_attested_and_its_keys_come_only_from_its_guest_agent(
    session: Any, llm: LlmApp
) -> None:
    from teecloud.ai.errors import KeySetInvalid

    r = llm.deployed
    assert r.verdict is not None and r.verdict.ok, r.verdict.to_json()
    assert r.verdict.compose_hash == r.compose_hash
    assert session.chain.is_compose_hash_allowed(r.app_id, r.compose_hash)
    # the compose file went unchanged: the weights digest it pins is what the CVM measured
    compose = json.loads(session.node.get(r.instance_id).app_compose)
    assert compose["docker_compose_file"] == (LLM / "docker-compose.yml").read_text()
    keyset = _keyset(llm)
    # the key set's keys were issued by the KMS to this app (GetKey signature chains to the KMS root)...
    assert keyset.app_id.hex() == r.app_id
    keyset.verify_chain(llm.kms_root)
    with pytest.raises(KeySetInvalid):
        keyset.verify_chain(bytes.fromhex("02" + "11" * 32))
    # ... and the container has no other way to them: no host path but the guest agent's sockets is mounted,
    # and nothing key-like is in its environment
    (cid,) = _containers(r.instance_id)
    info = json.loads(
        subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True).stdout
    )[0]
    binds = {m["Destination"] for m in info["Mounts"] if m["Type"] == "bind"}
    assert {"/var/run/dstack.sock", "/var/run/tappd.sock"} <= binds
    assert all(
        d in ("/var/run/dstack.sock", "/var/run/tappd.sock", "/data") or d.startswith("/.teecloud")
        for d in binds
    ), binds
    env = " ".join(info["Config"]["Env"]).lower()
    assert "secret" not in env and "private" not in env and "key=" not in env


def test_chat_completions_through_the_gateway_streamed_too_and_the_tls_key_is_attested(llm: LlmApp) -> None:
    from teecloud.ai._http import peer_spki_sha256

    keyset = _keyset(llm)
    r = llm.http.post(
        "/v1/chat/completions",
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8},
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None and r.headers["x-receipt-id"]
    # TLS ends inside the CVM: the key on this connection through the gateway is the attested one
    assert peer_spki_sha256(r) == keyset.tls_spki_sha256
    events: list[str] = []
    with llm.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": PROMPT}], "stream": True},
    ) as s:
        assert s.status_code == 200 and s.headers["x-receipt-id"]
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    chunk = json.loads(events[0].removeprefix("data: "))
    assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == MODEL_ID


def test_the_attestation_report_verifies_with_the_client_side(cloud: Any, llm: LlmApp) -> None:
    from teecloud.ai.errors import UpstreamRejected
    from teecloud.ai.proxy import ProxyPolicy, UpstreamVerifier
    from teecloud.peer import PeerPolicy, PeerVerifier, StaticCollateral
    from teecloud.tee.simulated import SimulatedTdx

    tee = SimulatedTdx(cloud.home)
    peer = PeerVerifier(PeerPolicy.dev(tee.dev_root_der()), StaticCollateral(tee.collateral))
    r = llm.deployed
    digest = hashlib.sha256((LLM / "tinymodel.py").read_bytes())  # not the weights: a wrong expectation
    policy = ProxyPolicy(
        kms_root_public_key=llm.kms_root,
        expected_app_id=bytes.fromhex(r.app_id),
        allowed_compose_hashes=frozenset({bytes.fromhex(r.compose_hash)}),
        expected_model=MODEL_ID,
    )

    async def attest(pol: ProxyPolicy) -> Any:
        async with httpx.AsyncClient(base_url=llm.url, verify=_insecure_tls(), timeout=60) as client:
            return await UpstreamVerifier(client, peer, pol).attest()

    up = asyncio.run(attest(policy))
    assert up.app_id.hex() == r.app_id and up.compose_hash.hex() == r.compose_hash
    assert up.tls_pinned and up.simulated and up.model == MODEL_ID
    weights = bytes.fromhex(json.loads(session_compose(llm))["MODEL_SHA256"])
    assert up.weights_sha256 == weights
    # the same route refuses what the deployment is not: another compose hash, other weights
    for bad, step in [
        (ProxyPolicy(llm.kms_root, allowed_compose_hashes=frozenset({bytes(32)})), "compose_hash"),
        (ProxyPolicy(llm.kms_root, expected_weights_sha256=digest.digest()), "model"),
    ]:
        with pytest.raises(UpstreamRejected) as exc:
            asyncio.run(attest(bad))
        assert exc.value.step == step


def session_compose(llm: LlmApp) -> str:
    import yaml

    doc = yaml.safe_load((LLM / "docker-compose.yml").read_text())
    return json.dumps(doc["services"]["llm"]["environment"])


def test_a_receipt_checks_with_teecloud_ai_verify(llm: LlmApp, tmp_path: Path) -> None:
    body = json.dumps({"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 6}).encode()
    r = llm.http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    doc = llm.http.get(f"/v1/receipts/{r.headers['x-receipt-id']}").json()
    (tmp_path / "answer.json").write_text(json.dumps(doc))
    (tmp_path / "req").write_bytes(body)
    (tmp_path / "resp").write_bytes(r.content)
    base = [sys.executable, "-c", "from teecloud.cli import main; main()", "ai", "verify"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    args = [str(tmp_path / "answer.json"), "--kms-root", llm.kms_root.hex(), "--app-id", llm.deployed.app_id]
    ok = subprocess.run(
        [*base, *args, "--request", str(tmp_path / "req"), "--response", str(tmp_path / "resp"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["steps"][-2:] == ["tree_head", "inclusion"]
    (tmp_path / "resp").write_bytes(r.content.replace(b'"text"', b'"text" ', 1))
    bad = subprocess.run(
        [*base, *args, "--response", str(tmp_path / "resp")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 1 and "refused: response" in " ".join(bad.stderr.split()), bad.stderr


@dataclass
class Proxy:
    url: str
    port: int


@pytest.fixture(scope="module")
def proxy(cloud: Any, llm: LlmApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """`teecloud ai proxy --upstream <the app through the gateway>` as a user starts it."""
    from tests.ai.conftest import free_port

    port = free_port()
    r = llm.deployed
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TEECLOUD_HOME": str(cloud.home)}
    weights = json.loads(session_compose(llm))["MODEL_SHA256"]
    cmd = [
        sys.executable, "-c", "from teecloud.cli import main; main()", "ai", "proxy",
        "--upstream", llm.url, "--trust-dev-root", "--port", str(port),
        "--kms-root", llm.kms_root.hex(), "--app-id", r.app_id, "--compose-hash", r.compose_hash,
        "--model", MODEL_ID, "--weights-sha256", weights,
    ]  # fmt: skip
    logf = tmp_path_factory.mktemp("proxy") / "proxy.log"
    with logf.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, logf.read_text()
            try:
                httpx.get(url + "/v1/models", timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, logf.read_text()
                time.sleep(0.2)
        yield Proxy(url, port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the proxy this fixture started
        proc.wait(timeout=30)


def test_the_verifying_proxy_in_front_of_it_works_with_the_openai_package(llm: LlmApp, proxy: Proxy) -> None:
    import openai

    oa = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in oa.models.list().data] == [MODEL_ID]
    raw = oa.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}], max_tokens=8
    )
    chat = raw.parse()
    assert raw.headers["x-teecloud-verified"] == "receipt"
    assert chat.choices[0].message.content is not None and chat.usage and chat.usage.completion_tokens > 0
    chunks = list(
        oa.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, stream=True
        )
    )
    assert chunks and all(c.model == MODEL_ID for c in chunks)
    info = httpx.get(proxy.url + "/v1/teecloud/upstream", timeout=30).json()
    assert info["app_id"] == llm.deployed.app_id and info["simulated"] is True
    # the prompt went sealed to the attested key: the receipt, as anyone fetches it, says so
    doc = llm.http.get(f"/v1/receipts/{raw.headers['x-receipt-id']}").json()
    assert doc["receipt"]["body"]["e2ee"] is True


_ENGINE_PIDS = """
import os, signal, sys
me = os.getpid()
for p in os.listdir("/proc"):
    if p.isdigit() and int(p) != me:
        try:
            argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\\0")
        except OSError:
            continue
        if b"llama_cpp.server" in argv:
            if sys.argv[1:] == ["kill"]:
                os.kill(int(p), signal.SIGKILL)
            print(p)
"""


def test_the_engine_killed_inside_the_container_is_503_then_it_recovers(llm: LlmApp) -> None:
    killed = _exec(llm.deployed.instance_id, "python3", "-c", _ENGINE_PIDS, "kill").split()
    assert len(killed) == 1, killed  # the one engine process, found by its argv
    req = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 4}
    r = llm.http.post("/v1/completions", json=req)
    assert r.status_code == 503 and "engine" in r.json()["error"]["message"], r.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = llm.http.post("/v1/completions", json=req)
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        time.sleep(1)
    assert r.status_code == 200 and r.headers["x-receipt-id"], "the engine did not come back in 120 s"
    # a new engine process (the app restarted it; the container and the CVM were not restarted)
    again = _exec(llm.deployed.instance_id, "python3", "-c", _ENGINE_PIDS).split()
    assert len(again) == 1 and again != killed


# ----------------------------------------------------------------------------------------------- the agent

_MEMORY = """
import json, apsw
db = apsw.Connection("/data/agent/memory.db")
print(json.dumps(db.execute("SELECT kind, text FROM memories ORDER BY id").fetchall()))
db.close()
"""


def _agent_memory(instance_id: str) -> list[list[str]]:
    return [list(r) for r in json.loads(_exec(instance_id, "python3", "-c", _MEMORY))]


def _memory_dim(instance_id: str) -> int:
    probe = (
        "import apsw; db = apsw.Connection('/data/agent/memory.db'); "
        "print(db.execute(\"SELECT value FROM meta WHERE key='dim'\").fetchall()[0][0])"
    )
    return int(_exec(instance_id, "python3", "-c", probe).strip())


def _observe(instance_id: str, text: str) -> None:
    line = text.replace("'", "") + "\n"
    _exec(
        instance_id,
        "python3",
        "-c",
        f"open('/data/agent/observations.txt', 'a').write({line!r})",
    )


def _ready(instance_id: str) -> bool:
    """The agent is running (its observations folder is made at start)."""
    probe = "import os, sys; sys.exit(not os.path.isdir('/data/agent'))"
    (cid,) = _containers(instance_id)
    r = subprocess.run(["docker", "exec", cid, "python3", "-c", probe], capture_output=True)
    return r.returncode == 0


def _wait(cond: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.5)


def test_the_agent_decides_through_the_proxy_remembers_signs_and_survives_a_restart(
    agent_image: str, session: Any, llm: LlmApp, proxy: Proxy
) -> None:
    from urllib.parse import urlsplit

    from teecloud.ai.receipts import SignedReceipt, verify_receipt
    from teecloud.chain.agentlog import AgentLog
    from teecloud.cloud.deploy import deploy

    chain = session.chain
    ip = _bridge_ip()
    rpc = urlsplit(session.endpoints.chain_rpc)
    chain_relay = _Relay(ip, (rpc.hostname or "127.0.0.1", int(rpc.port or 80)))
    proxy_relay = _Relay(ip, ("127.0.0.1", proxy.port))
    agentlog = AgentLog.deploy(chain)
    env = {
        "INFERENCE_URL": f"http://{ip}:{proxy_relay.port}",
        "CHAIN_RPC_URL": f"http://{ip}:{chain_relay.port}",
        "AGENTLOG_ADDRESS": agentlog.address,
    }
    r = deploy(session, AGENT / "docker-compose.yml", name="ai-agent", env=env, allowed_envs=sorted(env))
    try:
        assert r.status == "running", r.error
        assert r.verdict is not None and r.verdict.ok, r.verdict.to_json()
        address = _exec(r.instance_id, "python3", "/app/agent.py", "--address").strip()
        assert address.startswith("0x") and len(address) == 42
        chain.send(address, b"", value=10**18)  # gas money for the agent's own wallet
        _wait(lambda: _ready(r.instance_id), "the agent's start", timeout=60)
        _observe(r.instance_id, "the ETH price rose five percent")
        _wait(lambda: agentlog.count(address) == 1, "the agent's first decision on chain")
        _observe(r.instance_id, "the ETH price fell two percent")
        _wait(lambda: agentlog.count(address) == 2, "the agent's second decision on chain")
        # the memory's vectors are the engine's own embeddings (the tiny model's 64 dimensions, not the
        # local hashing embedder's 256), fetched through the verifying proxy
        assert _memory_dim(r.instance_id) == 64
        before = _agent_memory(r.instance_id)
        assert [k for k, _ in before] == ["observation", "decision"] * 2
        assert before[0][1] == "the ETH price rose five percent"
        # every decision on chain was sent by the agent's wallet and names a receipt the inference app serves
        decisions = agentlog.decisions(address)
        assert len(decisions) == 2 and all(d["args"]["agent"].lower() == address.lower() for d in decisions)
        for d in decisions:
            rid = d["args"]["memo"].removeprefix("receipt:")
            doc = llm.http.get(f"/v1/receipts/{rid}").json()
            body = verify_receipt(
                SignedReceipt.from_json(doc["receipt"]),
                kms_root_public_key=llm.kms_root,
                expected_app_id=bytes.fromhex(llm.deployed.app_id),
            )
            assert body.model == MODEL_ID
        # a restart of the CVM: the volume is unlocked again with the KMS's key, the wallet is derived again
        session.node.action(r.instance_id, "restart")
        st = session.node.wait(r.instance_id)
        assert st.status == "running", st.error
        _wait(lambda: len(_containers(r.instance_id)) == 1, "the agent's container after the restart")
        assert _exec(r.instance_id, "python3", "/app/agent.py", "--address").strip() == address
        assert _agent_memory(r.instance_id) == before
        _observe(r.instance_id, "the ETH price rose again")
        _wait(lambda: agentlog.count(address) == 3, "the agent's decision after the restart")
        after = _agent_memory(r.instance_id)
        assert after[:4] == before and [k for k, _ in after[4:]] == ["observation", "decision"]
    except AssertionError:
        for cid in _containers(r.instance_id):  # the agent's own words, for the failure report
            logs = subprocess.run(["docker", "logs", "--tail", "40", cid], capture_output=True, text=True)
            print(logs.stdout[-4000:], logs.stderr[-4000:])
        raise
    finally:
        session.node.remove(r.instance_id)
        chain_relay.close()
        proxy_relay.close()
