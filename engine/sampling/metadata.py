"""The sampler's per-step tensors (SamplingMetadata) from the sampled sequences: temperatures, top-k/p/min-p,
seeds and output indices, penalty inputs and min-token masks, each group in one pinned host->device copy."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from engine.sampling.sampler import SamplingMetadata
from engine.worker.host_copy import to_device


def sampling_metadata(seqs, stop_ids_of, vocab_size: int, device: torch.device,
                      prev_tokens: torch.Tensor | None = None) -> SamplingMetadata:
    """`prev_tokens`: the samples of the step in flight (its tokens count for the penalties)."""
    V = vocab_size
    params = [s.params for s in seqs]
    floats = np.array([[0.0 if p.greedy else p.temperature for p in params], [p.top_p for p in params],
                       [p.min_p for p in params]], np.float32)
    ints = np.array([[p.top_k if p.top_k > 0 else V for p in params], [s.sampling_seed for s in seqs],
                     [s.next_output_index for s in seqs]], np.int64)
    (f,), (i,) = to_device([floats], np.float32, device), to_device([ints], np.int64, device)
    m = SamplingMetadata(
        temperature=f[0], top_p=f[1], min_p=f[2], top_k=i[0], seeds=i[1], steps=i[2],
        all_greedy=all(p.greedy for p in params),
        need_top_k=any(0 < p.top_k < V for p in params),
        need_top_p=any(p.top_p < 1.0 for p in params),
        need_min_p=any(p.min_p > 0.0 for p in params))
    if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
        m.repetition_penalty, m.presence_penalty, m.frequency_penalty, m.prompt_mask, m.output_counts = \
            _penalty_inputs(seqs, V, device, prev_tokens)
    rows, toks = [], []
    for r, s in enumerate(seqs):
        if s.next_output_index < s.params.min_tokens:
            ids = stop_ids_of(s)
            rows.extend([r] * len(ids))
            toks.extend(ids)
    if rows:
        m.min_tokens_mask = tuple(to_device([np.array(rows, np.int64), np.array(toks, np.int64)], np.int64, device))
    biased = [(r, t, b) for r, p in enumerate(params) if p.logit_bias for t, b in p.logit_bias.items()]
    if biased:
        rows, toks, bias = zip(*biased)
        m.logit_bias = (*to_device([np.array(rows, np.int64), np.array(toks, np.int64)], np.int64, device),
                        *to_device([np.array(bias, np.float32)], np.float32, device))
    constrained = [(r, s.grammar) for r, s in enumerate(seqs) if s.grammar is not None]
    if constrained:  # the matchers are up to date: the core reads a constrained row's tokens back every step
        from engine.structured.grammar import step_bitmask
        (m.token_bitmask,) = to_device([step_bitmask(constrained, len(seqs), V)], np.int32, device)
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    m.max_num_logprobs = max(wanted) if wanted else None
    return m


def _penalty_inputs(seqs, vocab_size: int, device: torch.device, prev_tokens: torch.Tensor | None):
    """Repetition / presence / frequency penalties of the rows, each prompt's token mask and each
    output's token counts [B, V]. The (row, token) pairs are built on the host in one pass and go to
    the device in one pinned copy: no per-row copies or launches. A token still in flight counts too
    (read from the previous step's samples on the device)."""
    B, chain = len(seqs), itertools.chain.from_iterable
    params = [s.params for s in seqs]
    weights = np.array([[p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                        [p.frequency_penalty for p in params]], np.float32)
    n_prompt = np.fromiter((s.num_prompt_tokens for s in seqs), np.int64, B)
    n_out = np.fromiter((s.num_output_tokens for s in seqs), np.int64, B)
    flight = np.array([(r, s.pending_row) for r, s in enumerate(seqs) if s.num_pending_tokens], np.int64).reshape(-1, 2)
    (w,) = to_device([weights], np.float32, device)
    prompt_rows, prompt_ids, out_rows, out_ids, flight_rows, flight_src = to_device([
        np.repeat(np.arange(B), n_prompt),
        np.fromiter(chain(s.token_ids[:s.num_prompt_tokens] for s in seqs), np.int64, int(n_prompt.sum())),
        np.repeat(np.arange(B), n_out),
        np.fromiter(chain(s.output_token_ids for s in seqs), np.int64, int(n_out.sum())),
        flight[:, 0], flight[:, 1]], np.int64, device)
    prompt_mask = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
    prompt_mask[prompt_rows, prompt_ids] = True
    counts = torch.zeros(B, vocab_size, dtype=torch.int32, device=device)
    counts.index_put_((out_rows, out_ids), torch.ones_like(out_rows, dtype=torch.int32), accumulate=True)
    if len(flight):
        counts.index_put_((flight_rows, prev_tokens[flight_src]), torch.ones_like(flight_rows, dtype=torch.int32),
                          accumulate=True)
    return w[0], w[1], w[2], prompt_mask, counts
