"""Step CUDA graphs. A graph is captured per (tokens per sequence, batch-size bucket), all into one shared memory
pool (largest first, so smaller graphs reuse its blocks): decode steps feed one token per sequence; with
speculative decoding, verify steps feed up to 1 + k (the last token and its drafts). A step of B sequences
replays the smallest bucket >= B with its inputs padded (`pad_step_inputs`): sequence b's tokens sit in rows
b * q_len onwards, pad rows and pad sequences write nowhere (slot -1), and their outputs are dropped.

With an MTP drafter (engine/spec_decode/mtp.py) each bucket also has a graph of the MTP module over the same
step: its inputs are the target graph's (positions, slots, block tables), the token ids after each position,
and the target's hidden states (its output buffer)."""
from __future__ import annotations

import bisect
import collections
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from kernels.attention import AttentionMetadata, PagedHostMeta

log = logging.getLogger(__name__)
VERIFY_MAX_TOKENS = 512  # verify buckets stop where a step would feed more tokens (decode buckets go to 512 rows)


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
class GraphInputs:
    """Host arrays of one step that a graph may replay: B sequences, each feeding its last tokens."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    host: PagedHostMeta  # qo_indptr gives each sequence's tokens, seq_lens its KV length after the step
    block_tables: np.ndarray | None  # [B, pages] int32, for backends that read block tables


@dataclass
class PaddedStep:
    """A step laid out for a bucket of `size` sequences x `q_len` rows; `index` [T] is each fed token's row."""

    input_ids: np.ndarray  # [size * q_len] int64
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray  # [size] int32
    block_tables: np.ndarray | None  # [size, width] int32
    index: np.ndarray  # [T] int64


def pad_step_inputs(x: GraphInputs, size: int, q_len: int = 1, width: int | None = None) -> PaddedStep:
    """Sequence b's n_b <= q_len tokens go to rows b * q_len .. b * q_len + n_b - 1. Its seq_len grows by the
    q_len - n_b pad rows after them, so that every real row keeps its causal horizon (position seq_len - q_len
    + row, as the kernels count it); pad rows repeat the last real position for the rope and write no KV.
    Pad sequences feed token 0 at position 0 and attend over q_len tokens of page 0. `width` pads the block
    tables' columns (pad rows may look up to q_len - 1 positions past the sequence: page 0 there)."""
    h = x.host
    B = len(h.seq_lens)
    cu = h.qo_indptr.astype(np.int64)
    n = np.diff(cu)
    assert B <= size and (n >= 1).all() and (n <= q_len).all(), (B, size, q_len)
    seq_of = np.repeat(np.arange(B), n)
    index = seq_of * q_len + np.arange(cu[-1]) - cu[:-1][seq_of]
    N = size * q_len
    ids = np.zeros(N, np.int64)
    ids[index] = x.input_ids
    slots = np.full(N, -1, np.int64)
    slots[index] = x.slot_mapping
    last = np.zeros(size, np.int64)
    last[:B] = x.positions[cu[1:] - 1]
    positions = np.repeat(last, q_len)
    positions[index] = x.positions
    seq_lens = np.full(size, q_len, np.int32)
    seq_lens[:B] = h.seq_lens + (q_len - n)
    tables = None
    if x.block_tables is not None:
        tables = np.zeros((size, width or x.block_tables.shape[1]), np.int32)
        tables[:B, :x.block_tables.shape[1]] = x.block_tables
    return PaddedStep(ids, positions, slots, seq_lens, tables, index)


@dataclass
class GraphStep:
    """A replayed step: its bucket, `hidden` [size * q_len, H] (the graph's output buffer) and the row of each
    fed token in it (`index`)."""

    q_len: int
    size: int
    hidden: torch.Tensor
    index: np.ndarray


