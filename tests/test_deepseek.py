"""DeepSeek-V3 (MLA with a latent KV cache, DeepSeek MoE routing, shared experts, dense first layers, YaRN)
and DeepSeek-V2 (softmax routing within the best groups) against transformers on tiny random checkpoints
(float32, CPU): greedy tokens identical and logits within 1e-4, with and without the low-rank q projection, under prefix caching and small prefill chunks, with the heads and
experts split over two real processes, and across a prefill/decode hand-off of the latent cache."""
from __future__ import annotations

import pytest
import torch

from engine.kv.spec import MLAKVCacheSpec
from engine.wire import EngineCoreRequest
from tests.hf_oracle import hf_logits
from tests.support.models import build_checkpoint
from tests.test_engine_parity import LOGIT_ATOL, assert_matches_hf, check_prefix_reuse, greedy, mixed_prompts
from tests.test_tensor_parallel import seeded, tokens


@pytest.fixture(scope="module")
def deepseek_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("deepseek")
    return {"q_lora": build_checkpoint(root / "q_lora", "deepseek_v3"),
            "no_q_lora": build_checkpoint(root / "no_q_lora", "deepseek_v3", q_lora_rank=None, seed=1),
            # biased latent and output projections beside the reference's unbiased q_proj (one fused GEMM here)
            "no_q_lora_bias": build_checkpoint(root / "no_q_lora_bias", "deepseek_v3", q_lora_rank=None,
                                               attention_bias=True, seed=3),
            "v2": build_checkpoint(root / "v2", "deepseek_v2", seed=2)}


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora", "no_q_lora_bias", "v2"])
def test_deepseek_matches_hf(variant, deepseek_models, llm_cache):
    path = deepseek_models[variant]
    llm = llm_cache.get(path)
    engine = llm.engine
    assert engine.kv_spec == MLAKVCacheSpec(3, 24, 16, engine.config.block_size, "float32")
    prompts = mixed_prompts(engine.model_config.vocab_size)
    assert_matches_hf(path, prompts, llm.generate(prompts, greedy(logprobs=5)), check_logprobs=True)
    for i, p in enumerate(prompts[:4]):
        engine.add_request(EngineCoreRequest(request_id=f"ds{i}", prompt_token_ids=p, params=greedy()))
    sched = engine.scheduler.schedule()
    try:
        logits = engine.runner.prefill_logits(sched.scheduled).cpu()
    finally:
        engine.abort([f"ds{i}" for i in range(4)])
        engine.step()
    start = 0
    for p in prompts[:4]:
        torch.testing.assert_close(logits[start:start + len(p)], hf_logits(path, p), atol=LOGIT_ATOL, rtol=0)
        start += len(p)


def test_deepseek_prefix_caching_and_small_chunks(deepseek_models, llm_cache):
    path = deepseek_models["q_lora"]
    check_prefix_reuse(path, llm_cache.get(path, block_size=4, max_num_batched_tokens=8))


def test_deepseek_forced_preemption(deepseek_models, llm_cache):
    """A latent pool too small for the batch: sequences are preempted and recomputed, tokens still transformers'."""
    path = deepseek_models["q_lora"]
    llm = llm_cache.get(path, num_kv_blocks=12, block_size=4, max_model_len=48, enable_prefix_caching=False)
    prompts = mixed_prompts(llm.engine.runner.vocab_size, seed=4, lengths=(20, 14, 9, 25, 3, 17))
    outputs = llm.generate(prompts, greedy())
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_hf(path, prompts, outputs)


@pytest.mark.parametrize("options", [dict(tensor_parallel_size=2),
                                     dict(tensor_parallel_size=2, enable_expert_parallel=True),
                                     dict(data_parallel_size=2, enable_expert_parallel=True)],
                         ids=["tp2", "tp2-ep", "dp2-ep"])
