"""The independent review's finding 1 on the F10 fix (issue 16): a volume named "." (the Compose
Specification's name pattern allows it) mapped to `<mount>/volumes/.`, the directory holding every named
volume's backing directory. A service mounting it swapped another volume's directory for a symlink to a host
path, which dockerd followed on the host at that volume's next mount (host `/dev/shm`: other CVMs' env files
and agent sockets; `/`: the host's root filesystem). Names are now plain path components, and the backing
directories are created only through symlink-free paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from teecloud.node.compose import check_isolation, load_compose
from teecloud.node.errors import ComposeRejected

DOT_VOLUME = """
services:
  a:
    image: x
    volumes:
      - {type: volume, source: ".", target: /vols}
  b:
    image: x
    volumes:
      - data:/data
volumes:
  ".": {}
  data: {}
"""


def test_finding1_a_volume_named_dot_is_refused_by_the_compose_policy() -> None:
    with pytest.raises(ComposeRejected, match=r"invalid volume name '\.'"):
        check_isolation(load_compose(DOT_VOLUME))


@pytest.mark.parametrize("name", [".", "..", ".hidden", "-x", "_x", "a\n", "a/b", ""])
def test_definition_names_are_plain_path_components(name: str) -> None:
    compose = {"services": {"a": {"image": "x"}}, "volumes": {name: {}}}
    with pytest.raises(ComposeRejected, match="invalid volume name"):
        check_isolation(compose)


def test_volume_dirs_refuse_symlinks_and_odd_paths(tmp_path: Path) -> None:
    """Defence in depth behind the name rule: the backing directories the runtime mounts (and dockerd
    follows on the host at every container start) are created only through plain, symlink-free paths."""
    from teecloud.agent.errors import StorageError
    from teecloud.agent.storage import EncryptedVolume

    mount = tmp_path / "mnt"
    (mount / "volumes").mkdir(parents=True)
    (mount / "volumes" / "data").symlink_to("/etc")
    vol = EncryptedVolume(tmp_path / "cipher", mount)
    with pytest.raises(StorageError, match="symbolic link"):
        vol.ensure_dirs(["volumes/data"])
    for rel in ["volumes/.", "volumes/../x", "/etc", "", "volumes//x/../y"]:
        with pytest.raises(StorageError):
            vol.ensure_dirs([rel])
    vol.ensure_dirs(["volumes/ok", "anon/web/0123"])
    assert (mount / "volumes" / "ok").is_dir() and not (mount / "volumes" / "ok").is_symlink()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pid", " host"),
        ("pid", "HOST"),
        ("ipc", "Host"),
        ("cgroup", "host "),
        ("pid", "container:other-app_web_1"),
        ("ipc", "service:nosuch"),
        ("links", ["tc-other_web_1:web"]),
    ],
)
def test_namespace_values_are_an_allowlist(key: str, value: object) -> None:
    """The review's finding 3: spellings of `host` that the old denylist missed."""
    compose = {"services": {"a": {"image": "x", key: value}, "b": {"image": "x"}}}
    with pytest.raises(ComposeRejected):
        check_isolation(compose)


@pytest.mark.parametrize(
    ("key", "value"), [("pid", "service:b"), ("ipc", "private"), ("cgroup", "private"), ("links", ["b:db"])]
)
def test_namespace_values_inside_the_app_are_accepted(key: str, value: object) -> None:
    check_isolation({"services": {"a": {"image": "x", key: value}, "b": {"image": "x"}}})
