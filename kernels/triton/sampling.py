"""Sampling in one pass over the logits with no host sync: per row, argmax of logit/T + Gumbel noise
derived from the same (seed, step, token id) hash as engine.sampler.random_uniform (the row's key is
hashed in the kernel too). Reads the logits in the model's dtype, widening in registers. Used for rows
without top-k / top-p / min-p filters; a row's draw depends on its own seed and step only."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, seeds_ptr, steps_ptr, temp_ptr, out_ptr, V, stride_l, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    # engine.sampler.row_hash in uint32 arithmetic (wrapping multiplies)
    seed = tl.load(seeds_ptr + r)
    lo, hi = (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    step = (tl.load(steps_ptr + r) & 0xFFFFFFFF).to(tl.uint32)
    row = _hash32(_hash32(lo ^ _hash32(hi + 0x9E3779B9)) + step * 0x632BE5AB)
    t = tl.load(temp_ptr + r)
    greedy = t <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / t)
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(logits_ptr + r * stride_l + cols, mask=mask, other=float("-inf")).to(tl.float32)
        c = cols.to(tl.uint32)
        bits = _hash32(row ^ _hash32(c * 0x27D4EB2F + 0x165667B1))
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        # argmax p_i / E_i with E_i = -log u_i  ==  argmax x_i / T - log(E_i)
        score = tl.where(greedy, x, x * inv_t - tl.log(-tl.log(u)))
        score = tl.where(mask, score, float("-inf"))
        better = score > best_val
        best_idx = tl.where(better, cols, best_idx)
        best_val = tl.where(better, score, best_val)
    m = tl.max(best_val, 0)
    # lowest index among the maxima, as torch.argmax picks
    idx = tl.min(tl.where(best_val == m, best_idx, 2147483647), 0)
    tl.store(out_ptr + r, idx.to(tl.int64))


def gumbel_sample(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                  temperature: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (any float dtype); seeds, steps [B] int64 (see engine.sampler.row_hash);
    temperature [B] float32 (<= 0: greedy). Returns token ids [B] int64."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B:
        _gumbel_argmax_kernel[(B,)](logits, seeds, steps, temperature, out, V, logits.stride(0), BLOCK=2048,
                                    num_warps=8)
    return out
