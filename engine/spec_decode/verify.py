"""Verification of drafts. A verify step feeds a sequence's last token and its k drafts; the target samples
each of those k + 1 positions exactly as plain decoding would sample that output index (the sampler's noise is
a function of the request's seed, the output index and the token: engine/sampling/sampler.py). The tokens kept
are the samples up to and including the first one that differs from the draft it checks.

With greedy requests that is the usual exact-match check. With sampling it is rejection sampling for a draft
that puts all its mass on one token: a draft d is kept with probability p(d), and when it is not, the sample
is drawn from p without d. Both keep the target's distribution, and more: the output equals plain decoding's
token for token, whatever the drafts (tests/test_spec_decode.py checks this with the drafter on and off)."""
from __future__ import annotations


class DraftRow:
    """One sampled position of a verify step, as the sampler's metadata sees a sequence: the sequence, `j`
    output tokens further on (j = 0: its last token's row; j = i: after its i-th draft)."""

    def __init__(self, seq, j: int):
        self.seq, self.j = seq, j

    def __getattr__(self, name):
        return getattr(self.seq, name)

    @property
    def next_output_index(self) -> int:
        return self.seq.next_output_index + self.j


def sample_rows(seqs, drafts_per_seq) -> list:
    """The sampler's rows for sampled sequences fed with drafts: 1 + drafts rows each, in order."""
    return [seq if j == 0 else DraftRow(seq, j) for seq, k in zip(seqs, drafts_per_seq) for j in range(1 + k)]


def accepted_tokens(sampled: list[int], drafts: list[int]) -> list[int]:
    """The tokens a verify step yields (1 .. len(drafts) + 1): the samples while they match the drafts, and
    the first that does not (or the one after the last draft)."""
    n = 0
    while n < len(drafts) and sampled[n] == drafts[n]:
        n += 1
    return sampled[:n + 1]
