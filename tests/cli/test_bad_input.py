"""Every CLI command, with missing, malformed and hostile arguments: each answer is a message a user can act
on. Fails on any traceback (an exception escaping a command), any host path (this checkout, the Python
installation) in the output, or a non-zero exit without a message. No cloud runs: commands that need one
must say so. Commands that serve until interrupted (`up`, `chain up`, `kms up`, `agent simulate`,
`fn serve`, `gateway up`), those that fetch from the network (`trust fetch`, `kms onboard`) and `image build`
(minutes) get only their argument parsing checked."""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.testing
from typer.testing import CliRunner

from teecloud.cli import app

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = ["", "my app", "ÄPP", "../etc", "x" * 300, "-1", "0x" + "zz" * 20, "\u202e\u0000", "9" * 90]
OPTION_VALUES = ["", "x" * 300, "-1"]
SERVES = {
    ("up",),
    ("chain", "up"),
    ("kms", "up"),
    ("fn", "serve"),
    ("gateway", "up"),
    ("agent", "simulate"),
    ("trust", "fetch"),
    ("kms", "onboard"),
    ("image", "build"),  # builds a guest image (minutes): tests/image/test_build.py
}


def _leaves() -> Iterator[tuple[tuple[str, ...], Any]]:
    def walk(c: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
        subs = getattr(c, "commands", None)
        if subs:
            for name, sub in sorted(subs.items()):
                yield from walk(sub, (*path, name))
        else:
            yield path, c

    yield from walk(typer.main.get_command(app), ())


def _cases() -> list[tuple[str, tuple[str, ...]]]:
    cases: list[tuple[str, list[str]]] = []
    for path, cmd in _leaves():
        args = [p for p in cmd.params if type(p).__name__.endswith("Argument")]
        opts = [p for p in cmd.params if type(p).__name__.endswith("Option") and not p.is_flag]
        label = " ".join(path)
        if path in SERVES:  # never started here: only a parse error
            cases.append((label, [*path, "--no-such-option"]))
            continue
        cases.append((label, list(path)))  # missing arguments
        for value in HOSTILE:
            cases.append((label, [*path, *[value] * len(args)]))
        base = [*path, *["nosuchapp"] * len(args)]
        for opt in opts:
            for value in OPTION_VALUES:
                cases.append((label, [*base, opt.opts[0], value]))
    # a command without arguments gets the same argv for "missing" and for every hostile value: run it once
    # (`image acpi` boots a TCG guest per run)
    return list(dict.fromkeys((label, tuple(argv)) for label, argv in cases).keys())


CASES = [(label, list(argv)) for label, argv in _cases()]
# The click command tree, built once: typer's CliRunner rebuilds it on every invoke (evaluating every
# command's signature, about 50 ms), a minute over this file's thousand cases.
COMMAND = typer.main.get_command(app)
HOST_PATHS = [str(ROOT), sysconfig.get_paths()["purelib"], sys.prefix, "/var/lib/docker", "site-packages"]


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    work = tmp_path / "cwd" / "inner"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # relative hostile paths ("../etc") stay under tmp_path
    monkeypatch.delenv("TEECLOUD_RPC_URL", raising=False)
    monkeypatch.delenv("TEECLOUD_CHAIN_KEY", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    build = typer.testing._get_command  # type: ignore[attr-defined]  # if typer renames it: drop the shortcut
    monkeypatch.setattr(typer.testing, "_get_command", lambda a: COMMAND if a is app else build(a))
    return CliRunner()


def _check(runner: CliRunner, argv: list[str]) -> str | None:
    result = runner.invoke(app, argv, catch_exceptions=True)
    text = (result.stdout or "") + (result.stderr or "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"{type(result.exception).__name__}: {result.exception!r:.300}"
    if "Traceback" in text:
        return "traceback in the output"
    for p in HOST_PATHS:
        if p and p != "/" and p in text:
            return f"host path {p} in the output: {text[:300]!r}"
    if result.exit_code != 0 and not text.strip():
        return f"exit {result.exit_code} without a message"
    return None


LABELS = sorted({label for label, _ in CASES})
SLOW = {"image acpi", "chain deploy"}  # a TCG boot of the ACPI dumper; an embedded chain per deploy


def test_the_walk_finds_the_whole_command_tree() -> None:
    assert len(LABELS) >= 50
    assert {"deploy", "verify", "kms rotate", "fn deploy", "gateway up"} <= set(LABELS)


@pytest.mark.parametrize(
    "label", [pytest.param(label, marks=[pytest.mark.slow] if label in SLOW else []) for label in LABELS]
)
def test_every_command_answers_bad_input_with_a_message(runner: CliRunner, label: str) -> None:
    cases = [argv for case_label, argv in CASES if case_label == label]
    problems = []
    for argv in cases:
        problem = _check(runner, argv)
        if problem:
            problems.append(
                f"teecloud {' '.join(a if len(a) < 40 else a[:20] + '...' for a in argv)}: {problem}"
            )
    assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} of {len(cases)} cases)"


def test_deploy_bad_names_say_what_is_allowed(runner: CliRunner, tmp_path: Path) -> None:
    compose = tmp_path / "docker-compose.yml"
    compose.write_text("services:\n  web:\n    image: nginx\n")
    for name in ("my app", "ÄPP", "../etc", "a" * 100, "_x", "a\nb"):
        r = runner.invoke(app, ["deploy", str(compose), "--name", name])
        assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit))
        assert "is not a valid app name" in r.stderr and "ASCII letters, digits" in r.stderr, r.stderr
    spaced = tmp_path / "my shop"
    spaced.mkdir()
    (spaced / "docker-compose.yml").write_text(compose.read_text())
    r = runner.invoke(app, ["deploy", "--dry-run", str(spaced / "docker-compose.yml")])
    assert r.exit_code == 1 and "pass --name NAME" in r.stderr, r.stderr
    ok = runner.invoke(app, ["deploy", "--dry-run", str(spaced / "docker-compose.yml"), "--name", "shop"])
    assert ok.exit_code == 0 and "compose_hash: 0x" in ok.stdout, ok.output


