"""Reasoning parsers (`--reasoning-parser`, vLLM's names): split `<think>...</think>` off the answer as
`reasoning_content`. Like the tool parsers, `split(text, final)` is prefix-monotonic: a partial end marker is
held back, reasoning loses its trailing and content its leading whitespace, so streaming sends differences."""
from __future__ import annotations

from engine.chat.tool_parsers import partial_suffix


class ThinkParser:
    name = ""
    start, end = "<think>", "</think>"
    always_opens = False  # the model thinks first whether or not it writes the start tag

    def opens(self, prompt_text: str) -> bool:
        """Does the output start inside the reasoning? (The chat template may have opened it in the prompt.)"""
        return self.always_opens or prompt_text.rstrip().endswith(self.start)

    def split(self, text: str, final: bool, opened: bool) -> tuple[str, str]:
        """(reasoning, content) of the output so far."""
        head = text.lstrip()
        if head.startswith(self.start):
            opened, text = True, head[len(self.start):]
        elif not opened:
            if not final and self.start.startswith(head):
                return "", ""  # the start tag may be arriving
            return "", text
        at = text.find(self.end)
        if at < 0:
            if not final:
                text = text[:len(text) - partial_suffix(text, self.end)]
            return text.strip(), ""
        return text[:at].strip(), text[at + len(self.end):].lstrip()


class Qwen3ReasoningParser(ThinkParser):
    """Qwen3: thinks inside <think>...</think> when thinking is on (the template's `enable_thinking`)."""

    name = "qwen3"


class DeepSeekR1ReasoningParser(ThinkParser):
    """DeepSeek-R1: the template opens <think> in the prompt; everything up to </think> is reasoning."""

    name = "deepseek_r1"
    always_opens = True


REASONING_PARSERS: dict[str, type[ThinkParser]] = {p.name: p for p in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)}
