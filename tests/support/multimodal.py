"""A tiny random Qwen3-VL checkpoint (vision tower with deepstack taps, multimodal rope), saved as a real Hugging
Face folder: config.json, safetensors, preprocessor_config.json and a tokenizer whose chat template writes
<|vision_start|><|image_pad|><|vision_end|> for an image part, as Qwen3-VL's does; and test images."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.bench.epd import VL_CHAT_TEMPLATE  # Qwen3-VL's template, reduced to text and image parts
from tests.support.models import build_tokenizer

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PATCH, MERGE = 8, 2
PREPROCESSOR = {"patch_size": PATCH, "temporal_patch_size": 2, "merge_size": MERGE,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "size": {"shortest_edge": 16 * 16 * 4, "longest_edge": 96 * 96},
                "image_processor_type": "Qwen2VLImageProcessor"}


def build_qwen3_vl(path: Path, seed: int = 0, dtype=torch.float32, moe: bool = False) -> Path:
    """`moe`: Qwen3-VL-MoE (4 experts, top 2, the middle decoder layer dense); its experts are saved stacked."""
    import transformers
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, tuple(VISION_TOKENS), VL_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
    if moe:  # 2 x moe_intermediate_size != hidden: the stacked layouts tell apart
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
                    mlp_only_layers=[1])
    config_cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                                        video_token_id=ids["<|video_pad|>"],
                                        vision_start_token_id=ids["<|vision_start|>"],
                                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
                                        eos_token_id=tok.eos_token_id)
    arch = "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(dtype)
    with torch.no_grad():  # non-trivial norms and biases, larger weights: every part of the tower matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.2)
            elif "visual" in name or "embed_tokens" in name or "mlp.experts" in name or "mlp.gate" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(path), safe_serialization=True)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return path


def offline_chat_text(llm, images: list, n: int, text: str = "what is it?") -> tuple[str, int]:
    """The offline engine's greedy answer (and its prompt's token count, images expanded) to the chat that
    tests/test_server_images.py and tests/test_epd.py send: "Look: " + each image + " and " + `text`."""
    from engine.sampling_params import SamplingParams
    parts = [{"type": "text", "text": "Look: "}]
    for _ in images:
        parts += [{"type": "image"}, {"type": "text", "text": " and "}]
    parts.append({"type": "text", "text": text})
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    out = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": images}}],
                       SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    return out.outputs[0].text, len(out.prompt_token_ids)


def decoded(urls: list[str]) -> list:
    """Each data URL's image as a server decodes it (JPEG and WebP are lossy: compare with these)."""
    from PIL import Image
    return [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in urls]


def chat_content(urls: list[str], text: str = "what is it?") -> list[dict]:
    """The OpenAI content parts of that chat."""
    parts = [{"type": "text", "text": "Look: "}]
    for url in urls:
        parts += [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": " and "}]
    return parts + [{"type": "text", "text": text}]


def make_image(width: int, height: int, seed: int):
    """A deterministic RGB image with structure (gradients plus noise), as a PIL image."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    noise = rng.integers(0, 64, (height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory) -> Path:
    return build_qwen3_vl(tmp_path_factory.mktemp("qwen3-vl") / "model")


@pytest.fixture(scope="session")
def tiny_qwen3_vl_moe(tmp_path_factory) -> Path:
    return build_qwen3_vl(tmp_path_factory.mktemp("qwen3-vl-moe") / "model", seed=3, moe=True)


class EncoderProcess:
    """A running `slipstream encoder` (its own HTTP surface: /health, /v1/encode, /encoder_info, /metrics)."""

    def __init__(self, model: Path, log_dir: Path, *args: str):
        import subprocess
        import sys
        from tests.support.server import REPO, ServerProcess, free_port
        self.port = free_port()
        self.log = log_dir / f"encoder-{self.port}.log"
        cmd = [sys.executable, "-m", "engine.cli.main", "encoder", str(model), "--port", str(self.port),
               "--device", "cpu", *args]
        with self.log.open("ab") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.http = ServerProcess(proc, self.port, self.log)  # raw HTTP and stop() (no engine core here)
        self.proc, self.url = proc, self.http.url

    def wait_healthy(self, timeout: float = 120.0) -> "EncoderProcess":
        import time
        deadline = time.monotonic() + timeout
        while self.http.health() != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.http.stop()
                raise RuntimeError(f"encoder did not start:\n{self.http.log_tail()}")
            time.sleep(0.05)
        return self

    def info(self) -> dict:
        status, body = self.http.get_json("/encoder_info")
        assert status == 200, body
        return body

    def stop(self, sig=None) -> None:
        import signal
        self.http.stop(sig or signal.SIGTERM)
