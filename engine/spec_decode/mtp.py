"""MTP drafting (DeepSeek-V3 / Kimi-K2): the checkpoint's next-token-prediction module proposes k tokens after
each sampled sequence's last kept token.

The module at position i reads (token i + 1, the main model's hidden state at i) and predicts token i + 2.
Every step runs it over the step's tokens, which writes its latent KV layer for every fed position; the first
draft is read at the position of the last kept token's prediction. For k > 1 the module is chained, as vLLM
and DeepSeek's reference do: draft j + 1 comes from (draft j, the module's own hidden state for draft j) one
position further on, with the module's KV written there; the scheduler reserves those k - 1 lookahead slots
(engine/core/scheduler.py), and the next step writes the true KV over them. Drafts are greedy: any draft
keeps the output exact (verification, engine/spec_decode/verify.py), better ones keep more. Under CUDA graphs
the module replays a graph of its own for every bucket of the target's (engine/worker/cuda_graph.py): over a
replayed step in that step's rows, and for each link of a chain in a decode bucket."""
from __future__ import annotations

import numpy as np
import torch

from engine.worker.cuda_graph import GraphInputs, GraphStep
from engine.worker.host_copy import to_device
from engine.worker.input_batch import StepBatch, prepare_host


class MTPDrafter:
    def __init__(self, runner, num_drafts: int):
        self.runner, self.k = runner, num_drafts

    def draft(self, batch: StepBatch, x, hidden: torch.Tensor, sampled: torch.Tensor,
              block_tables: list[list[int]], graph_step: GraphStep | None = None) -> torch.Tensor | None:
        """The module over the step's tokens (every rank: it writes the module's KV layer), then each sampled
        sequence's k drafts [S, k] on rank 0 (-1 past where a chain had no KV slot), None when nothing was
        sampled. Position i reads the token after it: the next fed token, the next prompt token (a chunk's
        end), or the step's sample at the last position it keeps; a draft is read at that last kept position.
        After a replayed step (`graph_step`) the module replays its graph of the same bucket, in its rows."""
        r = self.runner
        fed, ends = batch.token_ids, x.host.qo_indptr[1:].astype(np.int64)
        next_ids = np.zeros(len(fed), np.int64)  # a row's positions after its last kept one: rejected, any token
        next_ids[:-1] = fed[1:]
        chunks = ~batch.samples
        if chunks.any():
            after = batch.next_ids if batch.next_ids is not None else np.full(len(ends), -1, np.int64)
            next_ids[ends[chunks] - 1] = np.maximum(after[chunks], 0)
        seq_rows = np.flatnonzero(batch.samples)
        k = (batch.spec_lens if batch.spec_lens is not None else np.zeros(len(ends), np.int64))[seq_rows]
        first = ends[seq_rows] - 1 - k  # each sampled sequence's last token before its drafts
        # which drafts the step keeps is decided on the device, so the module follows the sampler without a sync:
        # the samples' rows [S, K + 1] (1 + k a sequence, clamped to its own) and its drafts [S, K] (-1 past its k)
        K = int(k.max()) if len(k) else 0
        j = np.arange(K + 1)
        sample_idx = (np.cumsum(1 + k) - (1 + k))[:, None] + np.minimum(j[None, :], k[:, None])
        drafts = np.where(j[None, :K] < k[:, None], fed[np.minimum(first[:, None] + 1 + j[None, :K], len(fed) - 1)], -1)
        index = graph_step.index if graph_step is not None else np.zeros(0, np.int64)
        next_dev, sample_idx, drafts, last, index = to_device([next_ids, sample_idx, drafts, first, index], np.int64,
                                                              r.device)
        if len(seq_rows):
            samples = sampled[sample_idx]  # [S, K + 1]
            kept = (samples[:, :K] == drafts).long().cumprod(dim=1).sum(dim=1)  # as verify.accepted_tokens
            last = last + kept  # the position of the last kept token's prediction: it reads that token
            next_dev[last] = samples.gather(1, kept[:, None])[:, 0]
        if graph_step is not None:
            h = r.graphs.run_mtp(graph_step, next_dev, index)
            rows = index[last]
        else:
            h, rows = self._eager(x, next_dev, hidden), last
        if not len(seq_rows):
            return None
        h = h[rows]
        d = self._greedy(h, len(seq_rows))
        out = torch.full((len(seq_rows), self.k), -1, dtype=torch.int64, device=h.device)
        out[:, 0] = d
        if self.k > 1:  # the chain's host inputs need the kept positions: a sync
            last_pos = x.positions[first + kept.cpu().numpy()]
            self._chain(out, d, h, last_pos, [block_tables[i] for i in seq_rows.tolist()])
        return out if r.parallel.is_driver else None

    def _greedy(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """The module's argmax tokens for hidden states h; on every rank when a chain feeds them back."""
        r = self.runner
        logits = r.model.mtp_logits(h)
        d = logits.argmax(dim=-1) if logits is not None else torch.empty(n, dtype=torch.int64, device=h.device)
        if self.k > 1:
            p = r.parallel
            if p.is_first:
                p.broadcast_from_driver(d)
            p.broadcast_from_first(d)
        return d

    def _chain(self, out: torch.Tensor, d: torch.Tensor, h: torch.Tensor, last_pos: np.ndarray,
               tables: list[list[int]]) -> None:
        """Drafts 2..k: one decode-shaped step of the module per draft, over the sequences that still have a
        reserved slot (and rope positions) for it."""
        r = self.runner
        bs = r.config.block_size
        live = np.arange(len(tables))
        # positions with a KV slot: the sequence's blocks (lookahead included), within the rope's max_model_len
        capacity = np.minimum(np.array([len(t) * bs for t in tables]), r.max_model_len)
        for j in range(1, self.k):
            pos = last_pos[live] + j
            room = pos < capacity[live]
            if not room.all():
                keep = torch.from_numpy(np.flatnonzero(room)).to(h.device)
                live, pos, d, h = live[room], pos[room], d[keep], h[keep]
            if len(live) == 0:
                return
            n = len(live)
            step = StepBatch(num_computed=pos, num_new=np.ones(n, np.int64), pending_rows=np.full(n, -1, np.int64),
                             samples=np.ones(n, bool), token_ids=np.zeros(n, np.int64))
            xj = prepare_host(step, [tables[i] for i in live.tolist()], bs, r.backend.needs_block_tables)
            h = self._link(xj, d, h)
            d = self._greedy(h, n)
            out[torch.from_numpy(live).to(out.device), j] = d

    def _link(self, x, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One decode-shaped step of the module: a graph replay where a decode bucket holds it."""
        r = self.runner
        if r.graphs is not None:
            out = r.graphs.run_mtp_decode(GraphInputs(x.input_ids, x.positions, x.slot_mapping, x.host,
                                                      x.block_tables), ids, h)
            if out is not None:
                return out
        return self._eager(x, ids, h)

    def _eager(self, x, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The module over x's positions, eagerly: token `ids` (on the device) and the hidden states it reads."""
        r = self.runner
        dev_ids, positions, meta, _ = r._device_inputs(x)
        meta.plan = r.backend.plan(meta)
        dev_ids.copy_(ids)
        return r.model.mtp_hidden(dev_ids, positions, hidden, meta)
