"""DeepSeek's GPU kernels against their torch references: the MLA kernels (the absorbed form, itself held to the
expanded reference model on the CPU in tests/test_deepseek.py): the Triton latent kernel at decode (split and
unsplit) and prefill-chunk shapes, the latent store, FlashMLA where it is built; the block-FP8 GEMM and the FP8
fused MoE. Then a tiny DeepSeek-V3 with V3's 512 + 64 latents through the engine: Triton and FlashMLA under
CUDA graphs against the torch backend and against transformers (float32), and its block-FP8 copy against the
dequantised weights. Skipped without CUDA."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from kernels.attention.mla import TorchMLABackend, get_mla_backend
from tests.support.mla import random_mla_step

GPU = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not GPU, reason="DeepSeek's GPU kernels need CUDA and triton (CPU CI runs the torch "
                                                "references and the interpreted Triton kernels, tests/test_deepseek.py)")
HAS_FLASH_MLA = importlib.util.find_spec("flash_mla") is not None
HOPPER = GPU and torch.cuda.get_device_capability() == (9, 0)
needs_flash_mla = pytest.mark.skipif(not (HAS_FLASH_MLA and HOPPER),
                                     reason="FlashMLA is not built here (../shared/device/kernels.sh) or no Hopper GPU")
DEV = "cuda"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def reference(s, heads_at_once: int = 16):
    """float64, a few heads at a time: the reference expands the shared latent per head, which for 128 heads
    over 64 long sequences would not fit an 80 GB GPU."""
    import dataclasses
    ref, H = TorchMLABackend(), s.shape.num_heads
    w = s.w_kv_b.double().view(H, -1, s.w_kv_b.shape[-1])
    outs = []
    for h in range(0, H, heads_at_once):
        n = min(heads_at_once, H - h)
        outs.append(ref.attend(s.q_nope[:, h:h + n].double(), s.q_pe[:, h:h + n].double(), s.cache.double(), s.meta,
                               w[h:h + n].reshape(-1, w.shape[-1]), dataclasses.replace(s.shape, num_heads=n)))
    return torch.cat(outs, dim=1)


CASES = {
    "decode-b1-long": ([1], [3000], 16),  # many splits
    "decode-mixed": ([1] * 7, [1, 17, 64, 65, 300, 1000, 2], 64),
    "decode-b64": ([1] * 64, [40 + 37 * i for i in range(64)], 16),  # one split
    "prefill-chunks": ([37, 1, 128, 5], [37, 90, 300, 5], 16),  # chunks over a cached prefix, and decode
    "verify": ([2, 4, 1, 3], [3000, 40, 700, 90], 16),  # a last token and its drafts: split like decode
}


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_mla_matches_reference(case, heads):
    q_lens, seq_lens, bs = CASES[case]
    s = random_mla_step(q_lens, seq_lens, bs, heads=heads, device=DEV, seed=list(CASES).index(case))
    backend = get_mla_backend("triton", torch.device(DEV), torch.bfloat16, bs, 512, 64)
    meta = backend.begin_forward(s.meta)
    meta.plan = backend.plan(meta)
    got = backend.attend(s.q_nope, s.q_pe, s.cache, meta, s.w_kv_b, s.shape)
    assert rel_err(got, reference(s)) < 1e-2


@pytest.mark.parametrize("case", ["decode-mixed", "verify", "prefill-chunks"])
def test_triton_mla_fp8_pages_match_reference(case):
    """FP8 latent pages (unit scale): the kernel widens the same E4M3 values as the float64 reference."""
    q_lens, seq_lens, bs = CASES[case]
    s = random_mla_step(q_lens, seq_lens, bs, heads=16, device=DEV, seed=7)
    s.cache = s.cache.to(torch.float8_e4m3fn)
    backend = get_mla_backend("triton", torch.device(DEV), torch.bfloat16, bs, 512, 64, torch.float8_e4m3fn)
    meta = backend.begin_forward(s.meta)
    meta.plan = backend.plan(meta)
    got = backend.attend(s.q_nope, s.q_pe, s.cache, meta, s.w_kv_b, s.shape)
    assert rel_err(got, reference(s)) < 1e-2


@needs_flash_mla
@pytest.mark.parametrize("heads", [16, 128])
def test_flash_mla_matches_reference(heads):
    q_lens, seq_lens, _ = CASES["decode-mixed"]
    s = random_mla_step(q_lens, seq_lens, 64, heads=heads, device=DEV, seed=3)
    backend = get_mla_backend("flashmla", torch.device(DEV), torch.bfloat16, 64, 512, 64)
    meta = backend.begin_forward(s.meta)
    meta.plan = meta.plan if meta.plan is not None else backend.plan(meta)
    got = backend.attend(s.q_nope, s.q_pe, s.cache, meta, s.w_kv_b, s.shape)
    assert rel_err(got, reference(s)) < 1e-2
    # a prefill step goes to the Triton kernel
    p = random_mla_step(*CASES["prefill-chunks"][:2], 64, heads=heads, device=DEV, seed=4)
    pm = backend.begin_forward(p.meta)
    pm.plan = backend.plan(pm)
    assert rel_err(backend.attend(p.q_nope, p.q_pe, p.cache, pm, p.w_kv_b, p.shape), reference(p)) < 1e-2


def test_triton_latent_store_matches_torch():
    from kernels.attention.mla_ref import store_latent as torch_store
    from kernels.triton.mla_attention import store_latent
    pool = torch.zeros(20, 3, 16, 576, dtype=torch.bfloat16, device=DEV)
    want = pool.clone()
    fused = torch.randn(9, 700, dtype=torch.bfloat16, device=DEV)  # strided rows, like a projection's output
    latent, k_pe = fused[:, :512], fused[:, 600:664]
    slots = torch.tensor([5, 17, -1, 300, 301, -1, 0, 15, 64], device=DEV)
    store_latent(latent, k_pe, pool[:, 1], slots)
    keep = slots >= 0
    torch_store(torch.cat([latent, k_pe], -1)[keep], want[:, 1], slots[keep])
    assert torch.equal(pool, want)


def test_fused_latent_norm_rope_store_matches_three_steps():
    """The latent's RMSNorm, the rope of q and k and the store in one launch (tests/support/mla.py) on the GPU,
    against the reference backend's three steps."""
    from tests.support.mla import check_norm_rope_store
    assert check_norm_rope_store(DEV) < 1e-5


