"""KmsClient error messages never carry the KMS's answer (which may hold key material)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from teecloud.kms import api
from teecloud.kms import client as client_mod
from teecloud.kms.client import KmsClient, UnsafeNoServerCheck
from teecloud.kms.deadline import Answer
from teecloud.kms.errors import KmsClientError

SECRET = "5e" * 32


class _FakePool:
    """A kept-alive pool whose every exchange answers `content` from the pinned server."""

    def __init__(self, content: bytes, host: str, port: int) -> None:
        self._content, self.host, self.port = content, host, port

    def exchange(self, method: str, target: str, body: bytes | None, **kw: Any) -> Answer:
        return Answer(200, self._content, b"server-cert")

    def close(self) -> None:
        return None


def test_unexpected_answer_error_does_not_echo_key_material(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AppKeyResponse with one field missing (a KMS of another version): pydantic's error carries the
    whole input object by default, so the KmsClientError (logged by the node) used to contain the keys."""
    answer = {
        "app_id": "11" * 20,
        "instance_id": "22" * 20,
        "ca_key": "-----BEGIN PRIVATE KEY-----\n" + SECRET + "\n-----END PRIVATE KEY-----\n",
        "ca_cert": "",
        "disk_crypt_key": SECRET,
        "env_crypt_key": SECRET,
        "k256_key": SECRET,
        "k256_signature": "",
        "kms_k256_pubkey": "",
        "gateway_app_id": "",
        # "os_image_hash" missing
    }
    content = json.dumps(answer).encode()
    monkeypatch.setattr(
        client_mod, "ConnectionPool", lambda host, port, ctx, **kw: _FakePool(content, host, port)
    )
    client = KmsClient("https://kms.invalid", server_check=UnsafeNoServerCheck())
    # the server identity is probed and pinned before any request (kms.client docstring): pinned here
    monkeypatch.setattr(client, "_pin", lambda **kw: b"server-cert")
    monkeypatch.setattr(client, "_ssl_context", lambda *a, **kw: None)
    with pytest.raises(KmsClientError) as err:
        client._call("POST", api.PATH_GET_APP_KEY, api.AppKeyResponse, body={})
    assert "unexpected answer" in str(err.value)
    assert SECRET not in str(err.value)
