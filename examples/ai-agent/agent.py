"""The AI agent app (a teecloud app like any other; docs/ai.md "AI agents").

Each observation is decided on by the inference app, remembered in the agent's vector memory on the
encrypted volume, and recorded on chain (AgentLog) by a transaction signed with the agent's own wallet, a
secp256k1 key the KMS derives for this app (GetKey through the guest API; the same on every restart and
replica, another for every other app, never outside the CVM).

Environment:
    INFERENCE_URL     the inference app's OpenAI-compatible base URL (examples/llm), best a verifying
                      `teecloud ai proxy` in front of it (required)
    MODEL_ID          the model to ask (default tiny-llama)
    CHAIN_RPC_URL     JSON-RPC of the chain AgentLog is on (required)
    AGENTLOG_ADDRESS  the AgentLog contract (required)
    MEMORY_DB         the sqlite-vec memory file (default /data/agent/memory.db: the encrypted volume)
    EMBEDDINGS        auto (default): the inference app's own embeddings (llama.cpp /v1/embeddings) when
                      its engine serves them, else the local hashing embedder; engine; hashing. The memory's
                      dimension is fixed when its file is made: keep the choice once the agent has memories
    EMBED_DIM         dimension of the local hashing embedder (default 256)
    OBSERVATIONS      a text file, one observation a line, appended to by whoever feeds the agent; lines
                      already acted on are remembered in OBSERVATIONS.cursor (default
                      /data/agent/observations.txt)
    INTERVAL          seconds between polls (default 30)
    STEPS             stop after this many steps (default: run forever)

`python3 agent.py --address` prints the wallet address (fund it with gas money) and exits.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("ai-agent")


class ObservationFile:
    """New lines of a text file, each handed out once; the position survives restarts (atomic writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cursor = path.with_name(path.name + ".cursor")
        self._next_pos: int | None = None

    def _pos(self) -> int:
        try:
            return int(self.cursor.read_text().strip() or "0")
        except (OSError, ValueError):
            return 0

    def peek(self) -> str | None:
        """The next complete line (None: nothing new, or a line still being written)."""
        self._next_pos = None
        try:
            with self.path.open("rb") as f:
                f.seek(self._pos())
                line = f.readline(8192)
                pos = f.tell()
        except OSError:
            return None
        if not line.endswith(b"\n"):
            return None
        self._next_pos = pos
        return line.decode("utf-8", "replace").strip() or " "

    def commit(self) -> None:
        from teecloud._fs import atomic_write

        if self._next_pos is not None:
            atomic_write(self.cursor, str(self._next_pos).encode(), mode=0o600)
            self._next_pos = None


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from dstack_sdk import DstackClient

    from teecloud.ai.agent import Agent, AgentWallet, InferenceClient, run_loop, select_embedder
    from teecloud.ai.memory import VectorMemory
    from teecloud.chain import ChainConnection
    from teecloud.chain.agentlog import AgentLog
    from teecloud.chain.transport import HttpTransport

    try:
        wallet = AgentWallet.from_guest_api(DstackClient(timeout=30))
    except Exception as exc:  # the guest API is the app's only source of keys: say why and stop
        print(
            f"error: cannot get the wallet key from the guest agent: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    if "--address" in argv:
        print(wallet.address)
        return 0
    missing = [v for v in ("INFERENCE_URL", "CHAIN_RPC_URL", "AGENTLOG_ADDRESS") if not os.environ.get(v)]
    if missing:
        print(f"error: set {', '.join(missing)}", file=sys.stderr)
        return 2
    conn = ChainConnection(HttpTransport(os.environ["CHAIN_RPC_URL"]), wallet.signer_key(), label="agent")
    observations = ObservationFile(Path(os.environ.get("OBSERVATIONS", "/data/agent/observations.txt")))
    observations.path.parent.mkdir(parents=True, exist_ok=True)  # where the agent's feeder appends
    inference = InferenceClient(os.environ["INFERENCE_URL"], os.environ.get("MODEL_ID", "tiny-llama"))
    steps = int(os.environ["STEPS"]) if os.environ.get("STEPS") else None
    print(f"agent of app {wallet.app_id.hex()}: wallet {wallet.address}", flush=True)
    name, embed, dim = select_embedder(
        inference, os.environ.get("EMBEDDINGS", "auto"), hashing_dim=int(os.environ.get("EMBED_DIM", "256"))
    )
    print(f"embeddings: {name}, {dim} dimensions", flush=True)
    try:
        memory = VectorMemory(Path(os.environ.get("MEMORY_DB", "/data/agent/memory.db")), dim=dim)
    except ValueError as exc:  # a memory made with another embedder: say so rather than mix vector spaces
        hint = f"embeddings: {name}; set EMBEDDINGS to the one it was made with"
        print(f"error: {exc} ({hint})", file=sys.stderr)
        return 1
    with memory:
        agent = Agent(
            inference=inference,
            memory=memory,
            embed=embed,
            log=AgentLog(conn, os.environ["AGENTLOG_ADDRESS"]),
        )
        run_loop(agent, observations, interval=float(os.environ.get("INTERVAL", "30")), steps=steps)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
