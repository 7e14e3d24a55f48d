"""Review 5, R4-1/R4-2's fix (9a20e9c): strict peer and round models. What is still lax: the share-index
KEYS of the admin round models (`broadcast`, `peers`) are free strings that the handlers read with int(),
so "01", " 1", "+1", "1_0" and non-ASCII digits name a member, and two spellings of one index collapse into
one entry (the last wins). Admin listener only (the token holder, who relays anyway: the relay is untrusted
and the view hash covers what the member parsed), so nothing is released; low."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from teecloud.kms import api

SESSION = "ab" * 16


def _view(keys: list[str]) -> dict[str, Any]:
    return {"session": SESSION, "stage": "deal", "broadcast": {k: [] for k in keys}}


def _open(keys: list[str]) -> dict[str, Any]:
    return {
        "session": SESSION,
        "kind": "presign",
        "count": 1,
        "participants": [1, 2, 3],
        "peers": {k: "https://127.0.0.1:1" for k in keys},
    }


def test_canonical_index_keys_are_read() -> None:
    api.RoundViewRequest.model_validate(_view(["1", "2", "3"]))
    api.RoundOpenRequest.model_validate(_open(["2", "3"]))


def test_the_strict_fields_of_the_fix_hold() -> None:
    """R4-1/R4-2 as fixed: non-hex or upper-case sessions, unknown fields, string integers are refused."""
    for bad in ({"session": "AB" * 16}, {"session": "zz" * 16}, {"extra": 1}, {"count": "1"}):
        with pytest.raises(ValidationError):
            api.RoundOpenRequest.model_validate({**_open(["2", "3"]), **bad})


@pytest.mark.parametrize("key", ["01", " 1", "+1", "1_0", "\u0661"])
def test_non_canonical_share_index_keys_are_refused(key: str) -> None:
    """Safe: a key that is not the canonical decimal of 1..64 is a 400 (as every other field now)."""
    assert int(key) in range(1, 65)  # what the handlers read it as (threshold_net: int(i))
    for model, doc in ((api.RoundViewRequest, _view([key])), (api.RoundOpenRequest, _open([key]))):
        with pytest.raises(ValidationError):
            model.model_validate(doc)
