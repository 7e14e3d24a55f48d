"""`teecloud up --kms-url URL [--kms-url URL ...] --kms-chain RPC [--kms-contracts FILE]` (issue 20): the
local cloud uses an external KMS (one KMS, or a threshold group read from the chain's KmsGroup) on that
KMS's chain instead of starting a KMS and a chain of its own.

- Usage errors exit 2 before anything starts (LocalCloud is replaced by a recorder); valid options reach
  LocalCloud; with --kms-url, --qemu-mode tdx / sev-snp (and --qemu-gpu) are no longer refused by `up`
  itself, while the host check still runs and names what this machine lacks.
- LocalCloud refuses the same mistakes from the API; the contracts of the KMS's chain are adopted only when
  each address holds code there, and never deployed anew (an embedded chain served here, no Docker).
- Against the threshold nodes of another LocalCloud (3 nodes, t=2; Docker, under the e2e lock): the group is
  the chain's, each node's certificate is checked on chain before use, a subset of the URLs, one member
  alone, or a node whose evidence does not verify is refused; and an app deployed with an env on the
  second cloud runs and sees its secret (keys and env key from the other cloud's nodes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import teecloud.devstack as devstack
import teecloud.node.runtime.qemu as qemu_mod
from teecloud.node.errors import NodeError
from teecloud.node.runtime.qemu import tee_host_missing
from tests.cli._up_recorder import _Recorder, up_fixture  # noqa: F401  (the `up` fixture)
from tests.e2e.conftest import _fail_or_skip, deploy_hello_with_secret, hello_image

__all__ = ["hello_image"]  # a fixture (the hello app's image, built once per recipe)

U1, U2 = "https://127.0.0.1:9441", "https://127.0.0.1:9442"
CHAIN = "http://127.0.0.1:9545"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--kms-chain", CHAIN], "--kms-chain needs --kms-url"),
        (["--kms-contracts", "x.json", "--kms-chain", CHAIN], "--kms-chain, --kms-contracts need --kms-url"),
        (["--kms-url", U1], "--kms-url needs --kms-chain RPC_URL"),
        (["--kms-url", "http://127.0.0.1:9441", "--kms-chain", CHAIN], "an https://HOST[:PORT] URL"),
        (["--kms-url", "127.0.0.1:9441", "--kms-chain", CHAIN], "an https://HOST[:PORT] URL"),
        (["--kms-url", U1 + "/prefix", "--kms-chain", CHAIN], "no path, query or credentials"),
        (["--kms-url", "https://u:p@127.0.0.1:1", "--kms-chain", CHAIN], "no path, query or credentials"),
        (["--kms-url", U1 + "?x=1", "--kms-chain", CHAIN], "no path, query or credentials"),
        (["--kms-url", U1, "--kms-url", U1 + "/", "--kms-chain", CHAIN], "is given twice"),
        (["--kms-url", "https://[::1", "--kms-chain", CHAIN], "not a URL"),
        (["--kms-url", "https://h/" + "a" * 3000, "--kms-chain", CHAIN], "longer than 2048"),
        (["--kms-url", U1, "--kms-chain", CHAIN, "--kms-nodes", "3"], "--kms-nodes: with --kms-url"),
        (["--kms-url", U1, "--kms-chain", CHAIN, "--threshold", "2"], "--threshold: with --kms-url"),
        (["--kms-url", U1, "--kms-chain", CHAIN, "--kms-port", "8043"], "--kms-port: with --kms-url"),
        (["--kms-url", U1, "--kms-chain", CHAIN, "--chain-port", "8545"], "--chain-port: with --kms-url"),
        (["--kms-url", U1, "--kms-chain", CHAIN, "--dev-time-travel"], "--dev-time-travel: with"),
        (["--kms-url", U1, "--kms-chain", CHAIN, "--kms-require-app-compose"], "--kms-require-app-compose"),
        (["--kms-url", U1, "--kms-chain", CHAIN, "--kms-contracts", "/nonexistent/d.json"], "no such file"),
    ],
)
def test_usage_errors_exit_2_before_anything_starts(up: Any, argv: list[str], needle: str) -> None:
    code, text = up(*argv)
    assert code == 2, text
    assert needle in text, text
    assert _Recorder.calls == []


def test_too_many_kms_urls_are_refused(up: Any) -> None:
    urls = [a for i in range(17) for a in ("--kms-url", f"https://127.0.0.1:{9000 + i}")]
    code, text = up(*urls, "--kms-chain", CHAIN)
    assert code == 2 and "at most 16 --kms-url" in text, text
    assert _Recorder.calls == []


def test_valid_kms_options_reach_local_cloud(up: Any, tmp_path: Path) -> None:
    contracts = tmp_path / "deployment.json"
    contracts.write_text("{}")
    code, text = up(
        "--kms-url", U1 + "/", "--kms-url", U2, "--kms-chain", CHAIN, "--kms-contracts", str(contracts)
    )
    assert code == 1 and "recorder: not starting" in text, text
    (kw,) = _Recorder.calls
    assert kw["kms_urls"] == (U1, U2)  # normalized as KmsGroup records node URLs
    assert (kw["kms_chain"], kw["kms_contracts"]) == (CHAIN, contracts)
    assert (kw["kms_nodes"], kw["kms_threshold"], kw["kms_port"], kw["chain_port"]) == (1, 1, 0, 0)
    _Recorder.calls = []
    code, text = up()  # without --kms-url: a KMS and a chain of its own, as before
    (kw,) = _Recorder.calls
    assert (kw["kms_urls"], kw["kms_chain"], kw["kms_contracts"]) == ((), None, None)


@pytest.mark.parametrize("mode", ["tdx", "sev-snp"])
def test_a_confidential_mode_with_an_external_kms_is_not_refused_by_up(
    up: Any, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_mod, "tee_host_missing", lambda m: [])  # a host with the TEE
    argv = ("--backend", "qemu", "--qemu-mode", mode, "--qemu-gpu", "0000:18:00.0")
    code, text = up(*argv)  # the KMS up would start is simulated: refused, naming the way out
    assert code == 2 and "needs a real KMS" in text and "--kms-url" in text, text
    assert _Recorder.calls == []
    code, text = up(*argv, "--kms-url", U1, "--kms-chain", CHAIN)
    assert code == 1 and "recorder: not starting" in text, text
    (kw,) = _Recorder.calls
    assert (kw["qemu_mode"], kw["qemu_accel"], kw["qemu_gpus"]) == (mode, "kvm", ("0000:18:00.0",))
    assert kw["kms_urls"] == (U1,)


@pytest.mark.parametrize("mode", ["tdx", "sev-snp"])
def test_with_an_external_kms_the_host_check_still_names_what_is_missing(
    up: Any, mode: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_sys, fake_dev = tmp_path / "sys", tmp_path / "dev"
    fake_dev.mkdir()  # no /dev/kvm either
    monkeypatch.setattr(
        qemu_mod, "tee_host_missing", lambda m: tee_host_missing(m, sysfs=fake_sys, dev=fake_dev)
    )
    code, text = up("--backend", "qemu", "--qemu-mode", mode, "--kms-url", U1, "--kms-chain", CHAIN)
    assert code == 1, text
    assert f"--qemu-mode {mode} needs a {mode} host" in text and "/kvm" in text, text
    assert _Recorder.calls == []


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"kms_urls": (U1,)}, "needs the chain it trusts"),
        ({"kms_urls": (U1,), "kms_chain": CHAIN, "kms_nodes": 3, "kms_threshold": 2}, "starts no KMS"),
        ({"kms_urls": (U1,), "kms_chain": CHAIN, "chain_port": 8545}, "starts no KMS and no chain"),
        ({"kms_urls": (U1,), "kms_chain": CHAIN, "kms_require_app_compose": True}, "external KMS's own"),
        ({"kms_chain": CHAIN}, "go with --kms-url"),
        ({"kms_urls": ("https://127.0.0.1:1/x",), "kms_chain": CHAIN}, "no path"),
    ],
)
def test_local_cloud_refuses_the_same_mistakes(tmp_path: Path, kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(NodeError, match=needle):
        devstack.LocalCloud(tmp_path / "home", **kw)


# --- the KMS's chain: contracts adopted only when they are there (an embedded chain served here) ---


@pytest.fixture(scope="module")
def served_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from teecloud.chain.client import ChainClient, HttpTransport
    from teecloud.chain.embedded import DEV_KEYS, EmbeddedChain
    from teecloud.chain.rpcserver import ChainRpcServer

    home = tmp_path_factory.mktemp("kms-chain-home")
    chain = EmbeddedChain(home / "chain")
    rpc = ChainRpcServer(chain, port=0).start()
    try:
        ChainClient(HttpTransport(rpc.url), DEV_KEYS[0], home=home).deploy()
        yield rpc.url, home / "chain" / "deployment.json"
    finally:
        rpc.stop()
        chain.close()


def test_the_kms_chains_contracts_are_adopted_after_a_code_check(
    served_chain: tuple[str, Path], tmp_path: Path
) -> None:
    url, record = served_chain
    cloud = devstack.LocalCloud(tmp_path / "a", kms_urls=(U1,), kms_chain=url)
    with pytest.raises(NodeError, match=r"are not recorded in .*pass --kms-contracts"):
        cloud._external_chain()  # nothing recorded, and nothing deployed anew
    assert not (tmp_path / "a" / "chain" / "deployment.json").exists()
    # an address without code (another chain's record, or a typo) is refused, nothing recorded
    entry = next(iter(json.loads(record.read_text()).values()))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**entry, "KmsGroup": "0x" + "11" * 20}))
    cloud = devstack.LocalCloud(tmp_path / "b", kms_urls=(U1,), kms_chain=url, kms_contracts=bad)
    with pytest.raises(NodeError, match="no contract at KmsGroup"):
        cloud._external_chain()
    assert not (tmp_path / "b" / "chain" / "deployment.json").exists()
    bad.write_text(json.dumps({**entry, "KmsAuth": "not-an-address"}))
    with pytest.raises(NodeError, match="KmsAuth is not a 0x-address"):
        cloud._external_chain()
    bad.write_text("[1, 2")
    with pytest.raises(NodeError, match="unreadable"):
        cloud._external_chain()
    # the operator's record (whole file, or its one entry) is adopted: the same addresses
    for source in (record, tmp_path / "entry.json"):
        (tmp_path / "entry.json").write_text(json.dumps(entry))
        home = tmp_path / f"ok-{source.name}"
        cloud = devstack.LocalCloud(home, kms_urls=(U1,), kms_chain=url, kms_contracts=source)
        chain, contracts = cloud._external_chain()
        assert {k: contracts[k] for k in devstack.DEPLOYMENT_NAMES} == {
            k: entry[k] for k in devstack.DEPLOYMENT_NAMES
        }
        assert chain.kms_auth == entry["KmsAuth"]


def test_an_unreachable_kms_chain_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cloud = devstack.LocalCloud(tmp_path / "h", kms_urls=(U1,), kms_chain=dead)
    with pytest.raises(NodeError, match="not a reachable JSON-RPC chain"):
        cloud._external_chain()


# --- against the threshold nodes of another LocalCloud (Docker, under the e2e lock) ---

SECRET = "kms-url-secret-" + hashlib.sha256(b"teecloud up --kms-url").hexdigest()[:16]


@pytest.fixture(scope="module")
def kms_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Another local cloud whose 3 threshold KMS nodes (t=2) the tests use as the external KMS."""
    missing = devstack.check_prerequisites()
    if missing:
        _fail_or_skip("; ".join(missing))
    c = devstack.LocalCloud(tmp_path_factory.mktemp("kms-url-a"), kms_nodes=3, kms_threshold=2)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _external(kms_cloud: Any, home: Path, urls: tuple[str, ...], *, same_platform: bool = True) -> Any:
    """A LocalCloud on kms_cloud's nodes and chain. same_platform: this home shares kms_cloud's simulated
    TEE (its dev root: what the KMS verifies CVM quotes under, and this side the KMS's); without it, the
    KMS's evidence is under a root this side does not trust."""
    if same_platform:
        shutil.copytree(Path(kms_cloud.home) / "simulated-tee", home / "simulated-tee")
    return devstack.LocalCloud(
        home,
        kms_urls=urls,
        kms_chain=kms_cloud.endpoints.chain_rpc,
        kms_contracts=Path(kms_cloud.home) / "chain" / "deployment.json",
    )


