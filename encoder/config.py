"""The encoder server's typed options; `slipstream encoder` generates its flags from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import check_field, opt
from engine.server.config import MediaConfig
from engine.server.registration import CtrlConfig


@dataclass
class EncoderConfig(CtrlConfig, MediaConfig):
    model: str = opt("", "a multimodal checkpoint folder (Qwen3-VL); only its vision tower is loaded",
                     positional=True)
    host: str = opt("127.0.0.1", "HTTP bind address")
    port: int = opt(8100, "HTTP port")
    served_model_name: str | None = opt(None, "model name the encoder answers to (default: the model path)")
    device: str = opt("auto", "cuda, cpu, or auto (cuda when present)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        "auto", "tower and embedding dtype: auto = bfloat16 on GPUs, float32 on CPUs (prefill engines pull "
                "rows of this dtype)")
    embedding_cache_tokens: int = opt(65536, "image tokens whose embeddings the registered region holds "
                                             "(the embedding cache; leased entries are never evicted)")
    max_batch_images: int = opt(32, "images encoded in one tower call at most")
    batch_wait_ms: float = opt(2.0, "how long the batching queue waits for more images before a call")
    lease_timeout: float = opt(60.0, "seconds a handed-out embedding stays pinned without /v1/encode/free")
    drain_timeout: float = opt(30.0, "on SIGTERM, seconds to finish in-flight requests")
    api_key: str | None = opt(None, "require `Authorization: Bearer KEY` on /v1/*", secret=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(bool(self.model), "model", "is required")
        check_field(0 <= self.port < 65536, "port", "must be in [0, 65535]")
        check_field(self.embedding_cache_tokens >= 1024, "embedding_cache_tokens", "must be >= 1024")
        check_field(self.max_batch_images >= 1, "max_batch_images", "must be >= 1")
        check_field(self.batch_wait_ms >= 0, "batch_wait_ms", "must be >= 0")
        check_field(self.lease_timeout > 0, "lease_timeout", "must be > 0")
