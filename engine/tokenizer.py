"""Tokenizer loading, without torch: the HTTP front loads one and must stay light."""
from __future__ import annotations


def load_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))
