"""Chat answers beyond plain text: tool calls (`tools.py` plans them, `tool_parsers.py` reads them out of the
text), reasoning (`reasoning.py`), and `output.py`, which turns a choice's text into OpenAI message fields,
whole or as streaming deltas."""
