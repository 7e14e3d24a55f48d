"""Review 8, kept signatures (branch t19-cache): a repeat boot is one ThresholdEvaluate round, and the kept
app-key signature and app CA come inside that answer. Attack: the app's owner withdraws the app after its
first boot (removes its compose hash from AppAuth, or retires the instance), and the host boots the same
app again, hoping the nodes' kept copies (and partials) still come back on the short path. Held: every
node applies the whole rule first (the chain's verdict), refuses, and never reads its cache; the boot
gets no keys. The control: the same repeat boot before the withdrawal is one round with kept copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from teecloud.appcompose import compose_hash
from teecloud.kms import api
from teecloud.kms.errors import KmsClientError
from tests.kms.conftest import World
from tests.kms.test_threshold_nodes import HELLO, Cluster, boot_hello

pytestmark = pytest.mark.slow


def _decisions(cluster: Cluster, endpoint: str) -> dict[int, list[str]]:
    return {
        i: [r.decision for r in n.kms.audit.read() if r.endpoint == endpoint]
        for i, n in cluster.nodes.items()
    }


@pytest.mark.parametrize("withdraw", ["compose hash removed", "instance retired"])
def test_a_withdrawn_app_gets_neither_partials_nor_kept_signatures_on_a_repeat_boot(
    teecloud_home: Path, world: World, cluster: Cluster, withdraw: str
) -> None:
    app_id = world.register(compose_hash(HELLO))
    _, first = boot_hello(teecloud_home, world, cluster.provider(), app_id=app_id)
    second_provider = cluster.provider()
    _, second = boot_hello(teecloud_home, world, second_provider, app_id=app_id)
    assert second.instance_id == first.instance_id
    assert second.keys.k256_signature == first.keys.k256_signature  # the kept copy, checked by the CVM
    assert second_provider.faults == {}
    before = _decisions(cluster, api.PATH_THRESHOLD_EVALUATE)
    if withdraw == "compose hash removed":
        world.chain.remove_compose_hash(app_id, compose_hash(HELLO))
    else:
        world.chain.retire_instance(app_id, first.instance_id)
    reads: list[int] = []
    for i, node in cluster.nodes.items():
        cache = node.kms.service.app_signatures
        assert cache is not None
        real = cache.get
        cache.get = lambda e, a, real=real, i=i: (reads.append(i), real(e, a))[1]  # type: ignore[method-assign]
    third = cluster.provider()
    why = "compose hash not allowed" if withdraw == "compose hash removed" else "instance retired"
    with pytest.raises(KmsClientError, match=f"0 valid partial evaluations.*{why} \\(step chain\\)"):
        boot_hello(teecloud_home, world, third, app_id=app_id)
    after = _decisions(cluster, api.PATH_THRESHOLD_EVALUATE)
    new = {i: after[i][len(before[i]) :] for i in after}
    assert any(new.values()), new  # the nodes were asked
    assert all(d == "denied" for ds in new.values() for d in ds), new
    assert reads == []  # no node consulted what it keeps for a request its rule refused
