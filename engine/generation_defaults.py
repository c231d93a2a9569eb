"""Sampling defaults a checkpoint ships in its generation_config.json (temperature, top_p, top_k, ...). vLLM
applies them unless a request sets the value (`--generation-config auto`, its default); so do we."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)
# generation_config.json key -> SamplingParams field
KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(setting: str, model_path: str | Path) -> dict:
    """`setting`: "auto" (the model folder's file), "vllm" (none) or a folder holding a generation_config.json."""
    if setting == "vllm":
        return {}
    folder = Path(model_path) if setting == "auto" else Path(setting)
    path = folder / "generation_config.json"
    if not path.is_file():
        if setting != "auto":
            raise FileNotFoundError(f"--generation-config {setting}: no generation_config.json there")
        return {}
    raw = json.loads(path.read_text())
    if raw.get("do_sample") is False:  # greedy by the checkpoint's own account
        raw = {**raw, "temperature": 0.0}
    out = {field: raw[key] for key, field in KEYS.items() if isinstance(raw.get(key), (int, float))
           and not isinstance(raw.get(key), bool)}
    if out:
        log.info("event=generation_defaults source=%s %s", path, " ".join(f"{k}={v}" for k, v in sorted(out.items())))
    return out
