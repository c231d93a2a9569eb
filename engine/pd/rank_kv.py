"""RankKV: one rank's side of prefill/decode hand-offs. It owns the rank's DLSlime agent over its own KV pool
(each tensor-parallel rank moves its own shard, rank to rank), the blocks it staged out for parked requests,
and the pulls it runs for migrated ones. The engine core's KVHandoff drives every rank's RankKV through the
executor and combines their answers; a rank never decides alone whether a request's KV is complete."""
from __future__ import annotations

import torch

from engine.pd.ranges import TransferError

REJECTED = "rejected"  # a pull refused before any byte moved (bad ids, layout, peer info)


class RankKV:
    def __init__(self, rank: int, host: str, staging_bytes: int, dp_rank: int = 0, tp_rank: int | None = None,
                 transport: str = "auto"):
        self.rank, self.host, self.staging_bytes, self.transport = rank, host, staging_bytes, transport
        # the handoff addresses one data-parallel group; the ranks of the others skip its calls
        self.dp_rank, self.tp_rank = dp_rank, rank if tp_rank is None else tp_rank
        self.pool: torch.Tensor | None = None
        self._agent = None
        self.staged: dict[int, object] = {}  # park key -> StagedBlocks
        self.pulls: dict[int, object] = {}  # pull key -> PullTransfer, or a refusal (error string)

    def bind(self, pool: torch.Tensor) -> None:
        self.pool = pool

    @property
    def agent(self):
        """The transfer agent serving/pulling this rank's pool, created on first use."""
        if self._agent is None:
            from engine.pd.transfer import KVTransferAgent
            # the PyPI dlslime has no CUDA: a GPU pool is served through a pinned host area
            block_bytes = self.pool[0].numel() * self.pool.element_size()
            staging = (min(self.pool.shape[0], max(1, self.staging_bytes // block_bytes)) if self.pool.is_cuda
                       else 0)
            self._agent = KVTransferAgent(self.pool, host=self.host, transport=self.transport,
                                          staging_blocks=staging)
        return self._agent

    def endpoint_info(self) -> dict:
        return self.agent.endpoint_info()

    # ---- prefill side ------------------------------------------------------------------------
    def stage_out(self, key: int, block_ids: list[int], dp: int = 0) -> tuple[list[int], bool] | None:
        """Makes the blocks pullable; returns (the ids a DLSlime peer reads, whether they are staging slots rather
        than the pool blocks themselves). None: the staging area is full and nothing else can serve them, or this
        rank is not in DP group `dp`."""
        if dp != self.dp_rank:
            return None
        staged = self.agent.stage_out(block_ids)
        if staged is None:
            return None
        self.staged[key] = staged
        return list(staged.remote_ids), staged.staged

    def release(self, key: int) -> None:
        """Idempotent: unknown keys are fine (a rank whose staging was full never held one)."""
        staged = self.staged.pop(key, None)
        if staged is not None:
            self.agent.release(staged)

    # ---- decode side -------------------------------------------------------------------------
    def start_pull(self, key: int, peers: list[dict], remote_ids: list[list[int]], local_ids: list[int],
                   timeout_s: float, dp: int = 0, staged_ids: list[list[int]] | None = None) -> None:
        """DP group `dp`'s ranks pull their share: from the source rank of the same tensor-parallel index
        (`peers`: the source group's endpoints; `remote_ids`: its pool blocks, `staged_ids`: where it staged
        them for DLSlime reads). The agent picks the transport. A refusal is kept as the pull's result."""
        if dp != self.dp_rank:
            return
        try:
            staged = None if staged_ids is None else staged_ids[self.tp_rank]
            self.pulls[key] = self.agent.start_pull(peers[self.tp_rank], remote_ids[self.tp_rank], local_ids,
                                                    timeout_s=timeout_s, staged_block_ids=staged)
        except (TransferError, KeyError, TypeError, ValueError, IndexError) as e:
            self.pulls[key] = str(e)

    def poll(self, keys: list[int]) -> list[tuple[int, str, str | None, bool]]:
        """(key, state, error, safe to free) of the given pulls that ended; they are forgotten here."""
        from engine.pd.transfer import TERMINAL
        done = []
        for key in keys:
            pull = self.pulls.get(key)
            if pull is None:
                continue
            if isinstance(pull, str):
                done.append((key, REJECTED, pull, True))
            else:
                state = pull.poll()
                if state not in TERMINAL:
                    continue
                done.append((key, state.value, pull.error, pull.safe_to_free))
            del self.pulls[key]
        return done

    def metrics(self) -> list[float]:
        """[finished pulls, failed or timed out, bytes, ms] of this rank's agent."""
        if self._agent is None:
            return [0, 0, 0, 0.0]
        m = self._agent.metrics()
        return [m.transfers + m.failed + m.timed_out, m.failed + m.timed_out, m.bytes, m.ms]

    def close(self) -> None:
        for key in list(self.staged):
            self.release(key)
        if self._agent is not None:
            self._agent.close()