def _node_urls(kms_cloud: Any) -> tuple[str, ...]:
    return tuple(u for _i, u in sorted(kms_cloud.key_provider.group.nodes.items()))


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(900)
def test_up_with_a_threshold_groups_urls_deploys_with_env(
    hello_image: str, kms_cloud: Any, tmp_path: Path
) -> None:
    from teecloud.cloud.deploy import Session
    from teecloud.kms.threshold_client import ThresholdKeyProvider

    theirs = kms_cloud.key_provider
    cloud = _external(kms_cloud, tmp_path / "b", _node_urls(kms_cloud))
    cloud.start()
    try:
        ours = cloud.key_provider
        assert isinstance(ours, ThresholdKeyProvider)
        # the group is the chain's: the same epoch, t, commitments and signing key the other cloud trusts
        assert (ours.group.epoch, ours.group.t, ours.group.commitments, ours.group.signing_key) == (
            theirs.group.epoch,
            theirs.group.t,
            theirs.group.commitments,
            theirs.group.signing_key,
        )
        assert cloud.kms_processes == {} and cloud.endpoints is not None
        assert cloud.endpoints.chain_rpc == kms_cloud.endpoints.chain_rpc
        assert cloud.endpoints.kms == _node_urls(kms_cloud)[0] and cloud.endpoints.kms_admin == ""
        # no KMS of its own: only the chain's group record, for this installation's clients (deploy)
        assert not (tmp_path / "b" / "kms").exists()
        assert [p.name for p in (tmp_path / "b" / "kms-nodes").iterdir()] == ["group.json"]
        session = Session(cloud.home)
        try:
            r = deploy_hello_with_secret(session, "hello-kms-url", SECRET)
            assert cloud.node.remove(r.instance_id).leftovers == []
        finally:
            session.close()
    finally:
        cloud.stop()


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(600)
def test_what_the_chain_does_not_vouch_for_is_refused_before_use(kms_cloud: Any, tmp_path: Path) -> None:
    urls = _node_urls(kms_cloud)
    # a subset of the group's nodes is no committee KmsGroup records
    with pytest.raises(NodeError, match="no serving committee at exactly these 2 URLs"):
        _external(kms_cloud, tmp_path / "sub", urls[:2]).start(check=False)
    # one node of a group alone is not a KMS
    with pytest.raises(NodeError, match="is a node of the threshold group of root epoch"):
        _external(kms_cloud, tmp_path / "one", urls[:1]).start(check=False)
    # nodes whose evidence this side cannot verify (another dev root): fewer than t pass, nothing runs
    home = tmp_path / "other-root"
    with pytest.raises(NodeError, match="fewer than t=2 of the 3 KMS nodes passed their check on chain"):
        _external(kms_cloud, home, urls, same_platform=False).start(check=False)
    assert not (home / "cloud" / "endpoints.json").exists()


