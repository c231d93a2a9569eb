"""Host batching: a scheduled step as `StepBatch` (the per-row numbers every rank needs; rank 0 builds it from
the scheduler's output and sends it to the other ranks) and the step's model inputs built from it with
vectorised numpy (`prepare_host`), with no per-token Python loops."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.multimodal.inputs import StepImage, step_images
from engine.worker.host_copy import to_device
from kernels.attention import PagedHostMeta


@dataclass
class StepBatch:
    """One step's rows in batch order. A row feeds `num_new` tokens from position `num_computed` on;
    `token_ids` are all rows' fed tokens back to back, 0 where a token is still in flight (the row's
    `pending_row`: its index in the previous step's samples, filled on the device; -1: none)."""

    num_computed: np.ndarray  # [B] int64
    num_new: np.ndarray  # [B] int64
    pending_rows: np.ndarray  # [B] int64
    samples: np.ndarray  # [B] bool: the row's logits are sampled
    token_ids: np.ndarray  # [T] int64
    # prompt_logprobs: fed-token rows whose next (prompt) token's logprob is wanted, those tokens, and the most
    # alternatives any of them wants
    prompt_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [R] int64
    prompt_targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [R] int64
    prompt_topn: int = 0
    # multimodal rope: what each row adds to its token positions (None: nothing), and, for a step that feeds
    # image tokens, every fed token's (time, height, width) positions; the image parts the step feeds
    rope_offsets: np.ndarray | None = None  # [B] int64
    mrope_positions: np.ndarray | None = None  # [3, T] int64
    images: list[StepImage] = field(default_factory=list)
    # speculative decoding: drafts fed at the end of each row (its last spec_lens + 1 positions are sampled)
    spec_lens: np.ndarray | None = None  # [B] int64
    # the prompt token after each row's chunk (-1: none, or the row samples): what an MTP drafter reads at
    # the chunk's last position
    next_ids: np.ndarray | None = None  # [B] int64

    def sample_rows(self) -> np.ndarray:
        """Logits rows per row: 1 + its drafts where sampled, else 0."""
        rows = self.samples.astype(np.int64)
        return rows if self.spec_lens is None else rows + np.where(self.samples, self.spec_lens, 0)

    @classmethod
    def from_scheduled(cls, batch) -> "StepBatch":
        """From the scheduler's ScheduledSeqs (rank 0)."""
        B = len(batch)
        n_new = np.fromiter((s.num_new_tokens for s in batch), np.int64, B)
        start = np.fromiter((s.seq.num_computed_tokens for s in batch), np.int64, B)
        pending = np.fromiter((s.seq.pending_row if s.seq.num_pending_tokens else -1 for s in batch), np.int64, B)
        T = int(n_new.sum())
        # a sequence with a token in flight feeds exactly that token last: a placeholder here
        if T == B:
            ids = np.fromiter((0 if s.seq.num_pending_tokens else s.seq.token_ids[st]
                               for s, st in zip(batch, start.tolist())), np.int64, B)
        else:
            ids = np.fromiter(itertools.chain.from_iterable(
                s.seq.token_ids[st:st + n - 1] + [0] if s.seq.num_pending_tokens
                else s.seq.token_ids[st:st + n - len(s.spec_token_ids)] + s.spec_token_ids
                for s, st, n in zip(batch, start.tolist(), n_new.tolist())), np.int64, T)
        step = cls(start, n_new, pending, np.fromiter((s.samples for s in batch), bool, B), ids)
        if any(s.spec_token_ids for s in batch):
            step.spec_lens = np.fromiter((len(s.spec_token_ids) for s in batch), np.int64, B)
        if not step.samples.all():
            step.next_ids = np.fromiter((s.seq.token_ids[st + n] if not s.samples and st + n < len(s.seq.token_ids)
                                         else -1 for s, st, n in zip(batch, start.tolist(), n_new.tolist())),
                                        np.int64, B)
        if any(s.seq.prompt_logprobs is not None for s in batch):
            step.prompt_idx, step.prompt_targets, step.prompt_topn = _prompt_rows(batch, start, n_new)
        if any(s.seq.mrope_positions is not None for s in batch):
            _multimodal_rows(step, batch)
        return step

    def part(self, lo: int, hi: int) -> "StepBatch":
        """Rows [lo, hi) (one data-parallel group's share of the step; prompt logprobs are single-group only)."""
        if lo == 0 and hi == len(self.num_new):
            return self
        t0, t1 = int(self.num_new[:lo].sum()), int(self.num_new[:hi].sum())
        return StepBatch(self.num_computed[lo:hi], self.num_new[lo:hi], self.pending_rows[lo:hi],
                         self.samples[lo:hi], self.token_ids[t0:t1],
                         rope_offsets=None if self.rope_offsets is None else self.rope_offsets[lo:hi],
                         mrope_positions=None if self.mrope_positions is None else self.mrope_positions[:, t0:t1],
                         images=[StepImage(row=i.row - t0, start=i.start, length=i.length, image=i.image)
                                 for i in self.images if t0 <= i.row < t1],
                         spec_lens=None if self.spec_lens is None else self.spec_lens[lo:hi],
                         next_ids=None if self.next_ids is None else self.next_ids[lo:hi])


