"""Models by Hugging Face repo id (`Qwen/Qwen3-8B`), as vLLM takes them: the local Hugging Face cache first, then
the hub when it is reachable (HF_HUB_OFFLINE=1 forbids that). Only the files an engine reads are fetched."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
ENGINE_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]


def looks_like_repo_id(model: str) -> bool:
    return bool(REPO_ID.match(model)) and not Path(model).expanduser().exists()


def resolve_repo_id(repo_id: str) -> Path:
    """The snapshot folder of `repo_id` (revision `main`); FileNotFoundError says where it looked. A download
    shows huggingface_hub's progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    cache_dir = os.environ.get("HF_HUB_CACHE")  # read now: huggingface_hub reads it once, at import
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ENGINE_FILES, cache_dir=cache_dir,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    where = cache_dir or "the Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise FileNotFoundError(f"{repo_id!r} is not a local path nor in {where}, and HF_HUB_OFFLINE forbids a "
                                f"download") from None
    log.info("event=model_download repo=%s", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ENGINE_FILES, cache_dir=cache_dir))
    except Exception as e:  # unreachable hub, unknown or gated repo
        raise FileNotFoundError(f"{repo_id!r} is not a local path nor in {where}, and the download failed: "
                                f"{type(e).__name__}: {e}") from None

