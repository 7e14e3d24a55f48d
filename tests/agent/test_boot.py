from __future__ import annotations

import hashlib
import json
import math

import pytest
from dstack_sdk import get_compose_hash
from fastapi.testclient import TestClient

from teecloud.agent import BootError, KeyProviderError, LocalDevKeyProvider, boot, compose_hash
from teecloud.agent.http import make_public_app
from teecloud.agent.keyprovider import DEV_PROVIDER_NAME, KeyProvider
from teecloud.attestation.eventlog import replay_rtmrs, runtime_event_digest
from teecloud.tee.simulated import SimulatedTdx

from .conftest import COMPOSE


@pytest.mark.parametrize(
    "doc",
    [
        COMPOSE,
        {"runner": "docker-compose", "name": "ünïcode ✓", "nested": {"b": 1, "a": [3, {"z": None, "y": 2}]}},
        {"runner": "bash", "bash_script": "echo", "pre_launch_script": None, "x": 1.5},
        {"runner": "docker-compose", "docker_config": {"registry": "r", "username": None}},
        {"runner": "docker-compose", "n": math.nan, "m": [math.inf]},
    ],
)
def test_compose_hash_matches_dstack_sdk(doc):
    assert compose_hash(doc).hex() == get_compose_hash(json.loads(json.dumps(doc)))


def test_boot_measures_dstack_order(teecloud_home):
    tee = SimulatedTdx(teecloud_home)
    kp = LocalDevKeyProvider(teecloud_home)
    st = boot(
        tee, json.dumps(COMPOSE), None, None, kp, extra_events=[("mr-kms", b"\x01" * 32)], storage_fs="ext4"
    )
    rt3 = [(e.event, e.event_payload) for e in tee.event_log() if e.imr == 3]
    assert [n for n, _ in rt3] == [
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-mr-done",
        "mr-kms",
        "key-provider",
        "storage-fs",
        "system-ready",
    ]
    payload = dict(rt3)
    assert payload["compose-hash"] == st.compose_hash == hashlib.sha256(st.app_compose_text.encode()).digest()
    assert payload["app-id"] == st.app_id == st.compose_hash[:20]
    assert payload["instance-id"] == st.instance_id and len(st.instance_id) == 20
    assert json.loads(payload["key-provider"]) == {
        "name": DEV_PROVIDER_NAME,
        "id": kp.root.ca_public_key_der.hex(),
    }
    for e in tee.event_log():
        if e.imr == 3:
            assert e.digest == runtime_event_digest(e.event, e.event_payload)
    ms = tee.measurements()
    assert replay_rtmrs(tee.event_log())[3] == ms["rtmr3"]


def test_no_instance_id_and_explicit_ids(teecloud_home):
    kp = LocalDevKeyProvider(teecloud_home)
    st = boot(SimulatedTdx(teecloud_home), json.dumps({**COMPOSE, "no_instance_id": True}), None, None, kp)
    assert st.instance_id == b""
    st2 = boot(SimulatedTdx(teecloud_home), json.dumps(COMPOSE), b"\xaa" * 20, b"\xbb" * 20, kp)
    assert st2.app_id == b"\xaa" * 20 and st2.instance_id == b"\xbb" * 20


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"runner": 5}', b"\xff\xfe"])
def test_bad_compose_is_boot_error(teecloud_home, text):
    with pytest.raises(BootError):
        boot(SimulatedTdx(teecloud_home), text, None, None, LocalDevKeyProvider(teecloud_home))


def test_dev_key_provider_persists_and_never_overwrites(teecloud_home):
    a = LocalDevKeyProvider(teecloud_home)
    assert isinstance(a, KeyProvider)
    path = a.root_keys_path
    assert path.stat().st_mode & 0o777 == 0o600
    b = LocalDevKeyProvider(teecloud_home)
    assert b.info() == a.info() and b.info()["name"] == DEV_PROVIDER_NAME
    tee = SimulatedTdx(teecloud_home)
    k1 = a.get_app_keys(tee, b"\x01" * 20, b"\x02" * 20)
    k2 = b.get_app_keys(tee, b"\x01" * 20, b"\x02" * 20)
    assert k1.k256_key == k2.k256_key and k1.os_image_hash == tee.os_image_hash
    path.write_bytes(b"corrupted")
    with pytest.raises(KeyProviderError, match="never regenerated"):
        LocalDevKeyProvider(teecloud_home)
    assert path.read_bytes() == b"corrupted"


@pytest.mark.parametrize("public", [True, False])
def test_public_app_honours_public_tcbinfo(teecloud_home, public):
    st = boot(
        SimulatedTdx(teecloud_home),
        json.dumps({**COMPOSE, "public_tcbinfo": public}),
        None,
        None,
        LocalDevKeyProvider(teecloud_home),
    )
    with TestClient(make_public_app(st)) as c:
        info = c.get("/Info").json()
        assert info["app_id"] == st.app_id.hex()
        assert (info["tcb_info"] != "") is public
        assert c.post("/GetKey", json={}).status_code == 404  # no keys on the public listener
