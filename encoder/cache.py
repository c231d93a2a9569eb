"""The encoder's embedding cache: each encoded image's rows in blocks of the registered region, keyed by the
image's content hash. A request leases its images' entries until /v1/encode/free (or the lease times out);
unleased entries stay for reuse and are evicted least recently used first when the region is full."""
from __future__ import annotations

import itertools
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.errors import OverloadedError, UnavailableError
from engine.multimodal.region import EmbeddingRegion, blocks_for


@dataclass
class Entry:
    blocks: list[int]
    rows: int
    leases: int = 0


class EmbeddingCache:
    def __init__(self, region: EmbeddingRegion, lease_timeout_s: float):
        self.region = region
        self.lease_timeout_s = lease_timeout_s
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.leases: dict[str, tuple[list[str], float]] = {}  # lease id -> (content hashes, deadline)
        self.hits = self.misses = self.evictions = 0
        self._ids = itertools.count()

    def get(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: str, rows: torch.Tensor) -> Entry:
        """Stores rows [n, width] (evicting unleased entries as needed); 429 when leases fill the region."""
        need = blocks_for(len(rows))
        while self.region.num_free < need:
            victim = next((k for k, e in self.entries.items() if e.leases == 0), None)
            if victim is None:
                raise OverloadedError("the encoder's embedding region is full of embeddings in use; retry shortly")
            self.region.free(self.entries.pop(victim).blocks)
            self.evictions += 1
        entry = Entry(self.region.alloc(need), len(rows))
        self.region.write(entry.blocks, rows)
        self.entries[key] = entry
        return entry

    def pin(self, lease_id: str, key: str) -> None:
        """Adds an entry to a lease (the request that holds it needs the entry until it is freed)."""
        if lease_id not in self.leases:
            raise UnavailableError("the request's lease expired while its images were encoded; retry")
        self.entries[key].leases += 1
        self.leases[lease_id][0].append(key)

    def renew(self, lease_id: str) -> None:
        """The lease's clock starts again (when its descriptor is handed out, not when encoding began)."""
        keys, _ = self.leases[lease_id]
        self.leases[lease_id] = (keys, time.monotonic() + self.lease_timeout_s)

    def lease(self, keys: list[str]) -> str:
        lease_id = f"{uuid.uuid4().hex[:16]}-{next(self._ids)}"
        for k in keys:
            self.entries[k].leases += 1
        self.leases[lease_id] = (keys, time.monotonic() + self.lease_timeout_s)
        return lease_id

    def free(self, lease_ids) -> int:
        """Ends leases (unknown or already freed ids are ignored: free is idempotent); how many ended."""
        n = 0
        for lease_id in lease_ids if isinstance(lease_ids, list) else ():
            held = self.leases.pop(lease_id, None) if isinstance(lease_id, str) else None
            if held is not None:
                n += 1
                for k in held[0]:
                    if k in self.entries:
                        self.entries[k].leases -= 1
        return n

    def expire(self) -> int:
        now = time.monotonic()
        return self.free([k for k, (_, deadline) in self.leases.items() if deadline < now])

    @property
    def leased_blocks(self) -> int:
        return sum(len(e.blocks) for e in self.entries.values() if e.leases)
