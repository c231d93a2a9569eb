"""Bad input gets a typed error naming the field, and the engine keeps working afterwards."""
from __future__ import annotations

import json

import pytest

from engine.errors import InvalidRequestError, ModelNotFoundError, PromptTooLongError, UnsupportedModelError
from engine.llm import LLM
from engine.sampling_params import SamplingParams

GOOD = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture
def llm(tiny_models, llm_cache):
    return llm_cache.get(tiny_models["llama"], max_model_len=64)


def still_works(llm):
    out = llm.generate([[5, 6, 7]], GOOD)[0].outputs[0]
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("prompt, params, error, param", [
    ([5] * 64, GOOD, PromptTooLongError, "prompt"),
    ([5] * 500, GOOD, PromptTooLongError, "prompt"),
    ([], GOOD, InvalidRequestError, "prompt"),
    ("", GOOD, InvalidRequestError, "prompt"),
    ([5, 10 ** 9], GOOD, InvalidRequestError, "prompt"),
    ([5, -1], GOOD, InvalidRequestError, "prompt"),
    ([1.5, 2], GOOD, InvalidRequestError, "prompt"),
])
def test_bad_prompts(llm, prompt, params, error, param):
    with pytest.raises(error) as e:
        llm.generate([prompt], params)
    assert e.value.param == param
    still_works(llm)


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-5), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(max_tokens=10 ** 12), "max_tokens"),
    (dict(n=0), "n"),
    (dict(n=10 ** 6), "n"),
    (dict(logprobs=100), "logprobs"),
    (dict(presence_penalty=5.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(min_tokens=9, max_tokens=3), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-2]), "stop_token_ids"),
    (dict(seed=1 << 70), "seed"),
])
def test_bad_sampling_params(llm, kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)
    still_works(llm)


def test_failed_batch_leaves_nothing_behind(llm):
    with pytest.raises(PromptTooLongError):
        llm.generate([[5, 6], [7] * 100], GOOD)
    still_works(llm)


def test_unknown_architecture(tmp_path, tiny_models):
    folder = tmp_path / "foo"
    folder.mkdir()
    for f in tiny_models["llama"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        LLM(str(folder), device="cpu")
    assert "FooForCausalLM" in str(e.value) and "LlamaForCausalLM" in str(e.value) and e.value.param == "model"


@pytest.mark.parametrize("options, param", [
    (dict(dtype="float64"), "dtype"),
    (dict(block_size=3), "block_size"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(no_such_option=1), "no_such_option"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="uni"), "distributed_executor_backend"),
])
def test_bad_engine_options(tiny_models, options, param):
    with pytest.raises(InvalidRequestError) as e:
        LLM(str(tiny_models["llama"]), device="cpu", **options)
    assert e.value.param == param


def test_tensor_parallel_size_must_split_the_heads(tiny_models):
    with pytest.raises(UnsupportedModelError) as e:  # 4 query heads, 2 KV heads: 3 ranks cannot split them
        LLM(str(tiny_models["llama"]), device="cpu", tensor_parallel_size=3)
    assert e.value.param == "tensor_parallel_size" and "num_attention_heads 4" in e.value.message


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        LLM(str(tmp_path / "nope"), device="cpu")
    assert "nope" in str(e.value) and e.value.param == "model"
    (tmp_path / "x.bin").write_bytes(b"junk")
    with pytest.raises(UnsupportedModelError) as e:
        LLM(str(tmp_path / "x.bin"), device="cpu")
    assert e.value.param == "model"


def test_kv_budget_smaller_than_one_sequence(tiny_models):
    with pytest.raises(UnsupportedModelError) as e:
        LLM(str(tiny_models["llama"]), device="cpu", num_kv_blocks=2, block_size=4, max_model_len=64)
    assert e.value.param == "max_model_len"
