"""The embedded default model end to end: our greedy output equals transformers' (CPU, float32),
and `slipstream generate` answers the README's question."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.hf_oracle import hf_greedy

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
MAX_NEW = 16


def test_smollm2_greedy_matches_transformers(smollm2, llm_cache):
    llm = llm_cache.get(smollm2.path, dtype="float32", max_model_len=1024, kv_cache_memory_bytes=128 << 20)
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ref, _ = hf_greedy(smollm2.path, prompt, MAX_NEW, dtype=torch.float32)
        assert out.outputs[0].token_ids == ref
    assert "Paris" in outs[0].outputs[0].text


def test_generate_cli_answers_the_readme_question(smollm2):
    env = {**os.environ, "XDG_CACHE_HOME": str(smollm2.xdg)}  # the session's converted copy: a cache hit
    out = subprocess.run([sys.executable, "-m", "engine.cli.main", "generate", "What is the capital of France?",
                          "--device", "cpu", "--max-tokens", "20"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_generate_cli_reports_bad_input_without_traceback(smollm2, tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine.cli.main", "generate", "hi", "--model", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "Traceback" not in out.stderr and "none" in out.stderr


def test_the_readme_offline_example_runs_as_written(smollm2):
    """The README's first Python block, exactly as written (it loads the embedded default model)."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Offline API\n\n```python\n(.*?)```", readme, re.S).group(1)
    env = {**os.environ, "XDG_CACHE_HOME": str(smollm2.xdg)}  # the session's converted copy: not converted again
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1], env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("\n") >= 4, out.stdout  # two generations, the stream, the chat answer


def test_a_hugging_face_repo_id_loads_from_the_local_cache(tiny_llama, tmp_path):
    """`org/name` resolves through the Hugging Face cache (its real layout: refs/main -> snapshots/<commit>)."""
    import shutil
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = ["--device", "cpu", "--max-tokens", "4", "--temperature", "0"]
    out = subprocess.run([sys.executable, "-m", "engine.cli.main", "generate", "hello", "--model", "tiny-org/tiny-llama",
                          *args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    direct = subprocess.run([sys.executable, "-m", "engine.cli.main", "generate", "hello", "--model", str(tiny_llama),
                             *args], capture_output=True, text=True, timeout=600)
    assert out.stdout == direct.stdout and out.stdout.strip()
    missing = subprocess.run([sys.executable, "-m", "engine.cli.main", "generate", "hello", "--model", "nobody/nothing",
                              *args], capture_output=True, text=True, timeout=600, env=env)
    assert missing.returncode != 0 and "HF_HUB_OFFLINE" in missing.stderr and "Traceback" not in missing.stderr