def test_compose_typos_are_refused_before_anything(runner: CliRunner, tmp_path: Path) -> None:
    typo = tmp_path / "docker-compose.yml"
    typo.write_text("services:\n  web:\n    image: nginx\n    enviroment:\n      A: b\n")
    for argv in (["deploy", str(typo), "--name", "a"], ["compose-hash", str(typo)]):
        r = runner.invoke(app, argv)
        assert r.exit_code == 2 and "'enviroment' is not allowed" in r.stderr, r.stderr
    # no cloud was contacted: the deploy failed on the file, not on the missing `teecloud up`
    assert "teecloud up" not in runner.invoke(app, ["deploy", str(typo), "--name", "a"]).stderr


def test_rm_without_a_terminal_says_to_pass_yes(runner: CliRunner) -> None:
    r = runner.invoke(app, ["rm", "nosuchapp"])
    assert r.exit_code == 1 and r.stderr.strip()  # no cloud: says so, never a bare "Aborted!"


def test_logs_follow_merges_every_service(capsys: pytest.CaptureFixture[str]) -> None:
    """`logs -f` without -s: one stream per service, merged with a `service | ` prefix, until all end."""
    from types import SimpleNamespace

    from teecloud.cli.cloud_cmd import _follow_all

    asked: list[tuple[str | None, bool]] = []

    def logs(app: str, *, service: str | None, tail: int, follow: bool) -> Iterator[str]:
        asked.append((service, follow))
        yield from (f"{service} line {i}" for i in range(3))

    containers = [SimpleNamespace(service="web"), SimpleNamespace(service="api")]
    node = SimpleNamespace(
        get=lambda app: SimpleNamespace(name="shop", status="running", containers=containers), logs=logs
    )
    _follow_all(SimpleNamespace(node=node), "shop", 10)
    lines = capsys.readouterr().out.splitlines()
    assert sorted(asked) == [("api", True), ("web", True)]
    assert sorted(lines) == sorted(
        [f"api | api line {i}" for i in range(3)] + [f"web | web line {i}" for i in range(3)]
    )


@pytest.mark.parametrize("registry", [["--no-check-registry"], []])
def test_fn_serve_without_a_guest_agent_says_so(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: list[str]
) -> None:
    """Outside a CVM there is no /var/run/dstack.sock: a message naming the socket and what to do, exit 2,
    before any chain is contacted or any port bound (the dstack SDK raises FileNotFoundError)."""
    monkeypatch.delenv("DSTACK_SIMULATOR_ENDPOINT", raising=False)
    missing = tmp_path / "no-agent" / "dstack.sock"
    r = runner.invoke(app, ["fn", "serve", *registry, "--port", "0", "--dstack-sock", str(missing)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2, r.output
    assert f"cannot reach the guest agent at {missing} (no such socket)" in r.stderr
    assert "--dstack-sock" in r.stderr and "Traceback" not in r.output
    assert "listening" not in r.stdout