def test_deepseek_two_ranks_match_one(options, deepseek_models, llm_cache):
    path = deepseek_models["q_lora"]
    one, two = llm_cache.get(path), llm_cache.get(path, **options)
    prompts = mixed_prompts(one.engine.model_config.vocab_size, seed=5)
    assert_matches_hf(path, prompts, two.generate(prompts, greedy()))
    params = [seeded(i) for i in range(len(prompts))]
    assert tokens(two.generate(prompts, params)) == tokens(one.generate(prompts, params))


def test_fp8_latent_cache(tmp_path, llm_cache):
    """--kv-cache-dtype fp8 on a latent cache: the pool holds E4M3 latents (a quarter of float32's bytes), the
    top logprobs stay close, and so the first greedy tokens are the full-precision cache's but for near-ties.
    (A checkpoint with realistic weight scales: the others' initializer_range 0.2 makes activations large
    enough that E4M3's 6 % steps move logprobs by more.)"""
    path = build_checkpoint(tmp_path / "small_init", "deepseek_v3", initializer_range=0.05, seed=4)
    full, fp8 = llm_cache.get(path), llm_cache.get(path, kv_cache_dtype="fp8")
    assert fp8.engine.runner.kv_pool.dtype == torch.float8_e4m3fn and fp8.engine.kv_spec.dtype == "float8_e4m3fn"
    assert 4 * fp8.engine.kv_spec.bytes_per_token == full.engine.kv_spec.bytes_per_token
    prompts = mixed_prompts(full.engine.model_config.vocab_size)
    want, got = (llm.generate(prompts, greedy(logprobs=5, max_tokens=4)) for llm in (full, fp8))
    for a, b in zip(want, got):
        la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert max(abs(la[t].logprob - lb[t].logprob) for t in la if t in lb) < 0.2, (la, lb)
        ta, tb = a.outputs[0].token_ids[0], b.outputs[0].token_ids[0]
        assert ta == tb or (tb in la and la[ta].logprob - la[tb].logprob < 0.2), (la, lb)  # or a near-tie


def test_latent_cache_hands_off_prefill_to_decode(deepseek_models, llm_cache):
    """1P1D over DLSlime moves the latent blocks (the migration carries the MLA spec): the hybrid tokens."""
    pytest.importorskip("dlslime", reason="dlslime (and libibverbs1) is needed for KV transfer")
    from tests.test_pd_core import OPTS, cases, hand_off_all
    from engine.pd import migration as mig
    path = deepseek_models["q_lora"]
    prefill = llm_cache.get(path, role="prefill", **OPTS).engine
    decode = llm_cache.get(path, role="decode", **OPTS).engine
    cs = cases()
    expected = tokens(llm_cache.get(path, **OPTS).generate([p for _, p, _ in cs], [s for _, _, s in cs]))
    got, migrations = hand_off_all(prefill, decode, cs)
    assert all(isinstance(mig.decode(m).kv_spec, MLAKVCacheSpec) for m in migrations)
    assert [got[rid] for rid, _, _ in cs] == expected


@pytest.fixture(scope="module")
def fp8_checkpoint(deepseek_models, tmp_path_factory):
    from tests.support.fp8 import write_block_fp8_copy
    return write_block_fp8_copy(deepseek_models["q_lora"], tmp_path_factory.mktemp("fp8"), 16)


def test_block_fp8_checkpoint_matches_dequantised(fp8_checkpoint, llm_cache):
    """The FP8 blocks load as they are (E4M3 weights, row-expanded scales) and compute through the block-FP8
    reference: the dequantised model's tokens and logprobs. MLA's kv_b_proj, folded into q, is dequantised."""
    fp8_dir, ref_dir = fp8_checkpoint
    llm = llm_cache.get(fp8_dir)
    layer = llm.engine.runner.model.model.layers[1]
    attn, moe = layer.self_attn, layer.mlp
    fused = attn.fused_qkv_a_proj
    assert fused.weight.dtype == torch.float8_e4m3fn and fused.weight_scale_inv is not None
    assert attn.o_proj.weight.dtype == moe.experts.w13_weight.dtype == torch.float8_e4m3fn
    # the two shared experts are FP8 experts 8 and 9 of the stacks (their scales sliced at a block edge)
    assert moe.shared_experts is None and moe.experts.w13_weight.shape[0] == 8 + 2
    assert attn.kv_b_proj.weight.dtype == torch.float32 and attn.kv_b_proj.weight_scale_inv is None
    prompts = mixed_prompts(llm.engine.model_config.vocab_size, seed=9)
    assert_matches_hf(ref_dir, prompts, llm.generate(prompts, greedy(logprobs=5)), check_logprobs=True)


