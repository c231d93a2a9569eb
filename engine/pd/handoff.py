"""KVHandoff: the prefill and decode halves of a migration inside one engine core.

Prefill side: a request that asked for `do_remote_decode` is *parked* after its first sampled token: its
blocks stay allocated (keyed by an int `seq_id`) until the router frees them, or until a timeout reclaims
them. Decode side: a request carrying a `migration` gets fresh blocks, pulls the source's blocks into them
over DLSlime, then joins the running batch as if it had prefilled here.

The bytes move rank to rank: every tensor-parallel rank stages, serves and pulls its own shard of the pool
(engine/pd/rank_kv.py), reached through the executor. A pull is done when every rank's part is done, failed
when any part failed, and its blocks are freed only once no rank can still write into them. With data
parallelism a sequence lives in one DP group's pool: the migration names that group, and the decode engine
pulls into the group it puts the sequence on (any group: only the tensor-parallel sizes must match).
"""
from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import msgspec

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence
from engine.errors import InvalidRequestError
from engine.kv.spec import KVCacheSpec
from engine.pd import migration as mig
from engine.pd.topology import ipc_digest

log = logging.getLogger(__name__)
# a pull in flight is advanced this often (DLSlime's futures are polled, they signal nothing)
PULL_POLL_S = 0.0005


@dataclass
class _Parked:
    seq: Sequence
    deadline: float


@dataclass
class _Pull:
    key: int
    seq: Sequence
    migration: mig.Migration
    started: bool = False  # blocks allocated and every rank told to pull
    cancelled: bool = False  # aborted while reads were in flight: free once they settle
    # rank -> (state, error, safe to free) once that rank's part ended
    results: dict[int, tuple[str, str | None, bool]] = field(default_factory=dict)