class StepGraphRunner:
    """Captures and replays the model's forward (not the logits or the sampler) for the buckets of each
    q_len: decode (1) and, with speculative decoding, verify (1 + k). With `mtp`, also the MTP module's
    forward over the same step (`mtp_hidden`)."""

    def __init__(self, model, backend, device: torch.device, buckets: dict[int, list[int]], max_model_len: int,
                 block_size: int, mtp: bool = False):
        self.model, self.backend, self.device = model, backend, device
        self.buckets = {q: sizes for q, sizes in buckets.items() if sizes}
        self.block_size = block_size
        self.mtp = mtp
        top_q = max(self.buckets)
        # pad rows of a verify step may look q_len - 1 positions past max_model_len
        self.width = -(-(max_model_len + top_q - 1) // block_size) if backend.needs_block_tables else 1
        top_rows = max(q * sizes[-1] for q, sizes in self.buckets.items())
        top_seqs = max(sizes[-1] for sizes in self.buckets.values())
        # static inputs shared by all graphs (each graph reads the first rows)
        self.i64 = torch.zeros(3, top_rows, dtype=torch.int64, device=device)  # ids, positions, slots
        self.seq_lens = torch.ones(top_seqs, dtype=torch.int32, device=device)
        self.cu_q = {q: torch.arange(0, q * (sizes[-1] + 1), q, dtype=torch.int32, device=device)
                     for q, sizes in self.buckets.items()}
        self.tables = torch.zeros(top_seqs, self.width, dtype=torch.int32, device=device)
        # (q_len, size) -> (graph, hidden), and the MTP module's (graph, hidden) over the same step
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mtp_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays: collections.Counter = collections.Counter()  # replays per q_len
        self.capture_seconds = 0.0

    def q_len_for(self, tokens_per_seq: int) -> int | None:
        """The smallest captured q_len holding a step whose sequences feed up to `tokens_per_seq` tokens."""
        fits = [q for q in self.buckets if q >= tokens_per_seq]
        return min(fits) if fits else None

    def _meta(self, q: int, size: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.i64[2, :size * q], cu_seqlens_q=self.cu_q[q][:size + 1],
                                 seq_lens=self.seq_lens[:size], block_tables=self.tables[:size], max_seqlen_q=q,
                                 max_seqlen_k=self.block_size * self.width, block_size=self.block_size,
                                 is_decode=q == 1)

    def _forward(self, q: int, size: int) -> tuple[torch.Tensor, AttentionMetadata]:
        """The model over the static inputs. A decode step plans nothing (graphable backends read its seq_lens and
        block tables on the device); a verify step's plan is device work, captured with the forward."""
        meta = self._meta(q, size)
        meta.plan = self.backend.plan(meta)
        if q == 1:
            assert meta.plan is None, f"{type(self.backend).__name__} plans decode steps"
        ids, pos = self.i64[0, :size * q], self.i64[1, :size * q]
        return self.model(ids, pos, meta), meta

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = None
        self.i64[2].fill_(-1)  # capture runs write no KV
        keys = sorted(((q, s) for q, sizes in self.buckets.items() for s in sizes), key=lambda k: -k[0] * k[1])
        for q, size in keys:
            self.seq_lens.fill_(q)  # capture runs: each sequence its q tokens (every row a causal horizon >= 1)
            ids, pos = self.i64[0, :size * q], self.i64[1, :size * q]
            hidden, meta = self._forward(q, size)  # warm-up: compiles kernels outside the capture
            if self.mtp:
                self.model.mtp_hidden(ids, pos, hidden, meta)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden, meta = self._forward(q, size)
            pool = graph.pool()
            self.graphs[q, size] = (graph, hidden)
            if self.mtp:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.model.mtp_hidden(ids, pos, hidden, meta)
                self.mtp_graphs[q, size] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d CUDA graphs (tokens per sequence %s; batch %d..%d%s) in %.1fs", len(keys),
                 sorted(self.buckets), min(s[0] for s in self.buckets.values()),
                 max(s[-1] for s in self.buckets.values()), ", with the MTP module" if self.mtp else "",
                 self.capture_seconds)

    def _host(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t.pin_memory() if self.device.type == "cuda" else t  # (the CPU tests stage without a device)

    def _stage(self, x: GraphInputs, q: int, size: int) -> PaddedStep:
        """Writes the step, padded to the bucket, into the static inputs."""
        p = pad_step_inputs(x, size, q, self.width if self.backend.needs_block_tables else None)
        self.i64[:, :size * q].copy_(self._host(np.stack([p.input_ids, p.positions, p.slot_mapping])),
                                     non_blocking=True)
        if self.backend.needs_block_tables:
            self.seq_lens[:size].copy_(self._host(p.seq_lens), non_blocking=True)
            self.tables[:size].copy_(self._host(p.block_tables), non_blocking=True)
        return p

    def run(self, x: GraphInputs, fill=None) -> GraphStep | None:
        """Replays the bucket for this step; None when no bucket holds it (run it eagerly).
        `fill(input_ids, index)` writes device-side inputs (tokens still in flight) into the static buffer, whose
        row of fed token t is index[t]."""
        B = len(x.host.seq_lens)
        q = self.q_len_for(int(np.diff(x.host.qo_indptr).max()))
        size = bucket_for(B, self.buckets[q]) if q is not None else None
        if size is None:
            return None
        p = self._stage(x, q, size)
        if fill is not None:
            fill(self.i64[0], p.index)
        graph, hidden = self.graphs[q, size]
        graph.replay()
        self.replays[q] += 1
        return GraphStep(q, size, hidden, p.index)

    def run_mtp(self, step: GraphStep, next_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The MTP module over a replayed step: `next_ids` [T] (on the device) is the token after each fed token,
        `index` the step's index on the device. Returns the module's hidden states in the step's rows."""
        ids = self.i64[0, :step.size * step.q_len]
        ids.zero_()
        ids[index] = next_ids
        graph, out = self.mtp_graphs[step.q_len, step.size]
        graph.replay()
        return out

    def run_mtp_decode(self, x: GraphInputs, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        """One link of an MTP chain, a decode-shaped step of the module alone: token `ids` [B] (on the device)
        and the module's previous hidden states [B, H] at x's positions. None when no decode bucket holds it."""
        B = len(x.host.seq_lens)
        size = bucket_for(B, self.buckets.get(1, []))
        if size is None:
            return None
        self._stage(x, 1, size)
        self.i64[0, :B].copy_(ids)
        target_out = self.graphs[1, size][1]
        target_out[:B].copy_(hidden)  # the module's input buffer (a decode replay writes it again anyway)
        graph, out = self.mtp_graphs[1, size]
        graph.replay()
        self.replays["mtp_chain"] += 1
        return out[:B]
