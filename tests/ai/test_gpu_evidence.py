"""GPU evidence in the attestation report: a simulated GPU's SPDM 1.1 evidence (real format, development
device root) for nonce = report_data, checked by the proxy through teecloud's NVIDIA verifier. Wrong nonce,
a chain to another root, or absent when required: the proxy refuses."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from teecloud.ai import UpstreamRejected
from teecloud.ai._http import Listener
from teecloud.ai.gpu import SimulatedGpu, verify_gpu_evidence
from teecloud.ai.server import InferenceConfig, make_inference_app
from tests.ai.conftest import MODEL_ID, Stack
from tests.ai.test_inference_e2e import mitm

pytestmark = pytest.mark.slow


def test_simulated_gpu_evidence_verifies_only_under_its_root_and_nonce(tmp_path: Path) -> None:
    gpu, other = SimulatedGpu(tmp_path / "a"), SimulatedGpu(tmp_path / "b")
    assert SimulatedGpu(tmp_path / "a").root_der() == gpu.root_der()  # created once, then reused
    nonce, now = os.urandom(32), int(time.time())
    [ev] = verify_gpu_evidence(
        gpu.collect(nonce), trust_anchors=[gpu.root_der()], expected_nonce=nonce, now=now
    )
    assert ev.tee == "nvidia" and ev.report_data == nonce and len(ev.measurements) == 4
    for kw, needle in [
        ({"trust_anchors": [gpu.root_der()], "expected_nonce": os.urandom(32)}, "nonce"),
        ({"trust_anchors": [other.root_der()], "expected_nonce": nonce}, "GPU 0"),
    ]:
        with pytest.raises(UpstreamRejected, match=needle) as err:
            verify_gpu_evidence(gpu.collect(nonce), now=now, **kw)  # type: ignore[arg-type]
        assert err.value.step == "gpu"
    tampered = gpu.collect(nonce)
    raw = bytearray(bytes.fromhex(tampered[0]["evidence"]))
    raw[60] ^= 1  # a measurement byte
    tampered[0]["evidence"] = raw.hex()
    with pytest.raises(UpstreamRejected):
        verify_gpu_evidence(tampered, trust_anchors=[gpu.root_der()], expected_nonce=nonce, now=now)
    for bad in [None, [], [1], [{"evidence": 1}], [{}] * 17]:
        with pytest.raises(UpstreamRejected):
            verify_gpu_evidence(bad, trust_anchors=[gpu.root_der()], expected_nonce=nonce, now=now)


@pytest.fixture(scope="module")
def gpu_front(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Listener, SimulatedGpu]]:
    d = tmp_path_factory.mktemp("gpu")
    gpu = SimulatedGpu(d)
    config = InferenceConfig(MODEL_ID, stack.config.weights_sha256, stack.engine.url, d / "receipts")
    with Listener(make_inference_app(config, stack.keys, stack.quote, gpu=gpu), name="gpu-front") as f:
        yield f, gpu


def ask(url: str) -> None:
    oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    oa.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def refused(url: str, step: str) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        ask(url)
    assert err.value.status_code == 502 and f"{step}:" in err.value.message, err.value.message


def test_proxy_verifies_the_gpu_evidence_bound_to_the_report(
    stack: Stack, gpu_front: tuple[Listener, SimulatedGpu], tmp_path: Path
) -> None:
    front, gpu = gpu_front
    with stack.proxy(front.url, require_gpu=True, gpu_trust_anchors=(gpu.root_der(),)) as p:
        ask(p.url)
    # Absent when required: the plain front has no GPU.
    with stack.proxy(require_gpu=True, gpu_trust_anchors=(gpu.root_der(),)) as p:
        refused(p.url, "gpu")
    # A chain to another root.
    with stack.proxy(
        front.url, require_gpu=True, gpu_trust_anchors=(SimulatedGpu(tmp_path).root_der(),)
    ) as p:
        refused(p.url, "gpu")

    # A wrong nonce: the operator swaps in evidence the GPU gave for another request.
    stale = gpu.collect(os.urandom(32))

    def replay_gpu(path: str, content: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        if path == "v1/attestation/report":
            doc = json.loads(content)
            doc["gpu_evidence"] = stale
            content = json.dumps(doc).encode()
        return content, headers

    with (
        mitm(stack, replay_gpu, upstream=front.url) as m,
        stack.proxy(m.url, require_gpu=True, gpu_trust_anchors=(gpu.root_der(),)) as p,
    ):
        refused(p.url, "gpu")