def _multimodal_rows(step: StepBatch, batch) -> None:
    """Rope offsets of rows of multimodal sequences; with image tokens in the step, the [3, T] positions and
    the image parts. Outside images all three axes share one position, its index plus the offset that the
    images before it introduced (past the prompt: the sequence's rope delta)."""
    offsets = np.zeros(len(batch), np.int64)
    rows = []
    base = 0
    for r, s in enumerate(batch):
        seq, st, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
        if seq.mrope_positions is not None:
            offsets[r] = seq.mrope_positions[0, st] - st if st < seq.num_prompt_tokens else seq.rope_delta
            parts = step_images(seq.images, st, n, base)
            if parts:
                step.images.extend(parts)
                rows.append((r, base, seq, st, n))
        base += n
    step.rope_offsets = offsets
    if rows:
        T = len(step.token_ids)
        cu = np.concatenate([[0], np.cumsum(step.num_new)])
        flat = np.arange(T, dtype=np.int64) + np.repeat(step.num_computed - cu[:-1] + offsets, step.num_new)
        pos3 = np.repeat(flat[None, :], 3, axis=0)
        for r, b, seq, st, n in rows:
            k = min(n, seq.num_prompt_tokens - st)  # prompt tokens of the chunk (a recompute may go past it)
            pos3[:, b:b + k] = seq.mrope_positions[:, st:st + k]
            pos3[:, b + k:b + n] = np.arange(st + k, st + n) + seq.rope_delta  # output tokens: index + delta
        step.mrope_positions = pos3


def _prompt_rows(batch, start: np.ndarray, n_new: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The rows of prompt positions p (1 <= p + 1 < prompt length) not yet given a logprob: a chunk's rows, less
    those a preempted sequence already has."""
    rows, targets, topn, base = [], [], 0, 0
    for s, st, n in zip(batch, start.tolist(), n_new.tolist()):
        seq = s.seq
        if seq.prompt_logprobs is not None:
            lo, hi = seq.prompt_logprob_span(st, n)
            if hi > lo:
                rows.extend(range(base + lo - st, base + hi - st))
                targets.extend(seq.token_ids[lo + 1:hi + 1])
                topn = max(topn, seq.params.prompt_logprobs)
        base += n
    return np.array(rows, np.int64), np.array(targets, np.int64), topn


@dataclass
class StepInputs:
    """Host arrays of one step's model inputs."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    logits_idx: np.ndarray  # [S] int64: rows whose logits are sampled
    host: PagedHostMeta
    block_tables: np.ndarray | None  # [B, pages] int32 (only for backends that read them)
    max_seqlen_q: int
    is_decode: bool
    # tokens still in flight (async scheduling): input_ids[pending_dst] = previous step's
    # sampled tokens[pending_src], filled on the device
    pending_dst: np.ndarray  # [P] int64
    pending_src: np.ndarray  # [P] int64
    # multimodal steps (engine/multimodal): rope positions per axis and the image parts fed
    mrope_positions: np.ndarray | None = None  # [3, T] int64
    images: list[StepImage] = field(default_factory=list)


def prepare_host(b: StepBatch, block_tables: list[list[int]], block_size: int, with_block_tables: bool) -> StepInputs:
    bs, B = block_size, len(b.num_new)
    n_new, start = b.num_new, b.num_computed
    end = start + n_new
    cu_q = np.zeros(B + 1, np.int64)
    np.cumsum(n_new, out=cu_q[1:])
    T = int(cu_q[-1])
    is_decode = T == B
    pending = b.pending_rows >= 0
    positions = start if is_decode else np.arange(T, dtype=np.int64) + np.repeat(start - cu_q[:-1], n_new)
    pages = (end + bs - 1) // bs
    kv_indptr = np.zeros(B + 1, np.int64)
    np.cumsum(pages, out=kv_indptr[1:])
    kv_indices = np.fromiter(itertools.chain.from_iterable(
        table[:p] for table, p in zip(block_tables, pages.tolist())), np.int32, int(kv_indptr[-1]))
    token_base = kv_indptr[:-1] if is_decode else np.repeat(kv_indptr[:-1], n_new)
    slot_mapping = kv_indices[token_base + positions // bs].astype(np.int64) * bs + positions % bs
    host = PagedHostMeta(cu_q.astype(np.int32), kv_indptr.astype(np.int32), kv_indices,
                         (end - (pages - 1) * bs).astype(np.int32), end.astype(np.int32))
    if b.rope_offsets is not None:  # rope positions differ from KV positions (multimodal rope); slots are set
        positions = positions + (b.rope_offsets if is_decode else np.repeat(b.rope_offsets, n_new))
    tables = None
    if with_block_tables:
        tables = np.zeros((B, int(pages.max())), np.int32)
        tables[np.arange(tables.shape[1])[None, :] < pages[:, None]] = kv_indices
    logits_idx = cu_q[1:][b.samples] - 1
    if b.spec_lens is not None:  # each sampled row's last 1 + drafts positions: its last token and its drafts
        rows = b.sample_rows()
        within = np.arange(rows.sum()) - np.repeat(np.cumsum(rows) - rows, rows)
        logits_idx = np.repeat(cu_q[1:] - rows, rows) + within
    return StepInputs(b.token_ids, positions, slot_mapping, logits_idx, host, tables,
                      int(n_new.max()), is_decode, cu_q[1:][pending] - 1, b.pending_rows[pending],
                      b.mrope_positions, b.images)


def fill_pending(input_ids: torch.Tensor, dst: np.ndarray, src: np.ndarray, prev_tokens: torch.Tensor | None) -> None:
    """input_ids[dst] = prev_tokens[src], on the device: tokens sampled by a step still in flight."""
    if len(dst) == 0:
        return
    assert prev_tokens is not None, "a sequence has a token in flight but no step is in flight"
    (idx,) = to_device([np.stack([dst, src])], np.int64, input_ids.device)
    input_ids.index_copy_(0, idx[0], prev_tokens.index_select(0, idx[1]).to(input_ids.dtype))
