"""Every fused GPU kernel and both GPU attention backends against the torch reference, on random inputs.
Needs CUDA + triton (and flashinfer for its backend); skipped on CPU-only machines."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from kernels.attention import AttentionMetadata, TorchAttentionBackend
from kernels.attention.metadata import host_meta_from_tables

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_GPU, reason="GPU kernel tests need CUDA and triton (CPU CI runs the "
                                                    "torch references through the engine tests)")
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
HAS_SM90 = HAS_GPU and torch.cuda.get_device_capability()[0] == 9
DEV = "cuda"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rms_norm_and_residual(dtype, tol):
    from kernels.norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
    x = torch.randn(37, 1024, device=DEV, dtype=dtype)
    r = torch.randn_like(x)
    w = torch.rand(1024, device=DEV, dtype=dtype) + 0.5
    assert rel_err(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)) < tol
    out, res = add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(res, ref_res) and rel_err(out, ref_out) < tol
    # per-head q/k norm on a strided view of a fused qkv output (Qwen3)
    qkv = torch.randn(37, 16 * 128 + 2 * 8 * 128, device=DEV, dtype=dtype)
    q = qkv[:, :16 * 128].view(-1, 16, 128)
    wq = torch.rand(128, device=DEV, dtype=dtype) + 0.5
    assert rel_err(rms_norm(q, wq, 1e-6), rms_norm_ref(q, wq, 1e-6)) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rope(dtype, tol):
    from kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin_cache
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device=DEV).float() / 128))
    cache = rope_cos_sin_cache(inv, 4096)
    qkv = torch.randn(50, (16 + 16) * 128, device=DEV, dtype=dtype)
    q, k = qkv[:, :2048].view(50, 16, 128), qkv[:, 2048:3072].view(50, 8, 128)
    pos = torch.randint(0, 4096, (50,), device=DEV)
    (q1, k1), (q2, k2) = apply_rope(q, k, pos, cache), apply_rope_ref(q, k, pos, cache)
    assert rel_err(q1, q2) < tol and rel_err(k1, k2) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_silu_and_mul(dtype, tol):
    from kernels.activation import silu_and_mul, silu_and_mul_ref
    x = torch.randn(33, 2 * 3072, device=DEV, dtype=dtype)
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x)) < tol


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_store_kv(kv_dtype):
    from kernels.attention.torch_ref import store_kv as ref_store
    from kernels.triton.kv_store import store_kv
    pool = torch.randn(40, 3, 2, 16, 8, 128, device=DEV).to(kv_dtype)  # [blocks, layers, 2, bs, kvh, d]
    qkv = torch.randn(70, 4096, device=DEV, dtype=torch.bfloat16)
    k, v = qkv[:, 2048:3072].view(70, 8, 128), qkv[:, 3072:].view(70, 8, 128)
    slots = torch.randperm(40 * 16, device=DEV)[:70]
    slots[::7] = -1  # padding rows write nothing
    a, b = pool.clone(), pool.clone()
    store_kv(k, v, a[:, 1], slots, 0.5, 2.0)
    ref_store(k, v, b[:, 1], slots, 0.5, 2.0)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def random_batch(q_lens, ctx_lens, block_size=16, num_blocks=256, kvh=8, d=128, dtype=torch.bfloat16,
                 kv_dtype=None, layers=2):
    """A ragged batch whose sequences already hold `ctx_lens` cached tokens (prefix cache / decode)."""
    kv_dtype = kv_dtype or dtype
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    perm = torch.randperm(num_blocks).tolist()
    tables, slots = [], []
    for n in seq_lens:
        pages = [perm.pop() for _ in range(-(-n // block_size))]
        tables.append(pages)
    width = max(len(t) for t in tables)
    bt = np.array([t + [0] * (width - len(t)) for t in tables], np.int32)
    for t, c, n in zip(tables, ctx_lens, seq_lens):
        slots += [t[p // block_size] * block_size + p % block_size for p in range(c, n)]
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    pool = (torch.randn(num_blocks, layers, 2, block_size, kvh, d, device=DEV) * 2).to(kv_dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEV), cu_seqlens_q=torch.tensor(cu, device=DEV),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV), block_tables=torch.tensor(bt, device=DEV),
        max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens), block_size=block_size,
        is_decode=all(q == 1 for q in q_lens))
    meta.host = host_meta_from_tables(cu, np.array(seq_lens), bt, block_size)
    return pool, meta


def _backend(name, kv_dtype, dtype):
    """`name`: triton, or flashinfer-<fp8_attention>."""
    from kernels.attention import AttentionShape, get_attention_backend
    name, _, fp8 = name.partition("-")
    b = get_attention_backend(name, torch.device(DEV), fp8_attention=fp8 or "auto")
    b.configure(AttentionShape(num_heads=16, num_kv_heads=8, head_dim=128, scale=128 ** -0.5, q_dtype=dtype,
                               kv_dtype=kv_dtype))
    return b


CASES = {"prefill": ([37, 5, 64], [0, 0, 0]), "prefix_cached": ([20, 3, 33], [48, 17, 100]),
         "decode": ([1] * 9, [0, 1, 15, 16, 17, 100, 255, 1000, 3]), "mixed": ([1, 1, 40], [50, 7, 16]),
         # one-token rows after a chunk, and a one-token prompt: only the leading row goes to decode
         "mixed_interleaved": ([1, 30, 1, 1], [20, 0, 300, 0])}
BACKENDS = ["triton"] + (["flashinfer-exact", "flashinfer-fp8"] if HAS_FLASHINFER else [])


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_attention_backend_matches_reference(backend, case, kv):
    if backend == "flashinfer-fp8" and not (kv == "fp8" and HAS_SM90):
        pytest.skip("FP8 attention math (XQA decode, FA3 FP8 prefill) runs FP8 pages on Hopper (SM90) only")
    dtype = torch.bfloat16
    kv_dtype = torch.float8_e4m3fn if kv == "fp8" else dtype
    q_lens, ctx = CASES[case]
    pool, meta = random_batch(q_lens, ctx, kv_dtype=kv_dtype)
    T = sum(q_lens)
    q = torch.randn(T, 16, 128, device=DEV, dtype=dtype)
    qkv = torch.randn(T, 4096, device=DEV, dtype=dtype)
    k, v = qkv[:, 2048:3072].view(T, 8, 128), qkv[:, 3072:].view(T, 8, 128)
    scales = (0.5, 0.25) if kv == "fp8" else (1.0, 1.0)
    fast, ref = _backend(backend, kv_dtype, dtype), TorchAttentionBackend()
    a, b = pool.clone(), pool.clone()
    meta.plan = fast.plan(meta)
    out = fast.forward(q, k, v, a[:, 1], meta, 128 ** -0.5, *scales)
    expected = ref.forward(q.float(), k, v, b[:, 1], meta, 128 ** -0.5, *scales)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "KV store differs"
    # FP8 math rounds q and the softmax probabilities to E4M3 (2^-4 relative): ~3e-2
    assert rel_err(out, expected) < (5e-2 if backend == "flashinfer-fp8" else 2e-2)


def test_triton_attention_float32_exact():
    pool, meta = random_batch([9, 1, 30], [20, 40, 0], d=32, kvh=2, dtype=torch.float32)
    q = torch.randn(40, 4, 32, device=DEV)
    kv = torch.randn(40, 2, 2, 32, device=DEV)
    fast = _backend("triton", torch.float32, torch.float32)
    a, b = pool.clone(), pool.clone()
    out = fast.forward(q, kv[:, 0], kv[:, 1], a[:, 0], meta, 0.3)
    expected = TorchAttentionBackend().forward(q, kv[:, 0], kv[:, 1], b[:, 0], meta, 0.3)
    assert rel_err(out, expected) < 1e-5


def test_gumbel_sampling_matches_torch_path():
    from engine.sampling.sampler import SamplingMetadata, sample
    B, V = 64, 151936
    logits = torch.randn(B, V, device=DEV) * 3
    temp = torch.full((B,), 0.6, device=DEV)
    temp[::5] = 0.0
    m = SamplingMetadata(temperature=temp, top_k=torch.full((B,), V, device=DEV), top_p=torch.ones(B, device=DEV),
                         min_p=torch.zeros(B, device=DEV), seeds=torch.randint(0, 2 ** 62, (B,), device=DEV),
                         steps=torch.randint(0, 1000, (B,), device=DEV), all_greedy=False, need_top_k=False,
                         need_top_p=False, need_min_p=False)
    fast = sample(logits, m).token_ids
    m.need_min_p, m.min_p = True, torch.zeros(B, device=DEV)  # forces the torch path, same distribution
    ref = sample(logits, m).token_ids
    assert (fast == ref).float().mean() >= 0.95
    assert torch.equal(fast[::5], logits[::5].argmax(-1))
    # batch independence: a row's draw does not depend on its neighbours
    half = SamplingMetadata(**{**m.__dict__, "temperature": temp[:7], "seeds": m.seeds[:7], "steps": m.steps[:7],
                               "need_min_p": False, "min_p": m.min_p[:7], "top_k": m.top_k[:7], "top_p": m.top_p[:7]})
    assert torch.equal(sample(logits[:7], half).token_ids, fast[:7])


@pytest.mark.parametrize("kv", ["auto", "fp8"])
@pytest.mark.parametrize("splits", [None, 1, 4, 32])
def test_triton_decode_attention(kv, splits):
    """The GQA decode kernel (split or not) against the torch reference, ragged lengths incl. 1 token."""
    from kernels.attention.torch_ref import paged_attention as ref
    from kernels.triton.decode_attention import decode_attention
    kv_dtype = torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16
    ctx = [0, 1, 15, 16, 17, 100, 255, 1000, 3, 63, 64, 65]
    pool, meta = random_batch([1] * len(ctx), ctx, kv_dtype=kv_dtype, num_blocks=512)
    q = torch.randn(len(ctx), 16, 128, device=DEV, dtype=torch.bfloat16)
    k_scale, v_scale = (0.5, 0.25) if kv == "fp8" else (1.0, 1.0)
    out = decode_attention(q, pool[:, 1], meta.seq_lens, meta.block_tables, 128 ** -0.5, k_scale, v_scale,
                           num_splits=splits)
    expected = ref(q.float(), pool[:, 1], meta, 128 ** -0.5, k_scale, v_scale)
    assert rel_err(out, expected) < 2e-2


def test_gumbel_sampling_reads_bf16_logits():
    """The fused path widens bf16 logits in registers: the same draw as from their float32 copy."""
    from engine.sampling.sampler import SamplingMetadata, sample
    B, V = 16, 151936
    logits = (torch.randn(B, V, device=DEV) * 3).bfloat16()
    m = SamplingMetadata(temperature=torch.full((B,), 0.7, device=DEV), top_k=torch.full((B,), V, device=DEV),
                         top_p=torch.ones(B, device=DEV), min_p=torch.zeros(B, device=DEV),
                         seeds=torch.randint(0, 2 ** 62, (B,), device=DEV), steps=torch.randint(0, 1000, (B,), device=DEV),
                         all_greedy=False, need_top_k=False, need_top_p=False, need_min_p=False)
    assert torch.equal(sample(logits, m).token_ids, sample(logits.float(), m).token_ids)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("T", [70, 1100])  # two programs per token, and one (above SPLIT_MAX_TOKENS)
def test_fused_attention_input(qk_norm, kv_dtype, T):
    """q/k norm + rope + KV write in one launch == the unfused kernels one by one (and the torch refs)."""
    from kernels.attention.torch_ref import store_kv as ref_store
    from kernels.norm import rms_norm, rms_norm_ref
    from kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin_cache
    from kernels.triton.attn_input import attention_input
    from kernels.triton.kv_store import store_kv
    H, KVH, D, NB = 16, 8, 128, 80
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=DEV).float() / D))
    cache = rope_cos_sin_cache(inv, 4096)
    qkv = torch.randn(T, (H + 2 * KVH) * D, device=DEV, dtype=torch.bfloat16)
    pos = torch.randint(0, 4096, (T,), device=DEV)
    wq, wk = (torch.rand(D, device=DEV, dtype=torch.bfloat16) + 0.5 for _ in range(2))
    pool = torch.zeros(NB, 2, 2, 16, KVH, D, device=DEV).to(kv_dtype)
    slots = torch.randperm(NB * 16, device=DEV)[:T]
    slots[::9] = -1
    a, b, c = pool.clone(), pool.clone(), pool.clone()
    q = attention_input(qkv, pos, cache, a[:, 1], slots, H, KVH, D, wq if qk_norm else None,
                        wk if qk_norm else None, 1e-6, 0.5, 0.25)
    q_, k_, v_ = qkv.split([H * D, KVH * D, KVH * D], -1)
    q_, k_, v_ = q_.view(T, H, D), k_.view(T, KVH, D), v_.view(T, KVH, D)
    norm = (lambda x, w: rms_norm(x, w, 1e-6)) if qk_norm else (lambda x, w: x)
    q1, k1 = apply_rope(norm(q_, wq), norm(k_, wk), pos, cache)
    store_kv(k1, v_, b[:, 1], slots, 0.5, 0.25)
    assert rel_err(q, q1) < 1e-2 and (q == q1).float().mean() > 0.99
    assert rel_err(a.float(), b.float()) < 1e-2 and (a.float() == b.float()).float().mean() > 0.99
    ref_norm = (lambda x, w: rms_norm_ref(x, w, 1e-6)) if qk_norm else (lambda x, w: x)
    q2, k2 = apply_rope_ref(ref_norm(q_, wq), ref_norm(k_, wk), pos, cache)
    ref_store(k2, v_, c[:, 1], slots, 0.5, 0.25)
    assert rel_err(q, q2) < 2e-2 and rel_err(a.float(), c.float()) < 2e-2
    untouched = torch.ones(NB * 16, dtype=torch.bool, device=DEV)
    untouched[slots[slots >= 0]] = False
    assert (a[:, 1].transpose(1, 2).reshape(NB * 16, 2, -1)[untouched].float() == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_saturate_fp8(dtype):
    """One-pass saturating E4M3 cast == torch's clamp then cast, bit for bit (incl. values past 448)."""
    from kernels.triton.elementwise import saturate_fp8
    x = (torch.randn(3001, 16, 128, device=DEV) * 300).to(dtype)[1:]  # odd length, offset start
    out = saturate_fp8(x)
    assert out.dtype == torch.float8_e4m3fn and out.shape == x.shape
    assert torch.equal(out.view(torch.uint8), x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (2048, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_gemm(n, k, dtype):
    """The split-K skinny GEMM against a float64 product, for every batch size it is routed (1..16), with
    and without bias; its counters are back at zero after each launch, so repeated launches and CUDA
    graph replays on new inputs stay right."""
    from kernels.linear import linear, skinny_config
    from kernels.triton.skinny_gemm import workspace
    torch.manual_seed(0)
    w = torch.randn(n, k, device=DEV, dtype=dtype) * 0.05
    b = torch.randn(n, device=DEV, dtype=dtype)
    for m in (1, 3, 8, 16):
        assert skinny_config(m, n, k, dtype) is not None
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        for bias in (None, b):
            ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
            for _ in range(2):
                assert rel_err(linear(x, w, bias), ref) < 5e-3
    counters = workspace(torch.device(DEV, torch.cuda.current_device())).counters
    assert int(counters.count_nonzero()) == 0
    x = torch.randn(4, k, device=DEV, dtype=dtype)
    graph = torch.cuda.CUDAGraph()
    linear(x, w, b)
    with torch.cuda.graph(graph):
        y = linear(x, w, b)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert rel_err(y, x.double() @ w.double().t() + b.double()) < 5e-3
    assert int(counters.count_nonzero()) == 0


@pytest.mark.parametrize("experts,hidden", [(64, 2048), (128, 2048), (256, 7168), (384, 7168), (60, 2048)])
def test_router_linear(experts, hidden):
    """MoE router logits (bf16 activations, float32 weights) as an exact float32 product at decode and prefill
    batch sizes: the skinny kernel where the shape tiles (60 experts does not: torch), against float64."""
    from kernels.linear import router_linear
    torch.manual_seed(0)
    w = torch.randn(experts, hidden, device=DEV) * 0.02
    for m in (1, 7, 16, 130, 256, 300):
        x = torch.randn(m, hidden, device=DEV).to(torch.bfloat16)
        got = router_linear(x, w)
        assert got.dtype == torch.float32 and got.shape == (m, experts)
        assert rel_err(got, x.double() @ w.double().t()) < 1e-5  # float32 sums over up to 7,168 products
