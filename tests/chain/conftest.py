"""Chain fixtures: the same suite runs on the embedded chain (py-evm) and on anvil (a second EVM)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from teecloud.chain import DEV_KEYS, ChainClient

ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
TOOLS = Path.home() / ".cache" / "teecloud-tools" / "node_modules"


def anvil_binary() -> str | None:
    """The native anvil binary (not the node wrapper, so stopping it stops it), else anvil on PATH."""
    for cand in sorted(TOOLS.glob("@foundry-rs/anvil-*/bin/anvil")):
        if os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("anvil") or (
        str(TOOLS / ".bin" / "anvil") if (TOOLS / ".bin" / "anvil").exists() else None
    )


def anvil_keys(n: int = 10) -> list[str]:
    Account.enable_unaudited_hdwallet_features()
    return [
        "0x" + bytes(Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}").key).hex()
        for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Anvil:
    def __init__(self) -> None:
        binary = anvil_binary()
        if binary is None:
            pytest.fail("anvil not found: run scripts/setup.sh (npm @foundry-rs/anvil)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                binary,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--silent",
                "--mnemonic",
                ANVIL_MNEMONIC,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.post(
                    self.url,
                    json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
                    timeout=1,
                )
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail("anvil did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def anvil() -> Iterator[Anvil]:
    a = Anvil()
    yield a
    a.stop()


@pytest.fixture
def embedded_chain(teecloud_home: Path) -> Iterator[ChainClient]:
    c = ChainClient.embedded(teecloud_home)
    c.keys = list(DEV_KEYS)  # type: ignore[attr-defined]
    c.deploy()
    yield c
    c.close()


@pytest.fixture(params=["embedded", pytest.param("anvil", marks=pytest.mark.anvil)])
def chain(request: pytest.FixtureRequest, teecloud_home: Path) -> Iterator[ChainClient]:
    """A deployed teecloud chain with 10 funded keys in `chain.keys` (keys[0] is the deployer/owner)."""
    if request.param == "embedded":
        c = ChainClient.embedded(teecloud_home)
        keys = list(DEV_KEYS)
    else:
        a: Anvil = request.getfixturevalue("anvil")
        keys = anvil_keys()
        c = ChainClient.rpc(a.url, keys[0], home=teecloud_home)
    c.keys = keys  # type: ignore[attr-defined]
    c.deploy()
    yield c
    c.close()
