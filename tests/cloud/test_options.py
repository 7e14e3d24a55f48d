"""cloud.options: names, env vars and allowed envs are checked once for deploy and upgrade; allowed envs are
merged (replaced only on request) and every variable the CVM will drop is named in a warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teecloud.cloud.errors import ComposeRefused, InvalidOption
from teecloud.cloud.options import (
    MAX_ENV_VARS,
    AppOptions,
    default_name,
    parse_env_file,
    plan_compose,
    resolve_allowed_envs,
    validate_name,
)

COMPOSE = "services:\n  web:\n    image: nginx\n"


@pytest.mark.parametrize("name", ["my app", "ÄPP", "../etc", "a" * 65, "", "_x", ".hidden", "a\nb", "a/b"])
def test_bad_names_say_what_is_allowed(name: str) -> None:
    with pytest.raises(InvalidOption, match="ASCII letters, digits"):
        validate_name(name)


@pytest.mark.parametrize("name", ["shop", "a", "A-1_b.c", "a" * 64])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


def test_default_name_from_a_folder_with_a_space(tmp_path: Path) -> None:
    d = tmp_path / "my shop"
    d.mkdir()
    with pytest.raises(InvalidOption, match="pass --name NAME"):
        default_name(d / "docker-compose.yml")


def test_env_items_and_file(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("# comment\nexport A=1\nB='two words'\n\nC=\"x=y\"\n")
    assert parse_env_file(f) == {"A": "1", "B": "two words", "C": "x=y"}
    f.write_text("A=1\nnot a line\n")
    with pytest.raises(InvalidOption, match=r":2: expected KEY=VALUE"):
        parse_env_file(f)
    with pytest.raises(InvalidOption, match="expects KEY=VALUE"):
        AppOptions.build(env=["NOEQUALS"])
    with pytest.raises(InvalidOption, match="not an env var name"):
        AppOptions.build(env=["1A=x"])
    with pytest.raises(InvalidOption, match=f"at most {MAX_ENV_VARS}"):
        AppOptions.build(env=[f"K{i}=v" for i in range(MAX_ENV_VARS + 1)])
    with pytest.raises(InvalidOption, match="needs the new list"):
        AppOptions.build(replace_allowed_envs=True)


def test_allowed_envs_are_merged_on_deploy_and_upgrade() -> None:
    deploy = AppOptions.build(env=["A=1", "B=2"])
    assert resolve_allowed_envs(deploy, None) == (["A", "B"], [])  # no list given: the env's names
    explicit = AppOptions.build(env=["A=1", "B=2"], allowed_envs=["A", "C"])
    allowed, warnings = resolve_allowed_envs(explicit, None)  # an explicit list is the list; B is dropped
    assert allowed == ["A", "C"] and warnings == ["env var B is not in allowed_envs: the CVM will drop it"]
    # upgrade with --allowed-env X keeps the app's other names (the issue: it silently dropped them)
    up = AppOptions.build(allowed_envs=["X"])
    assert resolve_allowed_envs(up, ["A", "B"]) == (["A", "B", "X"], [])


def test_replacing_warns_for_every_dropped_variable() -> None:
    up = AppOptions.build(allowed_envs=["X"], replace_allowed_envs=True, env=["X=1", "Y=2"])
    allowed, warnings = resolve_allowed_envs(up, ["A", "B"])
    assert allowed == ["X"]
    text = "\n".join(warnings)
    for name in ("A", "B", "Y"):
        assert f"{name} " in text, text
    assert len(warnings) == 3


def test_a_new_env_replaces_the_old_one_and_says_what_is_lost() -> None:
    up = AppOptions.build(env=["A=new"])
    allowed, warnings = resolve_allowed_envs(up, ["A", "B"])
    assert allowed == ["A", "B"]
    assert len(warnings) == 1 and "B is not in the env given" in warnings[0]
    # no env given: the current encrypted env is kept, nothing to warn about
    assert resolve_allowed_envs(AppOptions.build(), ["A", "B"]) == (["A", "B"], [])


def test_plan_is_the_exact_app_compose_and_hash(tmp_path: Path) -> None:
    from teecloud.appcompose import compose_hash

    p = tmp_path / "shop" / "docker-compose.yml"
    p.parent.mkdir()
    p.write_text(COMPOSE)
    plan = plan_compose(p, AppOptions.build(env=["DB=x"]))
    doc = json.loads(plan.app_compose)
    assert doc["name"] == "shop" and doc["allowed_envs"] == ["DB"] and doc["docker_compose_file"] == COMPOSE
    assert plan.compose_hash == compose_hash(doc)
    assert "x" not in json.dumps(doc["allowed_envs"])  # names only, never values
    # on upgrade, public_logs and allowed_envs come from the current version unless given
    again = plan_compose(
        p, AppOptions.build(), name="shop", previous={"allowed_envs": ["DB", "K"], "public_logs": True}
    )
    assert json.loads(again.app_compose)["allowed_envs"] == ["DB", "K"]
    assert json.loads(again.app_compose)["public_logs"] is True


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("services:\n  web:\n    image: x\n    enviroment:\n      A: b\n", "'enviroment' is not allowed"),
        ("services:\n  web:\n    image: x\n    privileged: true\n", "privileged"),
        ("{{{", "not valid YAML"),
    ],
)
def test_the_whole_compose_policy_runs_before_anything(tmp_path: Path, text: str, reason: str) -> None:
    p = tmp_path / "a" / "docker-compose.yml"
    p.parent.mkdir()
    p.write_text(text)
    with pytest.raises(ComposeRefused, match=reason):
        plan_compose(p, AppOptions.build())


def test_unreadable_compose(tmp_path: Path) -> None:
    with pytest.raises(ComposeRefused, match="is a directory"):
        plan_compose(tmp_path, AppOptions.build(), name="a")
    (tmp_path / "bin.yml").write_bytes(b"\xff\xfe")
    with pytest.raises(ComposeRefused, match="not UTF-8"):
        plan_compose(tmp_path / "bin.yml", AppOptions.build(), name="a")
