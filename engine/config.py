"""EngineConfig: every engine option in one typed place, validated once; the CLI is generated from it."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from ctrl_client.schema import EngineRole
from engine.errors import InvalidRequestError


def literal_choices(cls) -> dict[str, tuple[str, ...]]:
    """Fields typed as a Literal of strings, with their allowed values."""
    hints = typing.get_type_hints(cls)
    return {name: typing.get_args(t) for name, t in hints.items() if typing.get_origin(t) is Literal}


def check_field(ok: bool, name: str, message: str) -> None:
    """Config validation: a typed error that names the offending field (and its CLI flag)."""
    if not ok:
        raise InvalidRequestError(f"{name} {message}", param=name)


def opt(default, help: str, **kw):
    """A config field with its CLI help text (the CLI is generated from these)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EngineConfig:
    model: str = opt("", "HF checkpoint folder, .gguf file or Hugging Face repo id (the local cache, else the hub); "
                          "empty: the embedded default model", positional=True)
    tokenizer: str | None = opt(None, "tokenizer folder (default: the model's)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = opt(
        "auto", "weights and activations dtype; auto: the checkpoint's (float32 on CPU for fp16 checkpoints)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: cuda when available")
    max_model_len: int | None = opt(None, "context length (prompt + output); default: the model's")
    max_num_seqs: int = opt(256, "most sequences in one step")
    max_num_batched_tokens: int = opt(8192, "token budget of one step (chunked prefill splits prompts to fit)")
    enable_chunked_prefill: bool = opt(True, "split long prompts across steps under the token budget")
    block_size: int = opt(16, "tokens per KV-cache block")
    enable_prefix_caching: bool = opt(True, "reuse KV blocks of identical prompt prefixes")
    gpu_memory_utilization: float = opt(0.9, "fraction of GPU memory for weights + activations + KV cache")
    kv_cache_memory_bytes: int | None = opt(
        None, "KV-cache byte budget (overrides gpu_memory_utilization; default 1 GiB on CPU)")
    num_kv_blocks: int | None = opt(None, "exact number of KV blocks (tests; overrides the budgets)")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = opt("auto", "KV-cache dtype; auto: the model dtype")
    enforce_eager: bool = opt(False, "disable CUDA graphs")
    async_scheduling: bool = opt(
        True, "schedule and launch step N+1 while the device runs step N (sequences that stop at N "
              "compute one token more, which is dropped)")
    speculative_config: str | None = opt(
        None, 'speculative decoding, JSON like vLLM\'s: {"method": "ngram", "num_speculative_tokens": 3, '
              '"prompt_lookup_max": 4, "prompt_lookup_min": 1} or {"method": "mtp", "num_speculative_tokens": 1} '
              '(DeepSeek-V3 / Kimi-K2 checkpoints); outputs are unchanged; async scheduling is off')
    attention_backend: Literal["auto", "torch", "flashinfer", "triton", "flashmla"] = opt(
        "auto", "auto: flashinfer on CUDA when installed, else triton on CUDA, else the torch reference; MLA "
                "models (DeepSeek): flashmla for decode where it runs (Hopper, --block-size 64), else triton")
    fp8_attention: Literal["auto", "fp8", "exact"] = opt(
        "auto", "attention over FP8 KV pages (flashinfer backend): fp8 rounds q and the softmax "
                "probabilities to E4M3 and runs FP8 tensor cores (XQA decode, FlashAttention-3 prefill; "
                "Hopper), exact keeps q in the model dtype; auto: fp8 where it runs")
    tensor_parallel_size: int = opt(1, "ranks (GPUs) per engine: attention heads, MLP and vocab split across them")
    data_parallel_size: int = opt(1, "attention data parallelism: this many groups of tensor_parallel_size ranks, "
                                     "each with its own batch, scheduler slice and KV pool (MoE models: with "
                                     "--enable-expert-parallel, the experts spread over all the ranks)")
    enable_expert_parallel: bool = opt(False, "MoE layers: spread whole experts over the ranks (expert parallelism) "
                                       "instead of splitting every expert's intermediate dimension")
    distributed_executor_backend: Literal["auto", "uni", "mp", "ray"] = opt(
        "auto", "how ranks run: uni (one process), mp (one process per GPU on this node), ray (Ray actors "
                "across the nodes of a Ray cluster); auto: uni at tensor_parallel_size 1, else mp")
    ray_address: str | None = opt(None, "Ray cluster to join with the ray backend (host:port of its head); "
                                        "none: this node's cluster, or a local one")
    distributed_timeout_s: float = opt(
        120.0, "a collective or a worker call that takes longer fails (a dead or hung rank stops the engine)")
    seed: int = opt(0, "engine seed: draws the sampling seeds of requests that bring none")
    role: EngineRole = opt("hybrid", "hybrid, or one half of a prefill/decode pair")
    kv_transfer_host: str = opt("127.0.0.1", "address the DLSlime KV endpoint binds and advertises; auto: this "
                                             "machine's routable address (containers)")
    kv_park_timeout_s: float = opt(60.0, "prefill: reclaim KV that no decode engine pulled or freed in time")
    kv_pull_timeout_s: float = opt(30.0, "decode: fail a KV pull that has not finished in time")
    kv_staging_bytes: int = opt(2 << 30, "GPU pools over TCP: pinned host memory that stages KV in and out")
    kv_transport: Literal["auto", "ipc", "rdma", "tcp"] = opt(
        "auto", "how KV moves between engines: auto offers CUDA IPC (GPU pools; used between engines on one host) "
                "and TCP, and a puller takes the best one both sides offer; naming one offers only that one (rdma: "
                "GPUDirect through DLSlime, needs an RDMA NIC)")

    def __post_init__(self) -> None:
        check = check_field
        check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        check(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size",
              "must be a power of two")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]")
        check(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2")
        check(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", "must be >= 1")
        check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "kv_cache_memory_bytes",
              "must be > 0")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(self.data_parallel_size >= 1, "data_parallel_size", "must be >= 1")
        check(self.distributed_executor_backend != "uni" or self.world_size == 1,
              "distributed_executor_backend", "uni runs one rank: use mp or ray with more than one rank")
        check(self.distributed_timeout_s > 0, "distributed_timeout_s", "must be > 0")
        if self.speculative_config is not None:
            self.speculative()  # a typed error naming the field
            check(self.data_parallel_size == 1, "speculative_config", "does not run with data_parallel_size > 1 yet")
        for name, choices in literal_choices(type(self)).items():
            check(getattr(self, name) in choices, name, f"must be one of {', '.join(choices)}")

    def speculative(self):
        """`speculative_config` parsed (engine/spec_decode/config.py), or None without speculative decoding."""
        from engine.spec_decode.config import SpeculativeConfig
        return SpeculativeConfig.parse(self.speculative_config) if self.speculative_config is not None else None

    @property
    def world_size(self) -> int:
        """Ranks of the engine: data_parallel_size groups of tensor_parallel_size."""
        return self.tensor_parallel_size * self.data_parallel_size

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InvalidRequestError(f"unknown engine option(s): {', '.join(unknown)}", param=unknown[0])
        return cls(**kwargs)