class KVHandoff:
    def __init__(self, block_managers: list[BlockManager], executor, kv_spec: KVCacheSpec, park_timeout_s: float,
                 pull_timeout_s: float, engine_id: str | None = None):
        self.block_managers = block_managers  # one per data-parallel group
        self.executor = executor
        self.tp = executor.world_size // len(block_managers)
        self.kv_spec = kv_spec
        self.park_timeout_s = park_timeout_s
        self.pull_timeout_s = pull_timeout_s
        self.engine_id = engine_id or uuid.uuid4().hex
        self._endpoints: list[dict] | None = None
        self._keys = itertools.count(1)
        self.parked: dict[int, _Parked] = {}
        self.pulls: deque[_Pull] = deque()  # in admission order; head may wait for free blocks
        self.active_sources: set[tuple[str, int]] = set()  # (source engine, seq_id) being pulled
        self.num_reclaimed = 0
        self._used = False  # any rank's transfer agent exists

    def _rpc(self, method: str, *args) -> list:
        self._used = True
        return self.executor.collective_rpc(f"pd.{method}", *args)

    @property
    def endpoints(self) -> list[dict]:
        """Every rank's DLSlime endpoint info (their agents start on first use)."""
        if self._endpoints is None:
            self._endpoints = self._rpc("endpoint_info")
        return self._endpoints

    def source_info(self) -> dict:
        """What a decode engine's front checks a migration from this engine against (published in the
        control-plane registration): this engine's id and every rank's KV endpoint."""
        return {"engine_id": self.engine_id,
                "endpoints": [[e["agent_id"], e["host"], e["port"], ipc_digest(e.get("ipc"))] for e in self.endpoints]}

    # ---- prefill side ------------------------------------------------------------------------
    def park(self, seq: Sequence, model: str, first_logprobs=None) -> dict:
        """Keeps the prompt's blocks for a decode engine; returns DLRouter's kv_transfer_params."""
        seq_id = next(self._keys)
        dp = seq.dp_rank
        block_ids = seq.block_table[:self.block_managers[dp].blocks_needed(seq.num_prompt_tokens)]
        endpoints = self.endpoints
        out = self._rpc("stage_out", seq_id, block_ids, dp)[dp * self.tp:(dp + 1) * self.tp]
        if any(o is None for o in out):
            self._rpc("release", seq_id)
            raise RuntimeError("KV staging area full")
        self.parked[seq_id] = _Parked(seq, time.monotonic() + self.park_timeout_s)
        # every rank staged: DLSlime pullers read the staging slots; else only what reads the pool (IPC) can pull
        staged = all(o[1] for o in out)
        remote = [o[0] for o in out]
        m = mig.Migration(version=mig.VERSION, engine_id=self.engine_id, seq_id=seq_id, transfer=endpoints,
                          kv_spec=self.kv_spec, block_ids=[list(block_ids)] * self.tp,
                          staged_block_ids=remote if staged else None, dp_rank=dp,
                          prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
                          first_token=seq.token_ids[seq.num_prompt_tokens], first_logprobs=first_logprobs,
                          params=seq.params, sampling_seed=seq.sampling_seed, model=model,
                          # where the images sit (the decode side's rope follows from them), not their pixels or
                          # embeddings: those would make the migration megabytes per image
                          images=[msgspec.structs.replace(i, pixels=b"", embedding=b"") for i in seq.images])
        return {"migration": mig.encode(m), "first_token": m.first_token, "seq_id": seq_id}

    def free(self, seq_ids) -> int:
        """Releases parked KV (idempotent: unknown or already freed ids are fine)."""
        freed = 0
        for seq_id in seq_ids:
            parked = self.parked.pop(seq_id, None) if isinstance(seq_id, int) else None
            if parked is not None:
                self._release(seq_id, parked)
                freed += 1
        return freed

    def _release(self, seq_id: int, parked: _Parked) -> None:
        self._rpc("release", seq_id)
        self.block_managers[parked.seq.dp_rank].free(parked.seq)

    def reclaim_expired(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        expired = [k for k, p in self.parked.items() if p.deadline <= now]
        for k in expired:
            log.warning("reclaiming KV of seq_id %d: not freed within %.0fs", k, self.park_timeout_s)
            self._release(k, self.parked.pop(k))
        self.num_reclaimed += len(expired)
        return len(expired)

    # ---- decode side -------------------------------------------------------------------------
    def parse(self, kv_transfer_params: dict) -> mig.Migration:
        m = mig.decode(kv_transfer_params.get("migration"))
        if m.tensor_parallel_size != self.tp:
            raise InvalidRequestError(
                f"the migration comes from an engine with tensor_parallel_size {m.tensor_parallel_size}; this "
                f"engine has {self.tp}, and KV is not re-sharded: pair engines of the same size",
                param="kv_transfer_params")
        if m.kv_spec != self.kv_spec:
            raise InvalidRequestError(f"migration KV layout {m.kv_spec} does not match this engine's {self.kv_spec}",
                                      param="kv_transfer_params")
        if (m.engine_id, m.seq_id) in self.active_sources:
            raise InvalidRequestError(f"seq_id {m.seq_id} of engine {m.engine_id} is already being pulled",
                                      param="kv_transfer_params")
        return m

    def admit(self, seq: Sequence, m: mig.Migration) -> None:
        self.active_sources.add((m.engine_id, m.seq_id))
        self.pulls.append(_Pull(next(self._keys), seq, m))

    def poll(self) -> tuple[list[tuple[Sequence, object]], list[tuple[Sequence, str]]]:
        """Starts pulls that now have blocks, advances running ones. Returns ((sequence whose KV has landed,
        its first token's logprobs or None), (sequence, error) of failed ones)."""
        waiting_for_blocks: set[int] = set()  # DP groups whose pool is short: their later pulls wait too
        for pull in self.pulls:
            if pull.started:
                continue
            dp = pull.seq.dp_rank
            bm = self.block_managers[dp]
            n = len(pull.migration.block_ids[0])
            if dp in waiting_for_blocks or n > bm.num_free_blocks:
                waiting_for_blocks.add(dp)  # admit in order
                continue
            pull.seq.block_table = bm.allocate_blocks(n)
            self._rpc("start_pull", pull.key, pull.migration.source_peers(), pull.migration.block_ids,
                      pull.seq.block_table, self.pull_timeout_s, dp, pull.migration.staged_block_ids)
            pull.started = True
        started = {p.key: p for p in self.pulls if p.started}
        if not started:
            return [], []
        for rank, ended in enumerate(self._rpc("poll", list(started))):
            for key, state, error, safe in ended:
                started[key].results[rank] = (state, error, safe)
        ready, failed = [], []
        for pull in list(started.values()):
            if len(pull.results) < self.tp:  # every rank of the sequence's DP group
                continue
            seq = pull.seq
            states = [r[0] for r in pull.results.values()]
            if all(s == "done" for s in states) and not pull.cancelled:
                self._finish_pull(pull, safe=True, keep_blocks=True)
                seq.num_computed_tokens = seq.num_prompt_tokens
                ready.append((seq, pull.migration.first_logprobs))
                continue
            self._finish_pull(pull, safe=all(r[2] for r in pull.results.values()))
            if not pull.cancelled:
                state, error, _ = next(r for r in pull.results.values() if r[0] != "done")
                failed.append((seq, f"KV transfer {state}: {error}"))
        return ready, failed

    def cancel(self, seq: Sequence) -> bool:
        """The request was aborted: drop its pull (blocks are freed once no read can land in them)."""
        for pull in self.pulls:
            if pull.seq is seq:
                if not pull.started:
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
            self.block_managers[pull.seq.dp_rank].free(pull.seq)
        else:  # a late write may still land there: never hand these blocks to anyone again
            log.error("quarantining %d KV blocks of %s after an abandoned pull", len(pull.seq.block_table),
                      pull.seq.seq_id)

    def metrics(self) -> dict:
        """Pull counters summed over the ranks (zero until the first transfer)."""
        if not self._used:
            return {"kv_transfers": 0, "kv_transfers_failed": 0, "kv_transfer_bytes": 0, "kv_transfer_ms": 0.0}
        per_rank = self._rpc("metrics")
        # a pull counts once (rank 0's count); bytes add up over the ranks; time is the slowest rank's
        return {"kv_transfers": int(per_rank[0][0]), "kv_transfers_failed": int(per_rank[0][1]),
                "kv_transfer_bytes": int(sum(m[2] for m in per_rank)),
                "kv_transfer_ms": float(max(m[3] for m in per_rank))}

    @property
    def busy(self) -> bool:
        return bool(self.parked or self.pulls)

    def seconds_until_work(self) -> float:
        """Pulls are polled every PULL_POLL_S; parked KV needs a step at its reclaim deadline; inf: nothing."""
        if self.pulls:
            return PULL_POLL_S
        if self.parked:
            return max(0.0, min(p.deadline for p in self.parked.values()) - time.monotonic())
        return float("inf")

    def close(self) -> None:
        for k in list(self.parked):
            self._release(k, self.parked.pop(k))
        if self._used:
            self._rpc("close")
