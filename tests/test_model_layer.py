"""The model layer: ModelConfig.from_hf normalisation, rotary scaling against transformers (tables and whole
models), and the parallel layers' per-rank weight loaders reading only their slice of a checkpoint."""
from __future__ import annotations

import random
import sys
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from engine.distributed.parallel import ParallelContext
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.rotary import inv_freq_for
from engine.layers.vocab_embedding import VocabParallelEmbedding
from engine.models.config import ModelConfig, RopeConfig, context_limit
from engine.models.weights import CheckpointTensor, iter_checkpoint
from tests.hf_oracle import hf_logits
from tests.support.models import build_checkpoint
from tests.test_engine_parity import LOGIT_ATOL


def test_from_hf_unwraps_text_config_and_derives_head_dim():
    import transformers
    text = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                    intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256,
                                    eos_token_id=[5, 7])
    wrapper = transformers.PretrainedConfig(architectures=["Qwen2ForCausalLM"])
    wrapper.text_config = text
    c = ModelConfig.from_hf(wrapper)
    assert (c.architectures, c.vocab_size, c.head_dim, c.num_key_value_heads) == (("Qwen2ForCausalLM",), 99, 16, 2)
    assert c.eos_token_ids == (5, 7) and c.rope.type == "default" and c.max_position_embeddings == 256


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 3.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "mscale": 0.707,
     "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_tables_match_transformers(scaling):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=512,
                                   rope_scaling=dict(scaling), rope_theta=50000.0)
    rope = RopeConfig.from_hf(cfg)
    seq_len = 1500 if rope.type == "dynamic" else None
    ref, ref_scale = ROPE_INIT_FUNCTIONS[rope.type](cfg, torch.device("cpu"), **({"seq_len": seq_len} if seq_len else {}))
    ours, scale = inv_freq_for(rope, 64, 512, seq_len or 512)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-7)


def test_unsupported_rope_is_a_clear_error():
    import transformers
    from engine.errors import UnsupportedModelError
    cfg = transformers.LlamaConfig(rope_scaling={"rope_type": "longrope", "factor": 2.0, "long_factor": [1.0],
                                                 "short_factor": [1.0], "original_max_position_embeddings": 64})
    with pytest.raises(UnsupportedModelError, match="longrope"):
        RopeConfig.from_hf(cfg)


@pytest.mark.parametrize("arch, max_pos, scaling", [
    ("qwen2", 64, {"rope_type": "dynamic", "factor": 2.0}),
    ("qwen3", 64, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("llama", 128, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                    "original_max_position_embeddings": 32}),
])
def test_scaled_rope_models_match_transformers(arch, max_pos, scaling, tmp_path, llm_cache):
    """Whole models with scaled rope and a prompt beyond the original context, prefill logits against
    transformers. Dynamic NTK depends on the forward's length there; ours is fixed for max_model_len, so
    the reference runs one position more than the prompt (= our max_model_len) and is sliced back."""
    from engine.sampling_params import SamplingParams
    from engine.wire import EngineCoreRequest
    path = build_checkpoint(tmp_path / arch, arch, max_position_embeddings=max_pos, rope_scaling=scaling)
    n, dynamic = 100, scaling["rope_type"] == "dynamic"
    llm = llm_cache.get(path, max_model_len=n + 1 if dynamic else None)
    assert context_limit(llm.engine.model_config) > n
    prompt = [random.Random(1).randrange(3, 300) for _ in range(n)]
    engine = llm.engine
    engine.add_request(EngineCoreRequest(request_id="rope", prompt_token_ids=prompt,
                                         params=SamplingParams(temperature=0, max_tokens=1)))
    sched = engine.scheduler.schedule()
    try:
        logits = engine.runner.prefill_logits(sched.scheduled)
    finally:
        engine.abort(["rope"])
        engine.step()
    ref = hf_logits(path, prompt + [3])[:n] if dynamic else hf_logits(path, prompt)
    torch.testing.assert_close(logits, ref, atol=LOGIT_ATOL, rtol=0)


