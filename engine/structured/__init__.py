"""Structured outputs: constraints on what a request may generate (a JSON schema, any JSON object, a regex, a
list of choices, an EBNF grammar), compiled by xgrammar into per-sequence matchers whose token bitmasks the
sampler applies to the whole batch on the device.

- `params.py`: `StructuredOutputsParams` (vLLM's), carried in SamplingParams, checked where a request enters.
- `grammar.py`: the engine core's compiler (tokenizer-aware, cached) and each sequence's matcher.
"""
from engine.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
