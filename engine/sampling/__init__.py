"""Sampling: the sampler (penalties, temperature, top-k/top-p/min-p, logprobs) and the per-step tensors it reads."""
