"""Incremental detokenisation and stop strings for one output sequence."""
from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool, stop: list[str] | None,
                 include_stop_str_in_output: bool):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.stop = stop or []
        self.include_stop = include_stop_str_in_output
        self.text = ""
        # text that could still be the start of a stop string is withheld from streaming
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add_tokens(self, token_ids: list[int], check_stop: bool = True) -> str | None:
        """Appends decoded text; returns the stop string that ended the text, if one did."""
        start = len(self.text)
        for token in token_ids:
            piece = self._stream.step(self._backend, token)
            if piece:
                self.text += piece
        if not (self.stop and check_stop):
            return None
        window = max(0, start - self._hold)
        best = None
        for s in self.stop:
            pos = self.text.find(s, window)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        pos, s = best
        self.text = self.text[:pos + len(s)] if self.include_stop else self.text[:pos]
        return s

    def stream_safe_len(self, finished: bool) -> int:
        """How much of the text can be sent to a streaming client without un-sending a stop string."""
        return len(self.text) if finished or not self.stop else max(0, len(self.text) - self._hold)