# ---- a tiny DeepSeek-V3 with V3's latent widths through the engine -----------------------------------------
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31, 32], list(range(40, 120)),
           [3] * 70]


@pytest.fixture(scope="module")
def v3_latents(tmp_path_factory):
    from tests.support.models import build_checkpoint
    return build_checkpoint(tmp_path_factory.mktemp("mla") / "ds", "deepseek_v3", hidden_size=256,
                            num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32,
                            v_head_dim=32, q_lora_rank=64, initializer_range=0.05)


def _generate(llm, n=16):
    from engine.sampling_params import SamplingParams
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0))
    return [o.outputs[0].token_ids for o in outs]


def _hf_greedy(path, n=16):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return [hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(p):].tolist()
            for p in PROMPTS]


def _agreement(a, b) -> tuple[float, bool]:
    pairs = [(x, y) for s, t in zip(a, b) for x, y in zip(s, t)]
    return sum(x == y for x, y in pairs) / len(pairs), all(s[0] == t[0] for s, t in zip(a, b))


def _forced_agreement(llm, generated) -> float:
    """Teacher-forced: at each generated position, whether `llm`'s top-1 given the reference's tokens before it
    (prompt_logprobs) is the reference's next token. Unlike free-running agreement, one near-tie flipped does
    not derail the rest of the sequence."""
    from engine.sampling_params import SamplingParams
    hits = []
    for prompt, gen in zip(PROMPTS, generated):
        seq = prompt + gen
        rows = llm.generate([{"prompt_token_ids": seq}], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
        hits += [next(t for t, v in rows.prompt_logprobs[i].items() if v.rank == 1) == seq[i]
                 for i in range(len(prompt), len(seq))]
    return sum(hits) / len(hits)


def test_triton_mla_engine_float32_matches_transformers_under_graphs(v3_latents):
    from engine.llm import LLM
    llm = LLM(str(v3_latents), dtype="float32", device="cuda", num_kv_blocks=64, max_num_seqs=8)
    runner = llm.engine.runner
    assert runner.backend.name == "triton" and runner.graphs is not None
    got = _generate(llm)
    # float32 through TF32 tensor cores in the attention: the first tokens exactly, most of the rest
    agree, first = _agreement(got, _hf_greedy(v3_latents))
    assert first and agree >= 0.8, agree
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("backend,kv", [("triton", "auto"), ("auto", "fp8"),
                                        pytest.param("flashmla", "auto", marks=needs_flash_mla)])
def test_mla_engine_bf16_graphs_agree_with_torch(v3_latents, backend, kv):
    """bf16 under CUDA graphs against the torch backend; FP8 latent pages (auto then picks the Triton kernel,
    FlashMLA's dense decode reading bf16 only) against the torch backend on the same FP8 pages."""
    from engine.llm import LLM
    opts = dict(device="cuda", dtype="bfloat16", num_kv_blocks=64, max_num_seqs=8, block_size=64, kv_cache_dtype=kv)
    expected = _generate(LLM(str(v3_latents), attention_backend="torch", **opts))
    llm = LLM(str(v3_latents), attention_backend=backend, **opts)
    name = "triton" if kv == "fp8" else backend
    assert llm.engine.runner.backend.name == name and llm.engine.runner.graphs is not None
    agree, first = _agreement(_generate(llm), expected)
    assert first and agree >= 0.6, agree


@pytest.mark.parametrize("k", [1, 2])
def test_mtp_under_graphs(v3_latents, tmp_path, k):
    """MTP drafting on the GPU: verify steps (1 + k tokens a sequence), the MTP module over them and, for k = 2, the
    chain's links replay CUDA graphs; float32 tokens agree with plain decoding (TF32 in the attention makes exact
    equality a matter of near-ties), drafts are made and the pool is whole afterwards."""
    from engine.llm import LLM
    from tests.support.mla import with_mtp_layer
    path = with_mtp_layer(v3_latents, tmp_path / "with_mtp")
    opts = dict(device="cuda", dtype="float32", num_kv_blocks=64, max_num_seqs=8)
    expected = _generate(LLM(str(path), **opts))
    llm = LLM(str(path), speculative_config=f'{{"method": "mtp", "num_speculative_tokens": {k}}}', **opts)
    agree, first = _agreement(_generate(llm), expected)
    assert first and agree >= 0.8, agree
    stats, replays = llm.engine.stats(), llm.engine.runner.graphs.replays
    assert stats["spec_draft_tokens"] > 0 and replays[1 + k] > 0 and (k == 1 or replays["mtp_chain"] > 0), \
        (stats, replays)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


# ---- block FP8 ----------------------------------------------------------------------------------------------
def test_group_quantisation_matches_torch():
    from kernels.triton.fp8_gemm import quantize_per_token_group
    x = torch.randn(37, 7168, device=DEV, dtype=torch.bfloat16) * 3
    q, s = quantize_per_token_group(x)
    groups = x.float().view(37, 56, 128)
    want_s = groups.abs().amax(-1).clamp(min=1e-10) / 448.0
    want_q = (groups / want_s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(37, 7168)
    assert torch.allclose(s, want_s, rtol=1e-6) and (q.float() != want_q.float()).float().mean() < 1e-3


@pytest.mark.parametrize("m", [1, 7, 64, 130, 256, 300, 2048])
@pytest.mark.parametrize("n,k", [(2112, 7168), (7168, 2048), (576, 1536)])
def test_block_fp8_linear_matches_reference(m, n, k):
    from kernels.linear import block_fp8_linear, dequantize_block_fp8_rows as dq, skinny_config
    from kernels.triton.fp8_gemm import quantize_per_token_group
    from tests.support.fp8 import quantize_block_fp8
    torch.manual_seed(m + n)
    w, scale = quantize_block_fp8(torch.randn(n, k, device=DEV) * 0.05, 128)
    rows = scale.repeat_interleave(128, 0)[:n].contiguous()  # row-expanded, as the layers keep them
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    got = block_fp8_linear(x, w, rows, 128)
    exact = x.float() @ dq(w, rows, 128).t()
    if skinny_config(m, n, k, x.dtype, fp8=True) is not None:
        # decode rows (the skinny GEMM, up to 256): the activations are not quantised: tight
        assert rel_err(got, exact) < 1e-2
        return
    assert m > 256
    # the same computation in torch (activations quantised per token and 128 columns): tight
    xq = dq(*quantize_per_token_group(x, 128), 128)
    assert rel_err(got, xq @ dq(w, rows, 128).t()) < 1e-2
    # the dequantised weights with exact activations: the activation rounding only
    assert rel_err(got, exact) < 6e-2


@pytest.mark.parametrize("tokens", [1, 33, 300])
def test_fp8_fused_moe_matches_reference(tokens):
    """Both ways of the FP8 experts at decode and prefill token counts: activations as they are (W8A16, the
    default up to W8A16_MAX_TOKENS) and quantised per token and 128 columns (W8A8, FP8 tensor cores)."""
    from kernels.moe import fused_experts, select_experts
    from kernels.triton import fused_moe
    from kernels.triton.fp8_gemm import quantize_per_token_group
    from tests.support.fp8 import fused_experts_fp8_ref
    torch.manual_seed(tokens)
    E, H, inter = 16, 1024, 256
    quant = lambda w: [t.view(E, w.shape[1], -1) for t in quantize_per_token_group(w.flatten(0, 1), 128)]
    w13, w13_s = quant(torch.randn(E, 2 * inter, H, device=DEV, dtype=torch.bfloat16) * 0.05)
    w2, w2_s = quant(torch.randn(E, H, inter, device=DEV, dtype=torch.bfloat16) * 0.05)
    x = torch.randn(tokens, H, device=DEV, dtype=torch.bfloat16)
    weights, ids = select_experts(torch.randn(tokens, E, device=DEV), 4, True)
    got = fused_experts(x, w13, w2, weights, ids, None, w13_s, w2_s, 128)
    quantized = tokens > fused_moe.W8A16_MAX_TOKENS
    assert rel_err(got, fused_experts_fp8_ref(x, w13, w13_s, w2, w2_s, weights, ids, 128, quantized)) < 2e-2
    other = fused_moe.fused_experts(x, w13, w2, weights, ids, fp8_scales=(w13_s, w2_s, 128),
                                    quantize_activations=not quantized)
    assert rel_err(other, fused_experts_fp8_ref(x, w13, w13_s, w2, w2_s, weights, ids, 128, not quantized)) < 2e-2


@pytest.mark.parametrize("experts,inter", [(128, 768), (66, 1408)], ids=["qwen3-30b-a3b", "moonlight-with-shared"])
@pytest.mark.parametrize("tokens", [1, 40, 200])
def test_fp8_fused_moe_tuned_rows(experts, inter, tokens):
    """The FP8 experts' tuned rows (TUNED_FP8: 256-column tiles, 3 stages) on the shapes they were tuned for, at
    decode batch sizes, against torch computing the same (activations in fp16, weights dequantised)."""
    from kernels.moe import select_experts
    from kernels.triton import fused_moe
    from kernels.triton.fused_moe_configs import TUNED_FP8
    from tests.support.fp8 import fused_experts_fp8_ref
    assert (experts, 2048, inter) in TUNED_FP8
    torch.manual_seed(tokens)
    H = 2048
    w13 = torch.randn(experts, 2 * inter, H, device=DEV).to(torch.float8_e4m3fn)
    w2 = torch.randn(experts, H, inter, device=DEV).to(torch.float8_e4m3fn)
    s13 = torch.rand(experts, 2 * inter, H // 128, device=DEV) * H ** -0.5
    s2 = torch.rand(experts, H, inter // 128, device=DEV) * inter ** -0.5
    x = torch.randn(tokens, H, device=DEV, dtype=torch.bfloat16)
    weights, ids = select_experts(torch.randn(tokens, experts, device=DEV), 8, True)
    got = fused_moe.fused_experts(x, w13, w2, weights, ids, fp8_scales=(s13, s2, 128))
    assert rel_err(got, fused_experts_fp8_ref(x, w13, s13, w2, s2, weights, ids, 128, False)) < 2e-2


def test_block_fp8_engine_agrees_with_dequantised(v3_latents, tmp_path):
    from engine.llm import LLM
    from tests.support.fp8 import write_block_fp8_copy
    fp8_dir, ref_dir = write_block_fp8_copy(v3_latents, tmp_path, 32)  # the tiny model's widths are 32-multiples
    opts = dict(device="cuda", dtype="bfloat16", num_kv_blocks=64, max_num_seqs=8)
    expected = _generate(LLM(str(ref_dir), **opts))
    llm = LLM(str(fp8_dir), **opts)
    assert llm.engine.runner.model.model.layers[1].mlp.experts.w13_weight.dtype == torch.float8_e4m3fn
    # This checks the wiring (E4M3 weights and their block scales reach every layer): a wrong scale or slice gives
    # tokens at chance (1 / vocab). The FP8 arithmetic itself is held to W8A8 references above. With activations
    # rounded to E4M3 (3 mantissa bits) per 32 columns, this random tiny model's near-flat logits flip top-1
    # often: free-running agreement is chaotic (one flip changes the rest), so the next token is compared given
    # the dequantised model's sequence; measured 0.72 on an H200 (stop 31)
    forced = _forced_agreement(llm, expected)
    print(f"FP8 vs dequantised: teacher-forced top-1 agreement {forced:.3f}")
    assert forced >= 0.5, forced
