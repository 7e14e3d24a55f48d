"""The local cloud's registrar: for the `docker` runtime, where a "CVM" boots inside the node process, the
node registers its running instances with the gateway on their behalf, with each instance's own
registration key and boot-time certificate (made at its boot by `RegisteringAtBoot`) and its published
ports. On a real CVM the guest runs `teecloud.gateway.client.Registrar` itself. Every `interval_s`; every
0.25 s while an instance that booted (its certificate was issued) is not registered yet, so a deploy
waits for its route well under a second.

    NodeRegistrar(gateway_urls, ca_pem, boots, running, app_compose=...).start()
        running() -> [(instance_id hex, [(app port, host ip, host port), ...]), ...]   (from the node API)
        app_compose(instance_id hex) -> its app-compose.json text, sent so the gateway applies its port
                                        policy (None: no policy sent)
        vouch(instance_id hex, endpoints) -> the node's signed statement of those endpoints (a
                                        teecloud.node.vouch.NodeVoucher's), sent with each registration
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from teecloud.gateway import api
from teecloud.gateway.client import RegisteringAtBoot, register
from teecloud.gateway.errors import GatewayError

__all__ = ["NodeRegistrar", "RunningInstance"]

log = logging.getLogger("teecloud.gateway")

RunningInstance = tuple[str, list[tuple[int, str, int]]]


class NodeRegistrar:
    def __init__(
        self,
        gateway_urls: Sequence[str],
        ca_pem: str,
        boots: RegisteringAtBoot,
        running: Callable[[], list[RunningInstance]],
        *,
        interval_s: float = 10.0,
        app_compose: Callable[[str], str | None] | None = None,
        vouch: Callable[[str, list[tuple[int, str, int]]], dict[str, Any]] | None = None,
    ) -> None:
        self.vouch = vouch
        # instance_id hex -> its app-compose.json text (the gateway applies its port policy), or None
        self.app_compose = app_compose
        self.gateway_urls = list(gateway_urls)
        self.ca_pem = ca_pem
        self.boots = boots
        self.running = running
        self.interval_s = interval_s
        self.failures = 0
        self.fast_interval_s = 0.25  # while a booted instance is not registered yet (a deploy waits on it)
        self._registered: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def register_all(self) -> int:
        """One round; returns how many registrations succeeded."""
        ok = 0
        try:
            instances = self.running()
        except Exception as exc:  # the node API may be busy or restarting: next round
            log.warning("cannot list running instances: %s", exc)
            return 0
        for instance_id, ports in instances:
            try:
                issued = self.boots.issued.get(bytes.fromhex(instance_id))
            except ValueError:
                continue
            endpoints = [
                api.Endpoint(port=p, host=h or "127.0.0.1", host_port=hp)
                for p, h, hp in ports[: api.MAX_ENDPOINTS]
            ]
            if issued is None or not endpoints:
                continue  # booted before this process made certificates, or nothing published
            done = 0
            try:
                compose = self.app_compose(instance_id) if self.app_compose is not None else None
            except (OSError, ValueError) as exc:  # its files are gone (it stopped): next round
                log.warning("cannot read the app-compose.json of %s: %s", instance_id[:12], exc)
                continue
            try:
                sent = [(e.port, e.host, e.host_port) for e in endpoints]
                vouch = api.NodeVouch.model_validate(self.vouch(instance_id, sent)) if self.vouch else None
            except (OSError, ValueError) as exc:  # not launched by this node (or its files are gone)
                log.warning("no node statement for %s: %s", instance_id[:12], exc)
                continue
            for url in self.gateway_urls:
                try:
                    register(
                        url,
                        issued[0],
                        issued[1],
                        endpoints,
                        ca_pem=self.ca_pem,
                        app_compose=compose,
                        node_vouch=vouch,
                    )
                    ok += 1
                    done += 1
                except GatewayError as exc:
                    self.failures += 1
                    log.warning("registering %s with %s: %s", instance_id[:12], url, exc)
            if done:
                self._registered.add(instance_id)
        return ok

    def _pending(self) -> bool:
        """A certificate was issued (a boot) for an instance not registered yet."""
        issued = {i.hex() for i in list(self.boots.issued)}
        self._registered &= issued
        return bool(issued - self._registered)

    def poke(self) -> None:
        """Register now (a CVM just started)."""
        self._wake.set()

    def start(self) -> NodeRegistrar:
        self._thread = threading.Thread(target=self._loop, name="teecloud-node-registrar", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.register_all()
            self._wake.wait(self.fast_interval_s if self._pending() else self.interval_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