@pytest.fixture(scope="module")
def single_kms_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Another local cloud whose one KMS (its RA-TLS listener) the test uses as the external KMS."""
    missing = devstack.check_prerequisites()
    if missing:
        _fail_or_skip("; ".join(missing))
    c = devstack.LocalCloud(tmp_path_factory.mktemp("kms-url-single"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(900)
def test_up_with_one_kms_url_deploys_with_env(
    hello_image: str, single_kms_cloud: Any, tmp_path: Path
) -> None:
    from teecloud.cloud.deploy import Session
    from teecloud.kms.client import KmsClient

    url = single_kms_cloud.endpoints.kms.rstrip("/")
    cloud = _external(single_kms_cloud, tmp_path / "b", (url,))
    cloud.start()
    try:
        # the KMS the other cloud runs, checked on chain: its root key, no group record here
        assert isinstance(cloud.key_provider, KmsClient)
        assert cloud.key_provider.info() == single_kms_cloud.key_provider.info()
        assert not (tmp_path / "b" / "kms-nodes" / "group.json").exists()
        session = Session(cloud.home)
        try:
            r = deploy_hello_with_secret(session, "hello-kms-url-1", SECRET)
            assert cloud.node.remove(r.instance_id).leftovers == []
        finally:
            session.close()
    finally:
        cloud.stop()


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.timeout(600)
def test_a_kms_its_chain_does_not_allow_is_refused_before_use(
    single_kms_cloud: Any, served_chain: tuple[str, Path], tmp_path: Path
) -> None:
    """The other cloud's KMS (its evidence verifies: the same simulated platform) named on a chain whose
    KmsAuth never allowed it: KmsAuth.isKmsAllowed says no, so the cloud refuses it and nothing runs."""
    rpc_url, record = served_chain
    home = tmp_path / "c"
    shutil.copytree(Path(single_kms_cloud.home) / "simulated-tee", home / "simulated-tee")
    url = single_kms_cloud.endpoints.kms.rstrip("/")
    cloud = devstack.LocalCloud(home, kms_urls=(url,), kms_chain=rpc_url, kms_contracts=record)
    with pytest.raises(NodeError, match="did not pass its check on chain") as exc:
        cloud.start(check=False)
    assert "KmsAuth refuses this KMS" in str(exc.value), exc.value  # the chain step, not the evidence
    assert cloud.node is None and not (home / "cloud" / "endpoints.json").exists()