@pytest.mark.parametrize("options", [dict(tensor_parallel_size=2), dict(tensor_parallel_size=2,
                                                                         enable_expert_parallel=True)])
def test_block_fp8_shards_over_two_ranks(fp8_checkpoint, llm_cache, options):
    """Each rank keeps its rows or its block-aligned columns of the FP8 weights and their scales."""
    fp8_dir, _ = fp8_checkpoint
    one, two = llm_cache.get(fp8_dir), llm_cache.get(fp8_dir, **options)
    prompts = mixed_prompts(one.engine.model_config.vocab_size, seed=11)
    assert tokens(two.generate(prompts, greedy())) == tokens(one.generate(prompts, greedy()))


def test_unsupported_quantization_is_a_clear_error():
    from types import SimpleNamespace
    from engine.errors import UnsupportedModelError
    from engine.models.fp8_checkpoint import block_size_of
    assert block_size_of(SimpleNamespace()) is None
    assert block_size_of(SimpleNamespace(quantization_config={"quant_method": "fp8",
                                                              "weight_block_size": [128, 128]})) == (128, 128)
    with pytest.raises(UnsupportedModelError, match="awq"):
        block_size_of(SimpleNamespace(quantization_config={"quant_method": "awq"}))
    with pytest.raises(UnsupportedModelError, match="per-tensor"):
        block_size_of(SimpleNamespace(quantization_config={"quant_method": "fp8"}))


@pytest.mark.parametrize("q_lens,seq_lens,block_size", [([1, 1, 1], [1, 9, 40], 4),  # decode
                                                        ([5, 1, 12], [5, 20, 30], 8)])  # prefill chunks + decode
def test_absorbed_latent_attention_matches_expanded(q_lens, seq_lens, block_size):
    """Every MLA backend attends in the latent space (kv_b_proj folded into q and the output); the reference
    model expands the latents into per-head K and V. Both agree (float64, so only the algebra is compared)."""
    from kernels.attention.mla import TorchMLABackend
    from kernels.attention.mla_ref import mla_attention_ref
    from tests.support.mla import random_mla_step
    s = random_mla_step(q_lens, seq_lens, block_size, heads=4, kv_lora_rank=32, rope_dim=16, nope_dim=24,
                        v_dim=20, dtype=torch.float64)
    backend = TorchMLABackend()
    got = backend.attend(s.q_nope, s.q_pe, s.cache, backend.begin_forward(s.meta), s.w_kv_b, s.shape)
    want = mla_attention_ref(s.q_nope, s.q_pe, s.cache, s.meta, s.w_kv_b, 32, 20, s.shape.scale)
    assert got.shape == (sum(q_lens), 4, 20)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_mla_backend_choice_on_cpu():
    from kernels.attention.mla import TorchMLABackend, get_mla_backend
    cpu = torch.device("cpu")
    assert isinstance(get_mla_backend("auto", cpu, torch.float32, 16, 512, 64), TorchMLABackend)
    for name, why in [("triton", "CUDA"), ("flashmla", "flash_mla|Hopper"), ("xformers", "unknown")]:
        with pytest.raises(ValueError, match=why):
            get_mla_backend(name, cpu, torch.bfloat16, 64, 512, 64)


@pytest.mark.parametrize("kernels", ["mla", "fp8", "decode_kernels"])
def test_triton_kernels_interpreted_on_cpu(kernels):
    """The GPU's Triton kernels run here under Triton's interpreter against torch: the latent attention and
    store (mla), the block-FP8 GEMM and the FP8 fused MoE (fp8), the router of every MoE family, the rope
    on interleaved pairs and the fused experts with and without the sort by expert (decode_kernels)."""
    pytest.importorskip("triton", reason="triton is not installed")
    import os
    import subprocess
    import sys
    code = f"from tests.support.{kernels} import check_triton_kernels; print(check_triton_kernels())"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split()[-1]) < 1e-5


