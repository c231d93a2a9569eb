"""Sampling with no host sync, in one pass over the logits (in column chunks, then a small merge):
per row, argmax of logit/T + Gumbel noise derived from the same (seed, step, token id) hash as
engine.sampling.sampler.random_uniform (the row's key is hashed in the kernel too). Reads the logits in the
model's dtype, widening in registers. Used for rows without top-k / top-p / min-p filters; a row's
draw depends on its own seed and step only."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _lg2(x):
    # one MUFU instruction (rel. error ~2^-22); tl.log is libdevice's logf, ~20 instructions, and two of
    # those per column made the kernel compute-bound at a fifth of the bandwidth
    return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, seeds_ptr, steps_ptr, temp_ptr, part_val_ptr, part_idx_ptr, V, stride_l,
                          CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # one program per (row, CHUNK columns): a row alone is one SM streaming 300 KB, so at batch 128 the
    # single-pass kernel ran at a sixth of the bandwidth; the per-chunk maxima are merged below
    r, chunk = tl.program_id(0), tl.program_id(1)
    # engine.sampling.sampler.row_hash in uint32 arithmetic (wrapping multiplies)
    seed = tl.load(seeds_ptr + r)
    lo, hi = (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    step = (tl.load(steps_ptr + r) & 0xFFFFFFFF).to(tl.uint32)
    row = _hash32(_hash32(lo ^ _hash32(hi + 0x9E3779B9)) + step * 0x632BE5AB)
    t = tl.load(temp_ptr + r)
    greedy = t <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / t)
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32)
    for v0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(logits_ptr + r * stride_l + cols, mask=mask, other=float("-inf")).to(tl.float32)
        c = cols.to(tl.uint32)
        bits = _hash32(row ^ _hash32(c * 0x27D4EB2F + 0x165667B1))
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # < 1 always: see random_uniform
        # argmax p_i / E_i with E_i = -log u_i  ==  argmax x_i / T - log(E_i)
        score = tl.where(greedy, x, x * inv_t - LN2 * _lg2(-LN2 * _lg2(u)))
        score = tl.where(mask, score, float("-inf"))
        better = score > best_val
        best_idx = tl.where(better, cols, best_idx)
        best_val = tl.where(better, score, best_val)
    m = tl.max(best_val, 0)
    # lowest index among the maxima, as torch.argmax picks
    idx = tl.min(tl.where(best_val == m, best_idx, 2147483647), 0)
    tl.store(part_val_ptr + r * tl.num_programs(1) + chunk, m)
    tl.store(part_idx_ptr + r * tl.num_programs(1) + chunk, idx)


@triton.jit
def _argmax_merge_kernel(part_val_ptr, part_idx_ptr, out_ptr, S, BLOCK_S: tl.constexpr):
    r = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    val = tl.load(part_val_ptr + r * S + s, mask=s < S, other=float("-inf"))
    idx = tl.load(part_idx_ptr + r * S + s, mask=s < S, other=2147483647)
    m = tl.max(val, 0)
    # chunks hold increasing columns, so the lowest index among equal maxima is still torch.argmax's pick
    tl.store(out_ptr + r, tl.min(tl.where(val == m, idx, 2147483647), 0).to(tl.int64))


CHUNK = 8192  # columns per program: 19 programs per row for Qwen's 151,936-token vocabulary


def gumbel_sample(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                  temperature: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (any float dtype); seeds, steps [B] int64 (see engine.sampling.sampler.row_hash);
    temperature [B] float32 (<= 0: greedy). Returns token ids [B] int64."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B:
        S = triton.cdiv(V, CHUNK)
        part_val = torch.empty((B, S), dtype=torch.float32, device=logits.device)
        part_idx = torch.empty((B, S), dtype=torch.int32, device=logits.device)
        _gumbel_argmax_kernel[(B, S)](logits, seeds, steps, temperature, part_val, part_idx, V, logits.stride(0),
                                      CHUNK=CHUNK, BLOCK=1024, num_warps=4)
        _argmax_merge_kernel[(B,)](part_val, part_idx, out, S, BLOCK_S=triton.next_power_of_2(S), num_warps=1)
    return out
