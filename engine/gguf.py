"""Resolves a `--model` argument to a Hugging Face checkpoint folder; a GGUF file is converted
once (dequantized by transformers + `gguf`) into a cached bf16 HF folder."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

GGUF_MAGIC = b"GGUF"
# Bump when the converter's output changes, so that stale cache entries are not reused.
CONVERTER_VERSION = 1
MARKER = "slipstream-gguf.json"
_EXPECTED = "a Hugging Face checkpoint folder (with config.json) or a .gguf file"


def resolve_model_path(model: str | os.PathLike, progress: bool = True) -> Path:
    """Return an HF checkpoint folder for `model`: the folder itself, or a GGUF's cached conversion."""
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist; expected {_EXPECTED}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        hint = "; it holds .gguf files: pass one of them" if any(path.glob("*.gguf")) else ""
        raise ValueError(f"model folder {str(path)!r} has no config.json{hint}; expected {_EXPECTED}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"model file {str(path)!r} is not a GGUF file (bad magic); expected {_EXPECTED}")
    return convert_gguf(path, progress=progress)


def gguf_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "slipstream" / "gguf"


def cached_folder(gguf_path: Path) -> Path:
    """The cache folder for this exact file. Keyed on path, size and mtime rather than a content
    hash, because hashing a multi-GB GGUF on every start would cost more than the cache saves."""
    gguf_path = gguf_path.resolve()
    st = gguf_path.stat()
    key = f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}|{CONVERTER_VERSION}"
    return gguf_cache_root() / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def convert_gguf(gguf_path: Path, progress: bool = True) -> Path:
    """Convert once; concurrent callers wait on a file lock and then find the finished folder."""
    out = cached_folder(gguf_path)
    if (out / MARKER).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / MARKER).is_file():  # another process finished while we waited
            return out
        # Under the lock nobody else converts this file: clear what a killed run left behind.
        for stale in [out, *out.parent.glob(f".{out.name}.*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            start = time.monotonic()
            if progress:
                print(f"Converting {gguf_path.name} to a bf16 Hugging Face folder (once) -> {out}",
                      file=sys.stderr, flush=True)
            _convert(gguf_path, tmp, progress)
            (tmp / MARKER).write_text(json.dumps({
                "source": str(gguf_path.resolve()), "converter_version": CONVERTER_VERSION,
                "seconds": round(time.monotonic() - start, 2)}))
            # mkdtemp makes a private 0700 folder; the cache is meant to be readable like a download.
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)
            os.rename(tmp, out)  # atomic: readers see no folder or a complete one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"Converted in {time.monotonic() - start:.1f}s", file=sys.stderr, flush=True)
    return out


def _convert(gguf_path: Path, out: Path, progress: bool) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A meta-device model gives the HF parameter names, shapes and weight tying without memory.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # load_gguf_checkpoint rather than from_pretrained(gguf_file=...): the latter insists on
    # `accelerate` (transformers 4.5x and 5.x alike) and builds a real model we do not need.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(sys.stderr if progress else devnull):
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    state = _checked_state_dict(model, parsed["tensors"])
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})

    config.architectures = [type(model).__name__]
    # GGUF stores float32: write the shortest decimal that rounds to it (1e-05, not 9.99999974e-06).
    if isinstance(getattr(config, "rms_norm_eps", None), float):
        config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings
    _apply_gguf_special_tokens(tokenizer, parsed)
    # Keep the chat template inside tokenizer_config.json (not only chat_template.jinja) so
    # that readers other than recent transformers find it too.
    tokenizer.save_pretrained(out, save_jinja_files=False)


def _apply_gguf_special_tokens(tokenizer, parsed: dict) -> None:
    """Make the tokenizer say what the GGUF says (`parsed`: transformers' reading of its fields, the tensors'
    call's: parsing a GGUF's fields again took ~5 s of a small model's conversion). transformers drops some of
    it, differently per version: 4.57 makes eos = bos for gpt2-style vocabularies and always adds BOS to llama
    tokenizers; 5.x never adds BOS even when the GGUF asks for it."""
    ids, flags = parsed.get("tokenizer") or {}, parsed.get("tokenizer_config") or {}
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = _scalar(ids.get(f"{attr}_id"))
        if value is not None and getattr(tokenizer, attr) != (token := tokenizer.convert_ids_to_tokens(int(value))):
            setattr(tokenizer, attr, token)
    for flag in ("add_bos_token", "add_eos_token"):
        value = _scalar(flags.get(flag))
        # Only tokenizer classes with this property honour it; others keep their behaviour.
        if value is not None and getattr(tokenizer, flag, bool(value)) != bool(value):
            setattr(tokenizer, flag, bool(value))


def _scalar(value):
    """A one-value GGUF field as transformers returns it: the value (or, in some versions, a one-item list)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _checked_state_dict(model, tensors: dict) -> dict:
    """Match dequantized tensors to the model's parameters: every one present with its shape and
    finite, tied aliases (lm_head when embeddings are tied) dropped so they are not saved twice."""
    params, seen = {}, set()
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) not in seen:  # a tied alias appears after its source; keep the first name
            seen.add(id(p))
            params[name] = p
    aliases = set(model.state_dict(keep_vars=True)) - set(params)
    extra = set(tensors) - set(params) - aliases
    missing = set(params) - set(tensors)
    if missing or extra:
        raise ValueError(f"GGUF tensors do not match {type(model).__name__} "
                         f"(tie_word_embeddings={model.config.tie_word_embeddings}): "
                         f"missing {sorted(missing)[:8]}, unexpected {sorted(extra)[:8]}")
    for name, p in params.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"GGUF tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        if not t.isfinite().all():
            raise ValueError(f"GGUF tensor {name} has non-finite values after dequantization")
    return {name: tensors[name] for name in params}
