"""KVHandoff: the prefill and decode halves of a migration inside one engine core.

Prefill side: a request that asked for `do_remote_decode` is *parked* after its first sampled
token: its blocks stay allocated (keyed by an int `seq_id`) until the router frees them, or until
a timeout reclaims them. Decode side: a request carrying a `migration` gets fresh blocks, pulls the
source's blocks into them over DLSlime, then joins the running batch as if it had prefilled here.
"""
from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.errors import InvalidRequestError
from engine.pd import migration as mig
from engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class _Parked:
    seq: Sequence
    staged: object  # the agent's StagedBlocks (pool blocks or pinned staging slots)
    deadline: float


@dataclass
class _Pull:
    seq: Sequence
    migration: mig.Migration
    transfer: object = None  # PullTransfer once blocks are allocated and the pull started
    cancelled: bool = False  # aborted while reads were in flight: free once they settle


class KVHandoff:
    def __init__(self, block_manager: BlockManager, pool, geometry: mig.KVGeometry, host: str,
                 park_timeout_s: float, pull_timeout_s: float, staging_bytes: int = 2 << 30,
                 engine_id: str | None = None):
        self.block_manager = block_manager
        self.pool = pool
        self.geometry = geometry
        self.host = host
        self.park_timeout_s = park_timeout_s
        self.pull_timeout_s = pull_timeout_s
        self.staging_bytes = staging_bytes
        self.engine_id = engine_id or uuid.uuid4().hex
        self._agent = None
        self._seq_ids = itertools.count(1)
        self.parked: dict[int, _Parked] = {}
        self.pulls: deque[_Pull] = deque()  # in admission order; head may wait for free blocks
        self.active_sources: set[tuple[str, int]] = set()  # (source engine, seq_id) being pulled
        self.num_reclaimed = 0

    @property
    def agent(self):
        """The DLSlime endpoint serving/pulling this pool, created on first use."""
        if self._agent is None:
            from engine.pd.transfer import KVTransferAgent
            # the PyPI dlslime has no CUDA: a GPU pool is served through a pinned host area
            block_bytes = self.pool[0].numel() * self.pool.element_size()
            staging = min(self.pool.shape[0], max(1, self.staging_bytes // block_bytes)) if self.pool.is_cuda else 0
            self._agent = KVTransferAgent(self.pool, host=self.host, staging_blocks=staging)
        return self._agent

    # ---- prefill side ------------------------------------------------------------------------
    def park(self, seq: Sequence, model: str) -> dict:
        """Keeps the prompt's blocks for a decode engine; returns DLRouter's kv_transfer_params."""
        seq_id = next(self._seq_ids)
        nblocks = self.block_manager.blocks_needed(seq.num_prompt_tokens)
        block_ids = seq.block_table[:nblocks]
        staged = self.agent.stage_out(block_ids)
        if staged is None:
            raise RuntimeError("KV staging area full")
        self.parked[seq_id] = _Parked(seq, staged, time.monotonic() + self.park_timeout_s)
        m = mig.Migration(version=mig.VERSION, engine_id=self.engine_id, seq_id=seq_id,
                          transfer=self.agent.endpoint_info(), geometry=self.geometry,
                          block_ids=list(staged.remote_ids), prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
                          first_token=seq.token_ids[seq.num_prompt_tokens], params=seq.params,
                          sampling_seed=seq.sampling_seed, model=model)
        return {"migration": mig.encode(m), "first_token": m.first_token, "seq_id": seq_id}

    def free(self, seq_ids) -> int:
        """Releases parked KV (idempotent: unknown or already freed ids are fine)."""
        freed = 0
        for seq_id in seq_ids:
            parked = self.parked.pop(seq_id, None) if isinstance(seq_id, int) else None
            if parked is not None:
                self._release(parked)
                freed += 1
        return freed

    def _release(self, parked: _Parked) -> None:
        self.agent.release(parked.staged)
        self.block_manager.free(parked.seq)

    def reclaim_expired(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        expired = [k for k, p in self.parked.items() if p.deadline <= now]
        for k in expired:
            log.warning("reclaiming KV of seq_id %d: not freed within %.0fs", k, self.park_timeout_s)
            self._release(self.parked.pop(k))
        self.num_reclaimed += len(expired)
        return len(expired)

    # ---- decode side -------------------------------------------------------------------------
    def parse(self, kv_transfer_params: dict) -> mig.Migration:
        m = mig.decode(kv_transfer_params.get("migration"))
        if m.geometry != self.geometry:
            raise InvalidRequestError(f"migration KV layout {m.geometry} does not match this engine's {self.geometry}",
                                      param="kv_transfer_params")
        if (m.engine_id, m.seq_id) in self.active_sources:
            raise InvalidRequestError(f"seq_id {m.seq_id} of engine {m.engine_id} is already being pulled",
                                      param="kv_transfer_params")
        return m

    def admit(self, seq: Sequence, m: mig.Migration) -> None:
        self.active_sources.add((m.engine_id, m.seq_id))
        self.pulls.append(_Pull(seq, m))

    def poll(self) -> tuple[list[Sequence], list[tuple[Sequence, str]]]:
        """Starts pulls that now have blocks, advances running ones.
        Returns (sequences whose KV has landed, (sequence, error) of failed ones)."""
        from engine.pd.transfer import TERMINAL, TransferError, TransferState
        ready, failed = [], []
        waiting_for_blocks = False
        for pull in list(self.pulls):
            seq = pull.seq
            if pull.transfer is None:
                n = len(pull.migration.block_ids)
                if waiting_for_blocks or n > self.block_manager.num_free_blocks:
                    waiting_for_blocks = True  # admit in order: later pulls wait too
                    continue
                seq.block_table = self.block_manager.allocate_blocks(n)
                try:
                    pull.transfer = self.agent.start_pull(pull.migration.transfer, pull.migration.block_ids,
                                                          seq.block_table, timeout_s=self.pull_timeout_s)
                except (TransferError, KeyError, TypeError, ValueError) as e:
                    self._finish_pull(pull, safe=True)
                    failed.append((seq, f"KV transfer rejected: {e}"))
                    continue
            state = pull.transfer.poll()
            if state not in TERMINAL:
                continue
            if state is TransferState.DONE and not pull.cancelled:
                self._finish_pull(pull, safe=True, keep_blocks=True)
                seq.num_computed_tokens = seq.num_prompt_tokens
                ready.append(seq)
            else:
                self._finish_pull(pull, safe=pull.transfer.safe_to_free)
                if not pull.cancelled:
                    failed.append((seq, f"KV transfer {state.value}: {pull.transfer.error}"))
        return ready, failed

    def cancel(self, seq: Sequence) -> bool:
        """The request was aborted: drop its pull (blocks are freed once no read can land in them)."""
        for pull in self.pulls:
            if pull.seq is seq:
                if pull.transfer is None:
                    self._finish_pull(pull, safe=True)
                else:
                    pull.cancelled = True
                return True
        return False

    def _finish_pull(self, pull: _Pull, safe: bool, keep_blocks: bool = False) -> None:
        self.pulls.remove(pull)
        self.active_sources.discard((pull.migration.engine_id, pull.migration.seq_id))
        if keep_blocks or not pull.seq.block_table:
            return
        if safe:
            self.block_manager.free(pull.seq)
        else:  # a late write may still land there: never hand these blocks to anyone again
            log.error("quarantining %d KV blocks of %s after an abandoned pull", len(pull.seq.block_table),
                      pull.seq.seq_id)

    def metrics(self) -> dict:
        """Pull counters for the engine's stats (zero until the first transfer)."""
        if self._agent is None:
            return {"kv_transfers": 0, "kv_transfers_failed": 0, "kv_transfer_bytes": 0, "kv_transfer_ms": 0.0}
        m = self._agent.metrics()
        return {"kv_transfers": m.transfers + m.failed + m.timed_out, "kv_transfers_failed": m.failed + m.timed_out,
                "kv_transfer_bytes": m.bytes, "kv_transfer_ms": m.ms}

    @property
    def busy(self) -> bool:
        return bool(self.parked or self.pulls)

    def close(self) -> None:
        for k in list(self.parked):
            self._release(self.parked.pop(k))
        if self._agent is not None:
            self._agent.close()
