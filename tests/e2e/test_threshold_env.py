"""`teecloud up --kms-nodes 5 --threshold 3` + `teecloud deploy --env` on the docker runtime (issue 19):
the app's env key is made by a ceremony among the five running node processes on the deploy's first
request, the deploy encrypts to the key three nodes agree on (signatures recovered to the group's signing
key), and the app's CVM decrypts its env at boot from three proved partials: the app sees its secret."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import _fail_or_skip, deploy_hello_with_secret

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SECRET = "threshold-secret-" + hashlib.sha256(b"teecloud threshold env").hexdigest()[:16]


@pytest.fixture(scope="module")
def tcloud(hello_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from teecloud.devstack import LocalCloud, check_prerequisites

    missing = check_prerequisites()
    if missing:
        _fail_or_skip("; ".join(missing))
    home = tmp_path_factory.mktemp("e2e-tenv-home")
    c = LocalCloud(home, kms_nodes=5, kms_threshold=3)
    c.start()
    try:
        yield c
    finally:
        try:
            for inst in c.node.store.all():
                c.node.remove(inst.instance_id)
        finally:
            c.stop()


def test_deploy_with_env_against_five_threshold_nodes(tcloud: Any) -> None:
    from teecloud.cloud.deploy import Session

    home = Path(tcloud.home)
    session = Session(home)
    try:
        deploy_hello_with_secret(session, "hello-tenv", SECRET)
        # every node holds its own sealed share of the app's env key; none holds the key or the secret
        sealed = sorted((home / "kms-nodes").glob("*/kms/threshold-env/*.sealed"))
        assert len(sealed) == 5
        for p in (home / "kms-nodes").rglob("*"):
            if p.is_file():
                assert SECRET.encode() not in p.read_bytes()
    finally:
        session.close()
