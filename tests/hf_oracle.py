"""The correctness oracle: Hugging Face transformers on the same checkpoint."""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def hf_model(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def hf_greedy(path, prompt_ids: list[int], max_new_tokens: int, dtype=torch.float32) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation (EOS ignored) and the log-softmax at every generated position."""
    model = hf_model(str(path), dtype)
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        logprobs.append(logits.log_softmax(-1))
        token = int(logits.argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


@torch.no_grad()
def hf_logits(path, prompt_ids: list[int], dtype=torch.float32) -> torch.Tensor:
    return hf_model(str(path), dtype)(torch.tensor([prompt_ids])).logits[0].float()