@pytest.fixture(scope="module")
def mtp_checkpoint(deepseek_models, tmp_path_factory):
    """The tiny V3 with an MTP module (tests/support/mla.with_mtp_layer)."""
    from tests.support.mla import with_mtp_layer
    return with_mtp_layer(deepseek_models["q_lora"], tmp_path_factory.mktemp("mtp") / "with_mtp")


def test_checkpoint_with_mtp_modules_loads(mtp_checkpoint, deepseek_models, llm_cache):
    """Without speculative decoding the MTP module is skipped, and the model is the same."""
    with_mtp, plain = llm_cache.get(mtp_checkpoint), llm_cache.get(deepseek_models["q_lora"])
    assert not with_mtp.engine.runner.model.mtp
    prompts = mixed_prompts(plain.engine.model_config.vocab_size, seed=13)
    assert tokens(with_mtp.generate(prompts, greedy())) == tokens(plain.generate(prompts, greedy()))


def mtp_k(k: int) -> str:
    return f'{{"method": "mtp", "num_speculative_tokens": {k}}}'


MTP = mtp_k(1)


@pytest.mark.parametrize("options,k", [({}, 1), ({}, 3), (dict(tensor_parallel_size=2), 2),
                                       (dict(enable_prefix_caching=True, block_size=4, max_num_batched_tokens=8), 3)],
                         ids=["one-rank", "one-rank-chain3", "tp2-chain2", "chunks-chain3"])
def test_mtp_speculation_keeps_the_output(mtp_checkpoint, llm_cache, options, k):
    """DeepSeek's MTP module drafts k tokens per step (its latent KV a layer of the pool; k > 1 chains it over
    lookahead slots): greedy tokens, logprobs and seeded samples equal plain decoding's (and the pool is whole
    again afterwards, as after every test)."""
    from engine.sampling_params import SamplingParams
    plain, spec = llm_cache.get(mtp_checkpoint, **options), llm_cache.get(mtp_checkpoint, speculative_config=mtp_k(k),
                                                                          **options)
    runner = spec.engine.runner
    assert len(runner.model.mtp) == 1 and spec.engine.kv_spec.num_layers == 4  # 3 decoder layers + the MTP's
    prompts = mixed_prompts(plain.engine.model_config.vocab_size, seed=17)
    assert tokens(spec.generate(prompts, greedy(logprobs=2))) == tokens(plain.generate(prompts, greedy(logprobs=2)))
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True) for i in range(len(prompts))]
    assert tokens(spec.generate(prompts, params)) == tokens(plain.generate(prompts, params))
    stats = spec.engine.stats()
    assert stats["spec_draft_tokens"] > 0, stats
    # k drafts a step, fewer only near a request's length limit
    rows, drafts = stats["spec_verify_rows"], stats["spec_draft_tokens"]
    assert (drafts == rows) if k == 1 else (1.5 * rows < drafts <= k * rows), stats


