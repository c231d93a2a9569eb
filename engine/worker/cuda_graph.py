"""Decode CUDA graphs: one graph per batch-size bucket, all captured into one shared memory pool
(largest first, so smaller graphs reuse its blocks). A decode step of B sequences replays the
smallest bucket >= B with its inputs padded: padded rows read page 0 for one token and write
nowhere (slot -1), and their outputs are dropped."""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from kernels.attention import AttentionMetadata, PagedHostMeta

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int, largest: int = 512) -> list[int]:
    """Buckets 1, 2, 4, then every multiple of 8, up to max_num_seqs (included) and `largest`."""
    top = min(max_num_seqs, largest)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if top not in sizes:
        sizes.append(top)
    return sorted(sizes)


def bucket_for(n: int, sizes: list[int]) -> int | None:
    """The smallest bucket holding n sequences (None: too many, run eagerly)."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


@dataclass
class DecodeInputs:
    """Host arrays of one decode step (B sequences, one token each)."""

    input_ids: np.ndarray  # [B] int64
    positions: np.ndarray  # [B] int64
    slot_mapping: np.ndarray  # [B] int64
    host: PagedHostMeta
    block_tables: np.ndarray | None  # [B, pages] int32, for backends that read block tables


def pad_decode_inputs(x: DecodeInputs, size: int, width: int | None = None) -> DecodeInputs:
    """Pads a decode batch to `size` rows: pad rows feed token 0 at position 0, write no KV
    (slot -1) and attend over one token of page 0. `width` pads the block tables' columns."""
    B = len(x.input_ids)
    pad = size - B
    h = x.host
    i64 = lambda a, fill: np.concatenate([a.astype(np.int64), np.full(pad, fill, np.int64)])
    i32 = lambda a, fill: np.concatenate([a.astype(np.int32), np.full(pad, fill, np.int32)])
    host = PagedHostMeta(
        qo_indptr=np.arange(size + 1, dtype=np.int32),
        kv_indptr=np.concatenate([h.kv_indptr.astype(np.int32), h.kv_indptr[-1] + np.arange(1, pad + 1, dtype=np.int32)]),
        kv_indices=i32(h.kv_indices, 0), kv_last_page_len=i32(h.kv_last_page_len, 1), seq_lens=i32(h.seq_lens, 1))
    tables = None
    if x.block_tables is not None:
        w = width or x.block_tables.shape[1]
        tables = np.zeros((size, w), np.int32)
        tables[:B, :x.block_tables.shape[1]] = x.block_tables
    return DecodeInputs(i64(x.input_ids, 0), i64(x.positions, 0), i64(x.slot_mapping, -1), host, tables)


class DecodeGraphRunner:
    """Captures and replays the model's decode forward (not the logits or the sampler)."""

    def __init__(self, model, backend, device: torch.device, sizes: list[int], max_pages_per_seq: int,
                 block_size: int, hidden_size: int, dtype: torch.dtype):
        self.model, self.backend, self.device = model, backend, device
        self.sizes = sizes
        self.block_size = block_size
        self.width = max_pages_per_seq if backend.needs_block_tables else 1
        top = sizes[-1]
        # static inputs shared by all graphs (each graph reads the first `size` rows)
        self.i64 = torch.zeros(3, top, dtype=torch.int64, device=device)  # ids, positions, slots
        self.seq_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.cu_q = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.tables = torch.zeros(top, self.width, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.i64[2, :size], cu_seqlens_q=self.cu_q[:size + 1],
                                 seq_lens=self.seq_lens[:size], block_tables=self.tables[:size], max_seqlen_q=1,
                                 max_seqlen_k=self.block_size * self.width, block_size=self.block_size,
                                 is_decode=True)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = None
        self.i64[2].fill_(-1)  # capture runs write no KV
        for size in reversed(self.sizes):
            meta = self._meta(size)
            # a replay cannot re-plan: graphable backends read the step's seq_lens and block tables on
            # the device and plan nothing for decode
            assert self.backend.plan(meta) is None, f"{type(self.backend).__name__} plans decode steps"
            ids, pos = self.i64[0, :size], self.i64[1, :size]
            self.model(ids, pos, meta)  # warm-up: compiles kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(ids, pos, meta)
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1fs", len(self.sizes), self.sizes[0],
                 self.sizes[-1], self.capture_seconds)

    def run(self, x: DecodeInputs, fill=None) -> torch.Tensor | None:
        """Replays the bucket for this batch; None when the batch is larger than every bucket.
        `fill(input_ids)` writes device-side inputs (tokens still in flight) into the static buffer."""
        B = len(x.input_ids)
        size = bucket_for(B, self.sizes)
        if size is None:
            return None
        graph, out = self.graphs[size]
        p = pad_decode_inputs(x, size, self.width if self.backend.needs_block_tables else None)
        staged = torch.from_numpy(np.stack([p.input_ids, p.positions, p.slot_mapping])).pin_memory()
        self.i64[:, :size].copy_(staged, non_blocking=True)
        if fill is not None:
            fill(self.i64[0, :B])
        if self.backend.needs_block_tables:
            self.seq_lens[:size].copy_(torch.from_numpy(p.host.seq_lens).pin_memory(), non_blocking=True)
            self.tables[:size].copy_(torch.from_numpy(p.block_tables).pin_memory(), non_blocking=True)
        graph.replay()
        return out[:B]
