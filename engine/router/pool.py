"""EnginePool: the engines the router may use (discovered or added by hand), with a load-based pick and a
circuit breaker per engine. The router's own evidence counts as much as discovery: a connection failure
marks an engine down at once (the prober brings it back after a healthy /health, with exponential backoff
between probes), and an engine the control plane stops listing stays in use while its health checks pass
(an empty listing from a restarted Redis is a hiccup, not the truth)."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

ROLE_BY_NUMBER = {1: "hybrid", 2: "prefill", 3: "decode", 4: "encode"}  # DLRouter's /nodes/add (and 4: ours)
ROLES = ("hybrid", "prefill", "decode", "encode")  # encode: vision encoders (EPD)
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0


@dataclass
class Node:
    url: str
    role: str  # hybrid | prefill | decode | encode
    models: set[str] = field(default_factory=set)  # accepted `model` values (empty: any)
    source: str = "manual"  # manual | ctrl
    entity_id: str = ""  # its control-plane record (discovered nodes)
    inflight: int = 0  # requests this router has in flight there
    running: int = 0  # the engine's own count (all its clients), from its last /engine_info
    kv_usage: float = 0.0  # fraction of its KV pool in use, from its last /engine_info
    failures: int = 0
    down: bool = False  # circuit open: not picked until a probe of /health succeeds
    down_reason: str = ""
    down_since: float = 0.0
    next_probe: float = 0.0  # monotonic time of the next probe while down
    backoff_s: float = 0.0
    listed: bool = True  # in the control plane's latest listing (discovered nodes)
    unlisted_since: float = 0.0

    @property
    def load(self) -> tuple[int, float]:
        return max(self.inflight, self.running), self.kv_usage

    def serves(self, model: str | None) -> bool:
        return not self.models or model is None or model in self.models


class EnginePool:
    def __init__(self):
        self.nodes: dict[str, Node] = {}
        self._rr = itertools.count()

    def add(self, node: Node) -> None:
        old = self.nodes.get(node.url)
        if old is not None:  # the router's evidence about that address carries over
            node.inflight, node.running, node.kv_usage, node.failures = old.inflight, old.running, old.kv_usage, \
                old.failures
            node.down, node.down_reason, node.next_probe, node.backoff_s = old.down, old.down_reason, \
                old.next_probe, old.backoff_s
        self.nodes[node.url] = node

    def replace_discovered(self, nodes: list[Node]) -> None:
        """The control plane's listing: listed nodes are added or refreshed; discovered nodes it no longer
        lists stay, unlisted, until a health check of theirs fails (the router's prober) or they stay
        unlisted too long."""
        listed = {n.url for n in nodes}
        now = time.monotonic()
        for n in self.nodes.values():
            if n.source == "ctrl" and n.url not in listed and n.listed:
                n.listed, n.unlisted_since = False, now
        for n in nodes:
            self.add(n)

    def unlisted(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.source == "ctrl" and not n.listed]

    def remove(self, url: str) -> None:
        self.nodes.pop(url, None)

    # ---- circuit breaker -------------------------------------------------------------------------
    def mark_down(self, node: Node, reason: str) -> bool:
        """Opens the circuit (or backs off further); True if the node was up."""
        was_up = not node.down
        if was_up:
            node.down_since = time.monotonic()
        node.down, node.down_reason = True, reason
        node.failures += 1
        node.backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, node.backoff_s * 2))
        node.next_probe = time.monotonic() + node.backoff_s
        return was_up

    def mark_up(self, node: Node) -> bool:
        """Closes the circuit; True if the node was down."""
        was_down = node.down
        node.down, node.down_reason, node.backoff_s = False, "", 0.0
        return was_down

    def down_for(self, seconds: float) -> list[Node]:
        now = time.monotonic()
        return [n for n in self.nodes.values() if n.down and now - n.down_since > seconds]

    def due_for_probe(self) -> list[Node]:
        now = time.monotonic()
        return [n for n in self.nodes.values() if n.down and n.next_probe <= now]

    # ---- picking -----------------------------------------------------------------------------------
    def candidates(self, role: str, model: str | None, up_only: bool = True) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == role and n.serves(model) and not (up_only and n.down)]

    def pick(self, role: str, model: str | None, exclude: set[str] = frozenset()) -> Node | None:
        """Least loaded of the engines that are up (requests running there, then KV usage); round-robin
        among equals."""
        nodes = [n for n in self.candidates(role, model) if n.url not in exclude]
        if not nodes:
            return None
        least = min(n.load for n in nodes)
        tied = [n for n in nodes if n.load == least]
        return tied[next(self._rr) % len(tied)]

    def roles_for(self, model: str | None) -> set[str]:
        """Roles some engine (up or down) serves `model` in."""
        return {n.role for n in self.nodes.values() if n.serves(model)}

    def models(self) -> set[str]:
        out = set()
        for n in self.nodes.values():
            out |= n.models
        return out

    def summary(self) -> dict:
        """Per role: engines up and down (the router's /health)."""
        return {role: {"up": sum(1 for n in self.nodes.values() if n.role == role and not n.down),
                       "down": sum(1 for n in self.nodes.values() if n.role == role and n.down)}
                for role in ROLES}
