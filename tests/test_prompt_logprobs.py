"""prompt_logprobs: each prompt token's logprob under the model (after the first), equal to transformers' on the
same checkpoint, whether the prompt is prefilled whole or in chunks, beside a prefix-cached twin, and at
tensor_parallel_size 2 (every rank joins the logits collective for the prompt rows)."""
from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams

PROMPT = list(range(5, 60))


@pytest.fixture(scope="module")
def hf_logprobs(tiny_llama):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].log_softmax(-1)


@pytest.mark.parametrize("options", [dict(), dict(max_num_batched_tokens=16, enable_prefix_caching=True),
                                     dict(tensor_parallel_size=2)], ids=["whole", "chunked+prefix-cache", "tp2"])
def test_prompt_logprobs_match_transformers(llm_cache, tiny_llama, hf_logprobs, options):
    llm = llm_cache.get(tiny_llama, **options)
    # the twin without prompt_logprobs goes first, so that the prefix cache holds this prompt's blocks
    llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=1))
    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=2, temperature=0,
                                                                       prompt_logprobs=3))[0]
    rows = out.prompt_logprobs
    assert rows[0] is None and len(rows) == len(PROMPT)
    got = torch.tensor([rows[i][PROMPT[i]].logprob for i in range(1, len(PROMPT))])
    want = torch.stack([hf_logprobs[i - 1, PROMPT[i]] for i in range(1, len(PROMPT))])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    for i in range(1, len(PROMPT)):  # the top 3 are the reference's top 3, ranked 1..3
        top = sorted((v.rank, t) for t, v in rows[i].items() if v.rank <= 3)
        assert [t for _, t in top] == hf_logprobs[i - 1].topk(3).indices.tolist()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