# ---- parallel layers load only their rank's slice -----------------------------------------------------
def ranks(n: int) -> list[ParallelContext]:
    return [ParallelContext(tp_rank=r, tp_size=n) for r in range(n)]


def test_column_row_and_merged_shards():
    torch.manual_seed(0)
    w_gate, w_up, w_down = torch.randn(8, 6), torch.randn(8, 6), torch.randn(6, 8)
    for p in ranks(2):
        merged = MergedColumnParallelLinear(6, [8, 8], ("gate_proj", "up_proj"), parallel=p)
        merged.load_weight("weight", CheckpointTensor.of(w_gate), 0)
        merged.load_weight("weight", CheckpointTensor.of(w_up), 1)
        r = p.tp_rank
        assert torch.equal(merged.weight.data, torch.cat([w_gate[4 * r:4 * r + 4], w_up[4 * r:4 * r + 4]]))
        down = RowParallelLinear(8, 6, parallel=p)
        down.load_weight("weight", CheckpointTensor.of(w_down))
        assert torch.equal(down.weight.data, w_down[:, 4 * r:4 * r + 4])


@pytest.mark.parametrize("tp, kv_heads, expected_kv", [(2, 2, [[0], [1]]), (4, 2, [[0], [0], [1], [1]]),
                                                       (2, 4, [[0, 1], [2, 3]])])
def test_qkv_shards_split_or_replicate_kv_heads(tp, kv_heads, expected_kv):
    torch.manual_seed(1)
    D, H = 4, 8
    q, k, v = torch.randn(H * D, 16), torch.randn(kv_heads * D, 16), torch.randn(kv_heads * D, 16)
    for p in ranks(tp):
        layer = QKVParallelLinear(16, D, H, kv_heads, parallel=p)
        for name, t in (("q", q), ("k", k), ("v", v)):
            layer.load_weight("weight", CheckpointTensor.of(t), name)
        heads = H // tp
        want_q = q[p.tp_rank * heads * D:(p.tp_rank + 1) * heads * D]
        kv_rows = torch.cat([torch.arange(h * D, (h + 1) * D) for h in expected_kv[p.tp_rank]])
        assert torch.equal(layer.weight.data, torch.cat([want_q, k[kv_rows], v[kv_rows]]))


def test_vocab_shards_pad_the_last_rank():
    table = torch.randn(5, 3)
    for p in ranks(2):
        emb = VocabParallelEmbedding(5, 3, parallel=p)
        emb.load_weight("weight", CheckpointTensor.of(table))
        rows = table[3 * p.tp_rank:3 * p.tp_rank + 3]
        assert torch.equal(emb.weight.data[:len(rows)], rows) and not emb.weight.data[len(rows):].any()


def test_checkpoint_tensor_reads_slices_of_a_safetensors_file(tmp_path):
    t = torch.arange(24, dtype=torch.float32).view(4, 6)
    save_file({"w": t}, str(tmp_path / "model.safetensors"))
    (name, lazy), = list(iter_checkpoint(tmp_path))
    assert name == "w" and lazy.shape == (4, 6)
    assert torch.equal(lazy.narrow(0, 1, 2), t[1:3]) and torch.equal(lazy.narrow(1, 4, 2), t[:, 4:6])
    assert torch.equal(lazy.full(), t)
    with pytest.raises(ValueError):
        lazy.narrow(0, 3, 2)


def test_the_http_front_imports_no_engine_core():
    """The front (serve's HTTP process) loads its tokenizer without the engine core, model code or kernels."""
    code = ("import sys, engine.server.launcher, engine.server.api_server, engine.tokenizer\n"
            "heavy = [m for m in sys.modules if m.startswith(('engine.core', 'engine.worker', 'engine.models', "
            "'engine.executor', 'kernels'))]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
