"""EnginePool: the engines the router may use (discovered or added by hand), with a load-based pick."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

ROLE_BY_NUMBER = {1: "hybrid", 2: "prefill", 3: "decode"}  # DLRouter's /nodes/add


@dataclass
class Node:
    url: str
    role: str  # hybrid | prefill | decode
    models: set[str] = field(default_factory=set)  # accepted `model` values (empty: any)
    source: str = "manual"  # manual | ctrl
    inflight: int = 0  # requests this router has in flight there
    running: int = 0  # the engine's own count (all its clients), from its last /engine_info
    kv_usage: float = 0.0  # fraction of its KV pool in use, from its last /engine_info
    failures: int = 0

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
        if old is not None:
            node.inflight, node.running, node.kv_usage = old.inflight, old.running, old.kv_usage
        self.nodes[node.url] = node

    def replace_discovered(self, nodes: list[Node]) -> None:
        """The control plane's view replaces earlier discovered nodes; manual ones stay."""
        keep = {u: n for u, n in self.nodes.items() if n.source != "ctrl"}
        self.nodes = keep
        for n in nodes:
            self.add(n)

    def remove(self, url: str) -> None:
        self.nodes.pop(url, None)

    def candidates(self, role: str, model: str | None) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == role and n.serves(model)]

    def pick(self, role: str, model: str | None, exclude: set[str] = frozenset()) -> Node | None:
        """Least loaded (requests running there, then KV usage); round-robin among equals."""
        nodes = [n for n in self.candidates(role, model) if n.url not in exclude]
        if not nodes:
            return None
        least = min(n.load for n in nodes)
        tied = [n for n in nodes if n.load == least]
        return tied[next(self._rr) % len(tied)]

    def models(self) -> set[str]:
        out = set()
        for n in self.nodes.values():
            out |= n.models
        return out
