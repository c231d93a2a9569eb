"""BlockManager: the paged KV pool's free list, per-sequence block tables and the prefix cache.

Full blocks are keyed by a chained hash (parent hash, block token ids); a block whose reference
count drops to zero stays cached until it is reused for something else (LRU order).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from engine.core.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(parent: int | None, token_ids: tuple[int, ...], extra: tuple = ()) -> int:
    """`extra`: what else the block's KV depends on (the content hashes of images it covers)."""
    return hash((parent, token_ids, extra) if extra else (parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 on_free: Callable[[str], None] | None = None, drop_last_hit: bool = False):
        self.num_blocks = num_blocks
        # a drafter that reads one token ahead (MTP: its KV at position i depends on token i + 1) makes a cached
        # block's last position depend on the token after the block, which the next sequence may not share:
        # the last block of a hit is computed again (vLLM does the same for EAGLE)
        self.drop_last_hit = drop_last_hit
        # told the id of every sequence whose table is dropped (multi-rank engines forget their copies)
        self.on_free = on_free
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in eviction order (oldest first); cached ones keep their hash until reused
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----------------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The chained hashes of the sequence's first `num_blocks` full blocks, computed once each."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            extra = seq.image_keys(i * bs, (i + 1) * bs) if seq.images else ()
            hashes.append(block_hash(hashes[-1] if hashes else None, tuple(seq.token_ids[i * bs:(i + 1) * bs]), extra))
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of the sequence's tokens (never all of them:
        the last token is always computed so that there are logits to sample from). None for a sequence
        that wants its prompt's logprobs: cached tokens would have none."""
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return []
        bs = self.block_size
        limit = (len(seq) - 1) // bs
        hit: list[int] = []
        for i, h in enumerate(self._block_hashes(seq, limit)[:limit]):
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            hit.append(block_id)
        if self.drop_last_hit and hit:
            hit.pop()
        return hit

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publishes the sequence's blocks whose tokens all have KV now (only the newly full ones:
        this runs for every sequence on every step)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # a block is keyed by its token ids, so one holding a token still in flight waits
        num_full = min(min(seq.num_computed_tokens, len(seq.token_ids)) // bs, len(seq.block_table))
        if num_full <= seq.num_published_blocks:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(seq.num_published_blocks, num_full):
            block, h = self.blocks[seq.block_table[i]], hashes[i]
            if block.hash == h or h in self.cached:
                continue  # already published (adopted from the cache), or an identical block is
            block.hash, block.token_ids = h, tuple(seq.token_ids[i * bs:(i + 1) * bs])
            self.cached[h] = block.block_id
        seq.num_published_blocks = num_full

    # ---- allocation ------------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict it from the prefix cache
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] = ()) -> bool:
        computed = seq.num_computed_tokens + len(prefix_blocks) * self.block_size
        need = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table) - len(prefix_blocks)
        # adopting a cached block that sits in the free list takes it out of the free count
        reused_free = sum(1 for b in prefix_blocks if self.blocks[b].ref_count == 0)
        return need <= self.num_free_blocks - reused_free

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] = ()) -> None:
        """Gives `seq` blocks for `num_new_tokens` more tokens, first adopting cached prefix blocks."""
        if not seq.block_table and self.enable_prefix_caching:
            self.prefix_queries += seq.num_prompt_tokens
            self.prefix_hits += len(prefix_blocks) * self.block_size
        for block_id in prefix_blocks:
            self._ref(block_id)
            seq.block_table.append(block_id)
        if prefix_blocks:
            seq.num_computed_tokens = len(prefix_blocks) * self.block_size
            seq.num_cached_tokens = seq.num_computed_tokens
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def allocate_blocks(self, count: int) -> list[int]:
        """Fresh blocks not tied to a sequence (e.g. the target of a KV pull)."""
        if count > self.num_free_blocks:
            raise MemoryError(f"need {count} KV blocks, {self.num_free_blocks} free")
        return [self._take_free() for _ in range(count)]

    def free_blocks_by_id(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):  # tail blocks are the least shareable: evict them first
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None

    def free(self, seq: Sequence) -> None:
        if self.on_free is not None:
            self.on_free(seq.seq_id)
        self.free_blocks_by_id(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_published_blocks = 0
