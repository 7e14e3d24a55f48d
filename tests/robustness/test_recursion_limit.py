"""Deeply nested JSON is an error, never a crash, in processes that import the chain client (py_ecc raises
the recursion limit to 100 000 at import; at that limit the C JSON parser overflows the C stack)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

MODULES = [
    "teecloud.chain",
    "teecloud.kms.server",
    "teecloud.functions.http",
    "teecloud.gateway.server",
    "teecloud.cli",
]


@pytest.mark.parametrize("module", MODULES)
def test_deep_json_is_a_recursion_error_not_a_segfault(module: str) -> None:
    code = textwrap.dedent(
        f"""
        import importlib, json, sys, threading
        importlib.import_module({module!r})
        import eth_account, eth_keys  # what pulls in py_ecc, whatever the module imported
        from teecloud._serve import AGENT, LimitedServer
        if {module!r} != "teecloud.chain":  # a listener starting after the import brings the limit back
            import uvicorn
            LimitedServer(uvicorn.Config(app=None), AGENT)
        assert sys.getrecursionlimit() <= 1024 * 12, sys.getrecursionlimit()
        out = []
        def parse():
            try:
                json.loads("[" * 200_000 + "]" * 200_000)
                out.append("parsed")
            except RecursionError:
                out.append("refused")
        t = threading.Thread(target=parse)  # a server's worker thread
        t.start(); t.join()
        print(out[0])
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -11 was the segfault
    assert r.stdout.strip() == "refused"
