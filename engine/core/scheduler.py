"""Scheduler: continuous batching with chunked prefill under a token budget, and preemption by
recompute when KV blocks run out. Decode and prefill chunks share one step."""
from __future__ import annotations

import time

from collections import deque
from dataclasses import dataclass, field

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens fed this step, from seq.num_computed_tokens on (drafts included)
    # this step computes the sequence's last token, so its logits are sampled (fixed when scheduled)
    samples: bool | None = None
    # speculative decoding: drafts fed after the last token (the last len() of the fed tokens); every one of
    # the 1 + len() positions is sampled, and the verification keeps the drafts the target agrees with
    spec_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.samples is None:
            fed = self.num_new_tokens - len(self.spec_token_ids)
            self.samples = self.seq.num_computed_tokens + fed == len(self.seq)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, lookahead_slots: int = 0, max_model_len: int | None = None):
        self.block_manager = block_manager
        # KV slots reserved past a step's fed tokens (an MTP chain's drafts write there), never past max_model_len
        self.lookahead_slots, self.max_model_len = lookahead_slots, max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. running sequences first, oldest first; preempt the newest when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.last_token_pending:  # it ends when that token is read back: nothing to feed
                i += 1
                continue
            num_new = min(len(seq) - seq.num_computed_tokens, budget)
            # a decoding sequence with drafts feeds them too, when the budget has room for all of them
            drafts = seq.spec_token_ids if num_new == 1 and 1 + len(seq.spec_token_ids) <= budget else []
            num_new += len(drafts)
            reserve = num_new + self._lookahead(seq.num_computed_tokens + num_new)
            while not bm.can_allocate(seq, reserve):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, reserve)
                out.scheduled.append(ScheduledSeq(seq, num_new, spec_token_ids=list(drafts)))
                budget -= num_new
                i += 1

        # 2. admit waiting sequences while the budget, the seq limit and the pool allow
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            prefix = bm.match_prefix(seq)
            remaining = len(seq) - len(prefix) * bm.block_size
            num_new = min(remaining, budget)
            if num_new < remaining and not self.enable_chunked_prefill and self.running:
                break  # without chunking a prompt waits for a step with room for all of it
            reserve = num_new + self._lookahead(len(prefix) * bm.block_size + num_new)
            if not bm.can_allocate(seq, reserve, prefix):
                break
            self.waiting.popleft()
            bm.allocate(seq, reserve, prefix)
            seq.status = SequenceStatus.RUNNING
            if seq.queue_time is None:
                seq.queue_time = time.monotonic() - seq.created
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def _lookahead(self, end: int) -> int:
        if not self.lookahead_slots:
            return 0
        return max(0, min(self.lookahead_slots, self.max_model_len - end))

    def adopt(self, seq: Sequence) -> None:
        """Joins a sequence whose prompt KV is already in its blocks (migrated in) to the batch."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def release(self, seq: Sequence, reason: str) -> None:
        """Ends a running sequence but leaves its blocks allocated (parked for migration out)."""
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        """Drops the sequence's KV; it is recomputed (prompt + output so far) when readmitted."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Ends a sequence (stop, length or abort) and returns its blocks to the pool."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