def mtp_reference_drafts(path, token_ids: list[int], k: int) -> list[int]:
    """The MTP module's k greedy drafts after `token_ids`, computed with transformers' own DeepSeek-V3 layer: the
    main model's final hidden states h_i, the module's inputs (token i + 1, h_i) through enorm / hnorm / eh_proj,
    its decoder layer over all positions (causal), shared_head, at the last position. Each further draft appends
    one position: (the previous draft, the layer's output at the previous last position)."""
    import json
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    n = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    prefix = f"model.layers.{n}."
    w = {k[len(prefix):]: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith(prefix)}
    layer = DeepseekV3DecoderLayer(hf.config, layer_idx=n).eval()
    state = {k: v for k, v in w.items() if k.split(".")[0] in ("self_attn", "mlp", "input_layernorm",
                                                              "post_attention_layernorm") and ".experts." not in k}
    experts = range(hf.config.n_routed_experts)  # transformers 5 stacks them: [E, 2I, H] and [E, H, I]
    state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([w[f"mlp.experts.{e}.gate_proj.weight"],
                                                                w[f"mlp.experts.{e}.up_proj.weight"]]) for e in experts])
    state["mlp.experts.down_proj"] = torch.stack([w[f"mlp.experts.{e}.down_proj.weight"] for e in experts])
    layer.load_state_dict(state)
    eps = hf.config.rms_norm_eps
    norm = lambda x, weight: weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    mtp_in = lambda e, h: (torch.cat([norm(e, w["enorm.weight"]), norm(h, w["hnorm.weight"])], -1)
                           @ w["eh_proj.weight"].t())
    drafts = []
    with torch.no_grad():
        ids = torch.tensor([token_ids])
        h = hf.model(input_ids=ids[:, :-1]).last_hidden_state  # positions 0 .. L-2
        x = mtp_in(hf.model.embed_tokens(ids[:, 1:]), h)  # with the token after each of them
        for _ in range(k):
            L = x.shape[1]
            pos = torch.arange(L)[None]
            mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
            y = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=hf.model.rotary_emb(x, pos))
            logits = norm(y[0, -1], w["shared_head.norm.weight"]) @ w["shared_head.head.weight"].t()
            drafts.append(int(logits.argmax()))
            x = torch.cat([x, mtp_in(hf.model.embed_tokens(torch.tensor([[drafts[-1]]])), y[:, -1:])], dim=1)
    return drafts


def test_mtp_chain_under_forced_preemption(mtp_checkpoint, llm_cache):
    """A latent pool too small for the batch with an MTP chain of 3: each step also reserves the chain's two
    lookahead slots, sequences are preempted and recomputed, and greedy tokens equal plain decoding's (at
    max_model_len the chain stops where no slot may be reserved)."""
    opts = dict(num_kv_blocks=14, block_size=4, max_model_len=40, enable_prefix_caching=False)
    plain, spec = llm_cache.get(mtp_checkpoint, **opts), llm_cache.get(mtp_checkpoint, speculative_config=mtp_k(3),
                                                                       **opts)
    prompts = mixed_prompts(plain.engine.runner.vocab_size, seed=4, lengths=(20, 14, 9, 25, 3, 17))
    params = greedy(max_tokens=40)  # the longest prompts run into max_model_len
    assert tokens(spec.generate(prompts, params)) == tokens(plain.generate(prompts, params))
    stats = spec.engine.stats()
    assert stats["num_preemptions"] > 0 and stats["spec_draft_tokens"] > 0, stats


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_drafts_match_transformers_layers(mtp_checkpoint, k):
    """Each step's drafts are the MTP module's predictions as transformers' layers compute them (greedy run;
    k = 3: the chained module)."""
    from engine.config import EngineConfig
    from engine.core import EngineCore
    core = EngineCore(EngineConfig(model=str(mtp_checkpoint), device="cpu", speculative_config=mtp_k(k)))
    try:
        core.add_request(EngineCoreRequest(request_id="d", prompt_token_ids=[5, 9, 14, 3, 27, 8, 11],
                                           params=greedy(max_tokens=8)))
        checked = longest = 0
        while core.has_unfinished():
            core.step()
            seq = core.seqs.get("d")
            if seq is not None and seq.spec_token_ids:
                assert seq.spec_token_ids == mtp_reference_drafts(mtp_checkpoint, seq.token_ids,
                                                                  len(seq.spec_token_ids))
                checked += 1
                longest = max(longest, len(seq.spec_token_ids))
        assert checked >= 3 and longest == k
    finally:
        core.shutdown()


