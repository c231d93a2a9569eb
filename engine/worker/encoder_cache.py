"""The model runner's cache of image embeddings, keyed by image content: an image is encoded once however
many prefill chunks (or requests, or recomputes after preemption) feed its tokens. Least recently used
entries go first once the cached embedding rows pass the budget; entries the current step uses stay. Every
rank runs the same steps in the same order, so every rank's cache holds the same keys."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class ImageEmbedding:
    embeds: torch.Tensor  # [tokens, hidden]
    deepstack: list[torch.Tensor]  # per tapped vision block: [tokens, hidden]


class EncoderCache:
    def __init__(self, budget_tokens: int):
        self.budget_tokens = budget_tokens
        self.entries: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self.tokens = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ImageEmbedding | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return entry

    def put(self, key: str, entry: ImageEmbedding, keep: set[str]) -> None:
        self.entries[key] = entry
        self.tokens += len(entry.embeds)
        for old in list(self.entries):
            if self.tokens <= self.budget_tokens:
                break
            if old not in keep:
                self.tokens -= len(self.entries.pop(old).embeds)
