"""`teecloud kms threshold-init` (issue 19): the development key ceremony's CLI. Node processes, the
networked DKG between processes and two of five killed: tests/kms/test_threshold_net_up.py."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from teecloud.cli import app as cli
from teecloud.kms.threshold import read_group


def test_threshold_init_is_idempotent_and_refuses_another_shape(teecloud_home: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["kms", "threshold-init", "--nodes", "5", "--threshold", "3", "--dev"])
    assert res.exit_code == 0, res.output
    group = read_group(teecloud_home)
    assert group is not None and (group.t, group.n) == (3, 5)
    again = runner.invoke(cli, ["kms", "threshold-init", "--nodes", "5", "--threshold", "3", "--dev"])
    assert again.exit_code == 0 and "already exists" in again.output
    assert read_group(teecloud_home) == group  # nothing re-dealt
    changed = runner.invoke(cli, ["kms", "threshold-init", "--nodes", "7", "--threshold", "4", "--dev"])
    assert changed.exit_code != 0 and "reshare" in changed.output
    no_dev = runner.invoke(cli, ["kms", "threshold-init", "--nodes", "5", "--threshold", "3"])
    assert no_dev.exit_code != 0 and "networked" in no_dev.output
    bad = runner.invoke(cli, ["kms", "up", "--dev", "--dealer"])
    assert bad.exit_code != 0 and "--threshold-node" in bad.output
