"""Sampler: penalties, temperature, top-k / top-p / min-p and logprobs, vectorised over the batch.

On CUDA, rows without top-k / top-p / min-p are drawn by one fused Triton pass (no [B, V] noise tensor).
Randomness is a pure function of (request seed, output index, token id), hashed on the device:
a seeded request draws the same tokens whatever else is in the batch, after a preemption, and on
another engine that continues it (prefill -> decode migration), with no host sync and no
per-request generator objects.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.triton import use_triton

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] float32; 0 = greedy
    top_k: torch.Tensor  # [B] int64; vocab size when disabled
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64: index of the output token being drawn
    all_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    # penalties (None when no row has any)
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None  # [B, V] bool: token occurs in the prompt
    output_counts: torch.Tensor | None = None  # [B, V] int: occurrences in the output so far
    # token ids masked out until a row reaches min_tokens: (row indices, token ids)
    min_tokens_mask: tuple[torch.Tensor, torch.Tensor] | None = None
    max_num_logprobs: int | None = None  # top-N logprobs wanted by some row (None: none)
    # structured outputs: [B, ceil(V/32)] int32, bit j of word w allows token 32w + j (None: no row constrained)
    token_bitmask: torch.Tensor | None = None
    # logit_bias: (row indices, token ids, float32 biases) added to the logits
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32: logprob of the sampled token
    ranks: torch.Tensor | None = None  # [B] int64: 1 = most likely
    top_ids: torch.Tensor | None = None  # [B, N]
    top_logprobs: torch.Tensor | None = None  # [B, N]
    # speculative decoding by MTP: each sampled sequence's draft for the next step (the runner adds it)
    draft_ids: torch.Tensor | None = None  # [S] int64


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on uint32 values held in int64 (int64 wraps; the low 32 bits stay exact)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def row_hash(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B] uint32 values (in int64): the per-row key of (seed, step) that token ids are hashed with."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    return _hash32(_hash32(lo ^ _hash32(hi + 0x9E3779B9)) + steps * 0x632BE5AB)


def random_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1), a deterministic function of (seed, step, token id)."""
    row = row_hash(seeds, steps)
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32(row[:, None] ^ _hash32(cols * 0x27D4EB2F + 0x165667B1)[None, :])
    # 23 bits: k + 0.5 is exact in float32 for k < 2^23, so u < 1 always (with 24 bits the top value rounds to
    # 1.0, its noise -log(u) to 0, and that token would win the race whatever its probability)
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


def apply_penalties(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    if m.repetition_penalty is not None:
        seen = m.prompt_mask | (m.output_counts > 0)
        penalty = m.repetition_penalty[:, None]
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, scaled, logits)
    if m.frequency_penalty is not None:
        logits = logits - m.frequency_penalty[:, None] * m.output_counts
        logits = logits - m.presence_penalty[:, None] * (m.output_counts > 0)
    return logits


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Disallowed tokens get -inf: the packed bits are expanded on the device in one pass over [B, V] (the host
    only copies the packed words, V/8 bytes a row)."""
    B, V = logits.shape
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(B, -1)[:, :V].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def _filter_top_k_top_p(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if m.need_top_k:
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        drop |= ranks >= m.top_k[:, None]
    if m.need_top_p:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # keep a token while the mass before it is < top_p
        drop |= mass_before >= m.top_p[:, None]
        drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, m: SamplingMetadata) -> SamplerOutput:
    """logits [B, V] (the model's dtype) -> sampled token ids, with logprobs of the raw model
    distribution. Values are compared and transformed in float32 (widening is exact); the plain
    GPU path widens in registers instead of materialising a float32 copy."""
    out = SamplerOutput(token_ids=torch.empty(0))
    raw_logprobs = logits.float().log_softmax(dim=-1) if m.max_num_logprobs is not None else None

    if m.logit_bias is not None:
        rows, tokens, bias = m.logit_bias
        logits = logits.float().index_put((rows, tokens), bias, accumulate=True)
    if m.token_bitmask is not None:
        logits = apply_token_bitmask(logits, m.token_bitmask)
    if m.min_tokens_mask is not None:
        rows, tokens = m.min_tokens_mask
        logits = logits.index_put((rows, tokens), torch.tensor(float("-inf"), device=logits.device,
                                                                dtype=logits.dtype))
    if m.repetition_penalty is not None or m.frequency_penalty is not None:
        logits = apply_penalties(logits.float(), m)

    if m.all_greedy:
        out.token_ids = logits.argmax(dim=-1)
    elif not (m.need_min_p or m.need_top_k or m.need_top_p) and use_triton(logits):
        # one fused pass on the GPU: the same draw as below (Gumbel form of the exponential race)
        from kernels.triton.sampling import gumbel_sample
        out.token_ids = gumbel_sample(logits, m.seeds, m.steps, m.temperature)
    else:
        logits = logits.float()
        greedy_ids = logits.argmax(dim=-1)
        temperature = torch.where(m.temperature > 0, m.temperature, torch.ones_like(m.temperature))
        scaled = logits / temperature[:, None]
        if m.need_min_p:
            probs = scaled.softmax(dim=-1)
            keep = probs >= m.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            scaled = scaled.masked_fill(~keep, float("-inf"))
        if m.need_top_k or m.need_top_p:
            scaled = _filter_top_k_top_p(scaled, m)
        probs = scaled.softmax(dim=-1)
        # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i
        noise = -torch.log(random_uniform(m.seeds, m.steps, logits.shape[-1]))
        sampled = (probs / noise).argmax(dim=-1)
        out.token_ids = torch.where(m.temperature > 0, sampled, greedy_ids)

    if raw_logprobs is not None:
        chosen = raw_logprobs.gather(-1, out.token_ids[:, None])
        out.logprobs = chosen[:, 0]
        out.ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
        if m.max_num_logprobs > 0:
            out.top_logprobs, out.top_ids = raw_logprobs.topk(m.max_num_logprobs, dim=-1)
    return out
