"""FP8 (E4M3) KV cache through the torch reference path (CPU): quantised store, dequantised attention,
pool sizing, and an engine run whose logits stay close to the full-precision KV cache's.
(GPU kernels with FP8 KV are compared with this reference in test_kernels_gpu.py.)"""
from __future__ import annotations

import numpy as np
import torch

from engine.kv.spec import KVCacheSpec, kv_cache_dtype
from engine.sampling_params import SamplingParams
from kernels.attention import AttentionMetadata, TorchAttentionBackend
from kernels.attention.torch_ref import quantize_kv

FP8 = torch.float8_e4m3fn


def test_kv_cache_dtype_and_pool_bytes():
    assert kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_dtype("fp8", torch.bfloat16) == FP8 == kv_cache_dtype("fp8_e4m3", torch.float32)
    bf16, fp8 = KVCacheSpec(28, 8, 128, 16, "bfloat16"), KVCacheSpec(28, 8, 128, 16, "float8_e4m3fn")
    assert bf16.bytes_per_token == 114688 and fp8.bytes_per_token == 57344


def test_quantize_saturates_and_rounds_within_e4m3_precision():
    x = torch.randn(4096) * 3
    x[:3] = torch.tensor([1000.0, -1000.0, 0.0])
    q = quantize_kv(x, FP8, scale=0.5).float() * 0.5
    assert q[0] == 448 * 0.5 and q[1] == -448 * 0.5 and q[2] == 0  # saturated, never NaN
    rel = ((q[3:] - x[3:]).abs() / x[3:].abs().clamp_min(0.5 * 2 ** -6))
    assert rel.max() <= 2 ** -4 + 1e-6  # 3 mantissa bits: half an ulp is 1/16 relative


def _batch(kv_dtype):
    torch.manual_seed(0)
    bs, q_lens, ctx = 16, [5, 1, 12], [20, 40, 0]
    seq_lens = [c + q for c, q in zip(ctx, q_lens)]
    tables = [[0, 1], [2, 3, 4], [5]]
    bt = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    slots = [t[p // bs] * bs + p % bs for t, c, n in zip(tables, ctx, seq_lens) for p in range(c, n)]
    cache = torch.randn(8, 2, bs, 2, 32).to(kv_dtype)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), cu_seqlens_q=torch.tensor([0, 5, 6, 18], dtype=torch.int32),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=bt, max_seqlen_q=12,
                             max_seqlen_k=41, block_size=bs)
    return cache, meta


def test_fp8_attention_close_to_full_precision():
    ref_cache, meta = _batch(torch.float32)
    fp8_cache = quantize_kv(ref_cache, FP8, 0.5)
    ref_cache = fp8_cache.float() * 0.5  # same context values in both caches: only new tokens differ
    q, k, v = torch.randn(18, 4, 32), torch.randn(18, 2, 32), torch.randn(18, 2, 32)
    out = TorchAttentionBackend().forward(q, k, v, fp8_cache, meta, 32 ** -0.5, k_scale=0.5, v_scale=0.5)
    expected = TorchAttentionBackend().forward(q, k, v, ref_cache, meta, 32 ** -0.5)
    err = float((out - expected).norm() / expected.norm())
    assert err < 3e-2, err
    # the new tokens were written quantised
    b, o = meta.slot_mapping // 16, meta.slot_mapping % 16
    assert torch.equal(fp8_cache[:, 0][b, o].view(torch.uint8), quantize_kv(k, FP8, 0.5).view(torch.uint8))


def test_engine_fp8_kv_cpu_logprobs_close(tiny_models):
    from engine.llm import LLM
    prompts = [list(range(5, 60)), [7, 8, 9]]
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(str(tiny_models["qwen3"]), dtype="float32", device="cpu", kv_cache_dtype=kv, num_kv_blocks=32)
        assert llm.engine.runner.kv_pool.dtype == (FP8 if kv == "fp8" else torch.float32)
        runs[kv] = llm.generate(prompts, params)
    for a, b in zip(runs["auto"], runs["fp8"]):
        la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        top_a = np.array(sorted(v.logprob for v in la.values()))
        top_b = np.array(sorted(v.logprob for v in lb.values()))
        # tolerance for the tiny random model (initializer_range 0.2, so large activations)
        assert np.abs(top_a - top_b).max() < 0.5, (top_a, top_b)
