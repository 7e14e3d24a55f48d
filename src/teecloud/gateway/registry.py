"""Registered instances and the routes they give: the gateway's `RouteSource`.

A registration lasts `ttl_s` seconds; a CVM re-registers well before (every ttl_s / 3). An instance that
stops re-registering loses its routes when its registration expires (the gateway sweeps once a second); one
whose re-registration is refused (its compose hash removed on chain, the instance retired) loses them at
that refusal. Bounded: at most `max_instances` registrations (a new one beyond it is refused).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from teecloud.gateway.errors import RegistrationRefused
from teecloud.gateway.routing import Route

__all__ = ["Registration", "Registry", "RouteSource"]


class RouteSource(Protocol):
    """Where a gateway learns the reachable address of every instance's ports."""

    def routes(self, now: float) -> list[Route]: ...


@dataclass(frozen=True)
class Registration:
    app_id: str
    instance_id: str
    compose_hash: str
    routes: tuple[Route, ...]
    expires_at: float


class Registry:
    def __init__(self, *, ttl_s: float = 90.0, max_instances: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.max_instances = max_instances
        self._by_instance: dict[str, Registration] = {}
        self._draining: set[str] = set()  # backend hosts whose instances get no new traffic
        self._lock = threading.Lock()
        self.version = 0  # bumps on every change that alters routes

    def register(
        self, app_id: str, instance_id: str, compose_hash: str, routes: Sequence[Route], *, now: float
    ) -> Registration:
        reg = Registration(app_id, instance_id, compose_hash, tuple(sorted(routes)), now + self.ttl_s)
        with self._lock:
            old = self._by_instance.get(instance_id)
            if old is None and len(self._by_instance) >= self.max_instances:
                raise RegistrationRefused(
                    f"the gateway holds {self.max_instances} instances, its limit", step="capacity"
                )
            self._by_instance[instance_id] = reg
            if old is None or old.routes != reg.routes:
                self.version += 1
        return reg

    def remove(self, instance_id: str) -> bool:
        with self._lock:
            gone = self._by_instance.pop(instance_id, None) is not None
            if gone:
                self.version += 1
            return gone

    def sweep(self, now: float) -> list[str]:
        """Drop expired registrations; returns their instance ids."""
        with self._lock:
            dead = [i for i, r in self._by_instance.items() if r.expires_at <= now]
            for i in dead:
                del self._by_instance[i]
            if dead:
                self.version += 1
            return dead

    def drain(self, host: str) -> None:
        with self._lock:
            self._draining.add(host)
            self.version += 1

    def undrain(self, host: str) -> None:
        with self._lock:
            self._draining.discard(host)
            self.version += 1

    @property
    def draining(self) -> list[str]:
        with self._lock:
            return sorted(self._draining)

    def registrations(self) -> list[Registration]:
        with self._lock:
            return list(self._by_instance.values())

    def routes(self, now: float) -> list[Route]:
        with self._lock:
            return sorted(
                r
                for reg in self._by_instance.values()
                if reg.expires_at > now
                for r in reg.routes
                if r.address.rpartition(":")[0].strip("[]") not in self._draining
            )
