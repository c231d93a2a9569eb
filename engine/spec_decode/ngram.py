"""The ngram drafter (vLLM's "ngram", prompt lookup decoding): the sequence's last n tokens (n from
prompt_lookup_max down to prompt_lookup_min) are looked up earlier in its prompt and output; the tokens that
followed the latest earlier occurrence are the drafts. Host-side numpy, no model: it pays off where outputs
repeat their input (code edits, extraction, summaries that quote)."""
from __future__ import annotations

import numpy as np


def propose(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k drafts continuing `token_ids` (none when no suffix of length n_min..n_max occurred before)."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:L - 1], n)  # starts 0 .. L - 1 - n
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # what followed the latest earlier occurrence
            return tokens[start:start + k].tolist()
    return []