def test_mtp_kv_after_a_prefix_hit_is_the_sequences_own(mtp_checkpoint):
    """The MTP module's KV at a position depends on the token after it, so at a cached block's last position it
    belongs to the sequence that wrote the block: a sequence that shares the block but not the token after it
    computes that block again. Its module KV then equals an engine's without prefix caching, position for
    position."""
    from engine.config import EngineConfig
    from engine.core import EngineCore
    shared, first = [5, 9, 14, 3], [27, 8, 11, 2, 30]
    second = shared + [40, 41, 42, 43, 44]

    def module_kv(core, prompt):  # the module's latents of the prompt's positions after its first step
        core.add_request(EngineCoreRequest(request_id="b", prompt_token_ids=prompt, params=greedy(max_tokens=3)))
        core.step()
        seq, cache = core.seqs["b"], core.runner.model.mtp[0].self_attn.kv_cache
        bs = core.block_manager.block_size
        kv = torch.stack([cache[seq.block_table[i // bs], i % bs] for i in range(len(prompt))]).clone()
        hits = seq.num_cached_tokens
        while core.has_unfinished():
            core.step()
        return kv, hits

    opts = dict(model=str(mtp_checkpoint), device="cpu", speculative_config=MTP, block_size=4, num_kv_blocks=256)
    cached, plain = EngineCore(EngineConfig(**opts)), EngineCore(EngineConfig(**opts, enable_prefix_caching=False))
    try:
        cached.add_request(EngineCoreRequest(request_id="a", prompt_token_ids=shared + first,
                                             params=greedy(max_tokens=2)))
        while cached.has_unfinished():
            cached.step()
        got, hits = module_kv(cached, second)
        want, _ = module_kv(plain, second)
        assert hits == 0  # the one shared block was computed again
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # a longer shared prefix still hits, less its last block
        got, hits = module_kv(cached, shared + first[:4] + [50, 51])
        assert hits == 4
        # (a different step shape from the plain engine's: equal to rounding)
        torch.testing.assert_close(got, module_kv(plain, shared + first[:4] + [50, 51])[0], rtol=1e-4, atol=1e-5)
    finally:
        cached.shutdown()
        plain.shutdown()


def test_mtp_module_of_an_fp8_checkpoint_stays_fp8(mtp_checkpoint, llm_cache, tmp_path):
    """The MTP layer's projections and experts load in FP8 too, and MTP drafting keeps the output."""
    from tests.support.fp8 import write_block_fp8_copy
    fp8_dir, _ = write_block_fp8_copy(mtp_checkpoint, tmp_path, 16)
    plain, spec = llm_cache.get(fp8_dir), llm_cache.get(fp8_dir, speculative_config=MTP)
    mtp = spec.engine.runner.model.mtp[0]
    assert mtp.eh_proj.weight.dtype == mtp.mlp.experts.w13_weight.dtype == torch.float8_e4m3fn
    assert mtp.self_attn.fused_qkv_a_proj.weight.dtype == torch.float8_e4m3fn
    prompts = mixed_prompts(plain.engine.model_config.vocab_size, seed=19)
    assert tokens(spec.generate(prompts, greedy())) == tokens(plain.generate(prompts, greedy()))
    assert spec.engine.stats()["spec_draft_tokens"] > 0


def test_mtp_speculation_across_a_hand_off(mtp_checkpoint, llm_cache):
    """1P1D with MTP (chained, k = 2) on both sides: the module's latent KV layer travels with the prompt's blocks
    (the prefill engine wrote it; its lookahead blocks stay behind); the decode engine drafts from there and
    gives the hybrid engine's tokens."""
    pytest.importorskip("dlslime", reason="dlslime (and libibverbs1) is needed for KV transfer")
    from tests.test_pd_core import OPTS, cases, hand_off_all
    opts = dict(OPTS, speculative_config=mtp_k(2))
    prefill = llm_cache.get(mtp_checkpoint, role="prefill", **opts).engine
    decode = llm_cache.get(mtp_checkpoint, role="decode", **opts).engine
    cs = cases()
    expected = tokens(llm_cache.get(mtp_checkpoint, **OPTS).generate([p for _, p, _ in cs], [s for _, _, s in cs]))
    got, _ = hand_off_all(prefill, decode, cs)
    assert [got[rid] for rid, _, _ in cs] == expected
    assert decode.stats()["spec_draft_tokens"] > 0


@pytest.mark.parametrize("groups", [1, 4])
def test_routing_keeping_every_group_is_plain_top_k(groups):
    """With topk_group == n_group (Moonlight, V2-Lite) no group is masked: the biased top-k over all experts."""
    from kernels.moe.torch_ref import select_experts_grouped_ref
    g = torch.Generator().manual_seed(groups)
    logits, bias = torch.randn(7, 16, generator=g), torch.randn(16, generator=g) * 0.1
    weights, ids = select_experts_grouped_ref(logits, bias, 3, groups, groups, True, 2.5)
    want = torch.topk(logits.sigmoid() + bias, 3, dim=-1)[1]
    assert torch.equal(ids.sort(-1).values.long(), want.sort(-1).values)
    chosen = logits.sigmoid().gather(1, ids.long())
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * 2.5)


@torch.inference_mode()
def test_verify_step_in_a_graph_bucket_gives_the_fed_rows(mtp_checkpoint):
    """What a verify graph replays, run without capture on the CPU: three sequences feeding 1, 3 and 2 tokens
    (a last token and its drafts) staged into a bucket of 4 sequences x 3 rows by the graph runner. The model
    over the padded step gives each fed token the hidden state of the plain ragged step, and so does the MTP
    module over it (its graph's input: the next token ids in the same rows); pad rows write no KV."""
    import numpy as np
    from engine.config import EngineConfig
    from engine.core import EngineCore
    from engine.worker.cuda_graph import GraphInputs, StepGraphRunner
    from engine.worker.input_batch import StepBatch, prepare_host
    core = EngineCore(EngineConfig(model=str(mtp_checkpoint), device="cpu", speculative_config=mtp_k(2)))
    try:
        r = core.runner
        bs, rng = r.config.block_size, np.random.default_rng(0)
        tables = [[4 * b + i for i in range(4)] for b in range(3)]
        step = lambda start, n: StepBatch(num_computed=np.array(start), num_new=np.array(n),
                                          pending_rows=np.full(3, -1), samples=np.ones(3, bool),
                                          token_ids=rng.integers(1, r.vocab_size, sum(n)))
        prompt_lens, fed = [5, 19, 3], [1, 3, 2]
        r.forward(prepare_host(step([0] * 3, prompt_lens), tables, bs, True))
        x = prepare_host(step(prompt_lens, fed), tables, bs, True)
        hidden, _, graph_step = r.forward(x)
        assert graph_step is None  # no graphs on the CPU: the eager step
        next_ids = rng.integers(1, r.vocab_size, sum(fed))
        ids, pos, meta, _ = r._device_inputs(x)
        meta.plan = r.backend.plan(meta)
        ids.copy_(torch.from_numpy(next_ids))
        module = r.model.mtp_hidden(ids, pos, hidden, meta)
        before = r.kv_pool.clone()

        graphs = StepGraphRunner(r.model, r.backend, r.device, {1: [1, 2, 4], 3: [1, 2, 4]}, r.max_model_len, bs,
                                 mtp=True)
        p = graphs._stage(GraphInputs(x.input_ids, x.positions, x.slot_mapping, x.host, x.block_tables), 3, 4)
        padded, pmeta = graphs._forward(3, 4)
        torch.testing.assert_close(padded[p.index], hidden, atol=1e-5, rtol=1e-5)
        rows = np.zeros(12, np.int64)
        rows[p.index] = next_ids
        graphs.i64[0, :12] = torch.from_numpy(rows)
        padded_module = r.model.mtp_hidden(graphs.i64[0, :12], graphs.i64[1, :12], padded, pmeta)
        torch.testing.assert_close(padded_module[p.index], module, atol=1e-5, rtol=1e-5)
        # the same KV (the pad rows wrote nowhere, the fed rows the same latents)
        torch.testing.assert_close(r.kv_pool, before, atol=1e-5, rtol=1e-5)
    finally:
        core.shutdown()
