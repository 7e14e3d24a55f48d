"""Shared machinery of the robustness suite: schemathesis-generated requests and a hand-written matrix of
hostile variants, sent in-process to an ASGI app, with the rules every teecloud HTTP service keeps:

    (1) no 5xx for any request (a client mistake is never the service's fault)
    (2) every 4xx body is a JSON object with a non-empty "error" string
    (3) a refused request changes nothing (`snapshot()` equal before and after)
    (4) the service keeps serving (checked by each test after the run)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

Snapshot = Callable[[], Any]


def has_error(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("error"), str) and bool(doc["error"])


def problem(
    method: str, url: str, body: Any, r: httpx.Response, *, shape: Callable[[Any], bool] = has_error
) -> str | None:
    """(1) and (2) for one response; None when it is fine."""
    if r.status_code >= 500:
        return f"{method} {url} {body!r:.200} -> {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        try:
            doc = r.json()
        except ValueError:
            return f"{method} {url} {body!r:.200} -> {r.status_code} non-JSON error body {r.text[:200]!r}"
        if not shape(doc):
            return (
                f"{method} {url} {body!r:.200} -> {r.status_code} error body without 'error': {r.text[:200]}"
            )
    return None


def run_schemathesis(
    app: Any,
    *,
    max_examples: int,
    headers: dict[str, str] | None = None,
    snapshot: Snapshot | None = None,
    shape: Callable[[Any], bool] = has_error,
) -> list[str]:
    """Positive and negative schemathesis cases for every operation of `app`'s OpenAPI schema."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=headers or {})
    problems: list[str] = []
    ops = [result.ok() for result in schema.get_all_operations()]
    assert ops, "the schema lists no operations"
    for op in ops:
        strategy = op.as_strategy(GenerationMode.POSITIVE) | op.as_strategy(GenerationMode.NEGATIVE)

        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def one(case: Any) -> None:
            before = snapshot() if snapshot else None
            r = case.call(headers=headers or {})
            issue = problem(case.method, case.formatted_path, case.body, r, shape=shape)
            if issue is None and snapshot is not None and r.status_code >= 400 and snapshot() != before:
                issue = f"{case.method} {case.formatted_path} {case.body!r:.200} refused but changed state"
            if issue is not None:
                problems.append(issue)

        one()
    return problems


# -- hand-written hostile variants -------------------------------------------------------------------------

HOSTILE_VALUES: list[Any] = [
    12345,
    -1,
    10**40,
    1.5,
    True,
    None,
    [],
    ["a", 1],
    {},
    {"nested": {"deep": [1]}},
    "",
    "zz",  # bad hex
    "0x",
    "0xZZ",
    "\ud800",  # lone surrogate (valid JSON escape, no UTF-8 form)
    "\x00",
    "é" * 65,  # above the X.509 CN bound
    "a:b",
    "../../etc/passwd",
    "x" * 100_000,  # a huge string
]

RAW_BODIES: list[bytes] = [
    b"",
    b"not json",
    b"\xff\xfe\x00",
    b"[" * 10_000 + b"]" * 10_000,  # deep nesting
    b'{"a":' * 200 + b"1" + b"}" * 200,
    b"[]",
    b'"a string"',
    b"null",
    b"1e400",
    b'{"x": NaN}',
    b'{"k": "\\ud800"}',
    b"{" + b'"k":"v",' * 1000 + b'"k":"v"}',
]


def request_models(app: Any) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, path template, JSON-schema properties of the body) for each operation of `app`."""
    spec = app.openapi()
    components = spec.get("components", {}).get("schemas", {})
    for path, item in spec["paths"].items():
        for method, op in item.items():
            schema = (
                op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            )
            if "$ref" in schema:
                schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
            yield method.upper(), path, dict(schema.get("properties", {}))


def hostile_requests(app: Any, fill_path: Callable[[str], str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Wrong types, huge strings, deep nesting, non-JSON, bad hex, unicode, missing and extra fields, and GET
    with query parameters, for every operation (path parameters filled in by `fill_path`)."""
    for method, template, props in request_models(app):
        path = fill_path(template)
        for raw in RAW_BODIES:
            yield method, path, {"content": raw, "headers": {"content-type": "application/json"}}
        yield method, path, {"json": {"unexpected_field": 1}}
        for name in props:
            for value in HOSTILE_VALUES:
                body = {name: value}
                yield (
                    method,
                    path,
                    {"content": json.dumps(body), "headers": {"content-type": "application/json"}},
                )
                if isinstance(value, str | int) and not isinstance(value, bool) and len(str(value)) < 1000:
                    # percent-encoded by hand: a lone surrogate becomes %ED%A0%80 (invalid UTF-8)
                    q = quote(str(value).encode("utf-8", "surrogatepass"))
                    yield "GET", f"{path}?{name}={q}&json", {}
        yield "GET", f"{path}?unknown=1&x=%00&%ff=%fe", {}
        yield "PUT", path, {"json": {}}


def run_hostile(
    client: TestClient,
    app: Any,
    fill_path: Callable[[str], str],
    *,
    headers: dict[str, str] | None = None,
    snapshot: Snapshot | None = None,
    only: Callable[[str, str], bool] = lambda method, path: True,
    shape: Callable[[Any], bool] = has_error,
) -> tuple[int, list[str]]:
    problems: list[str] = []
    n = 0
    for method, path, kw in hostile_requests(app, fill_path):
        if not only(method, path):
            continue
        kw = dict(kw)
        kw["headers"] = {**(headers or {}), **kw.get("headers", {})}
        before = snapshot() if snapshot else None
        r = client.request(method, path, **kw)
        n += 1
        body = kw.get("content", kw.get("json", kw.get("params")))
        issue = problem(method, path, body, r, shape=shape)
        if issue is None and snapshot is not None and r.status_code >= 400 and snapshot() != before:
            issue = f"{method} {path} {body!r:.200} refused but changed state"
        if issue is not None:
            problems.append(issue)
    return n, problems
