"""One bounded GET for every collateral service (PCCS, AMD KDS): the body is read up to a limit and the
errors are mapped to this package's tree, so a hostile or broken server can neither exhaust memory nor leak
an httpx exception."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from teecloud.collateral.errors import CollateralNotFound, InvalidCollateral, PccsUnavailable

__all__ = ["bounded_get"]


def bounded_get(
    client: httpx.Client,
    url: str,
    *,
    name: str,
    base_url: str,
    path: str,
    max_bytes: int,
    params: Mapping[str, str] | None = None,
    not_found: str = "",
) -> httpx.Response:
    """GET `url`; a 200 answer with its body (at most `max_bytes`), else CollateralNotFound (404) or
    PccsUnavailable. `name` ("PCCS", "AMD KDS") and `base_url` name the server in messages; `not_found` is
    the 404 text."""
    service = f"{name} at {base_url}"
    try:
        with client.stream("GET", url, params=params) as resp:
            chunks: list[bytes] = []
            size = 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidCollateral(
                        f"{service.split(' at ')[0]} response from {url} is over {max_bytes} bytes"
                    )
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise PccsUnavailable(f"{service} is unreachable ({type(exc).__name__}: {exc})") from exc
    if resp.status_code == 404:
        raise CollateralNotFound(not_found or f"{service} has nothing at {path}")
    if resp.status_code != 200:
        raise PccsUnavailable(f"{service} answered HTTP {resp.status_code} for {path}")
    return httpx.Response(200, headers=resp.headers, content=b"".join(chunks))
