"""The engine core's side of structured outputs: a compiler bound to the model's tokenizer (built on the first
constrained request: reading a large vocabulary takes about a second) with a bounded cache of compiled
grammars, and one matcher per sequence that advances with every accepted token and fills that sequence's row
of the step's token bitmask (bit j of word w allows token 32w + j)."""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np

from engine.errors import InvalidRequestError
from engine.structured.params import StructuredOutputsParams, clean_error

log = logging.getLogger(__name__)
CACHE_SIZE = 256


class GrammarCompiler:
    def __init__(self, tokenizer_path: Path | str, vocab_size: int, stop_token_ids: list[int]):
        self.tokenizer_path = str(tokenizer_path)
        self.vocab_size = vocab_size  # the model's (logits width); may exceed the tokenizer's
        self.stop_token_ids = sorted(set(stop_token_ids))
        self._compiler = None
        self._cache: OrderedDict[str, object] = OrderedDict()

    def _xgr_compiler(self):
        if self._compiler is None:
            import xgrammar as xgr
            from engine.tokenizer import load_tokenizer
            info = xgr.TokenizerInfo.from_huggingface(load_tokenizer(self.tokenizer_path), vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            log.info("event=grammar_compiler_ready vocab=%d", self.vocab_size)
        return self._compiler

    def compile(self, spec: StructuredOutputsParams):
        key = spec.key
        compiled = self._cache.get(key)
        if compiled is None:
            try:
                compiled = self._xgr_compiler().compile_grammar(spec.to_grammar())
            except RuntimeError as e:
                raise InvalidRequestError(f"cannot compile structured_outputs: {clean_error(e)}",
                                          param="structured_outputs") from None
            self._cache[key] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return compiled

    def matcher(self, spec: StructuredOutputsParams) -> "SequenceGrammar":
        import xgrammar as xgr
        return SequenceGrammar(xgr.GrammarMatcher(self.compile(spec)), self.vocab_size)


class SequenceGrammar:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def accept(self, token_id: int) -> bool:
        """Advances past a sampled token; False when the grammar does not allow it (the mask should make that
        impossible, but a token fed from elsewhere, e.g. a migration, may be anything)."""
        return bool(self.matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return bool(self.matcher.is_terminated())

    def fill(self, bitmask, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


def step_bitmask(rows: list[tuple[int, SequenceGrammar]], batch: int, vocab_size: int) -> np.ndarray:
    """[batch, ceil(V/32)] int32: the constrained rows' masks, every other row all ones."""
    import xgrammar as xgr
    bitmask = xgr.allocate_token_bitmask(batch, vocab_size)  # torch int32, all bits set
    for row, grammar in rows:
        grammar.fill(bitmask, row)
    return bitmask.numpy()
