"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): the MLA import point. `get_mla_backend` picks
FlashMLA for decode steps where it runs (Hopper, 64-token pages, 512 + 64 latents), else the Triton latent
kernel on CUDA, else the torch reference (CPU).

Every backend computes in the latent space, the "absorbed" form: `kv_b_proj`'s key half is folded into the
query (q_nope @ W_UK, per head, gives a query against the 512-value latent), the step attends as MQA over the
cache's [latent | k_pe] vectors with the latent itself as the value, and the value half W_UV takes the result
back to per-head values. The cache is read once per step, never expanded into per-head K and V. The backends
differ only in that latent attention. `kernels/attention/mla_ref.py` also keeps the expanded computation of
the reference model, which the tests hold the absorbed one to."""
from __future__ import annotations

import abc
import dataclasses
import importlib.util
import logging

import torch

from kernels.attention.metadata import AttentionMetadata
from kernels.attention.mla_ref import mla_latent_attention_ref, store_latent

log = logging.getLogger(__name__)
FLASH_MLA_BLOCK_SIZE = 64  # FlashMLA's paged layout
FLASH_MLA_DIMS = (512, 64)  # (kv_lora_rank, rope_dim) its kernels are built for


@dataclasses.dataclass(frozen=True)
class MLAShape:
    """One rank's latent attention: its query heads and the widths of the latent, the rope part and v."""

    num_heads: int
    kv_lora_rank: int
    rope_dim: int
    nope_dim: int
    v_dim: int
    scale: float


class MLABackend(abc.ABC):
    """Stores each step's latents and attends in the latent space. Same surface as the GQA backends where the
    model runner and the step graphs touch it (`plan`, `supports_cuda_graph`, `supports_verify_graph`,
    `needs_block_tables`)."""

    name = "?"
    supports_cuda_graph = False
    supports_verify_graph = False
    needs_block_tables = True

    def plan(self, meta: AttentionMetadata) -> object:
        """Per-step state outside the forward (None for decode steps of graphable backends)."""
        return None

    def begin_forward(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Per-forward state every layer shares, made inside the forward (so inside a captured graph too)."""
        return meta

    def store(self, latent: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        store_latent(torch.cat([latent, k_pe], dim=-1), cache, slot_mapping)

    def norm_rope_store(self, latent: torch.Tensor, norm_weight: torch.Tensor, eps: float, q_pe: torch.Tensor,
                        k_pe: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool,
                        q_out: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """A step's latent KV into the cache and its query's rotary part into `q_out` [T, heads, rope]: the
        RMS-normalised latent [T, kv_lora_rank] beside k_pe [T, rope] rotated, at each token's slot; q_pe
        [T, heads, rope] rotated into q_out. Three launches here; the Triton backend's is one."""
        from kernels.norm import rms_norm
        from kernels.rope import apply_rope
        _, k_pe = apply_rope(q_pe, k_pe[:, None, :], positions, cos_sin_cache, interleaved, q_out=q_out)
        self.store(rms_norm(latent, norm_weight, eps), k_pe[:, 0], cache, slot_mapping)

    @abc.abstractmethod
    def latent_attention(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, kv_lora_rank: int,
                         scale: float) -> torch.Tensor:
        """q [T, heads, kv_lora_rank + rope_dim] over the cached latents -> [T, heads, kv_lora_rank]."""

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
               w_kv_b: torch.Tensor, shape: MLAShape, q_latent: torch.Tensor | None = None) -> torch.Tensor:
        """q_nope [T, heads, nope], q_pe [T, heads, rope] (rotated); w_kv_b [heads * (nope + v), kv_lora_rank],
        this rank's rows of kv_b_proj. Returns [T, heads, v_dim]. `q_latent` [T, heads, kv_lora_rank + rope], when
        given, already holds q_pe in its rope part (the layer's rope kernel writes it there) and receives the
        absorbed query in place: no concatenation of the two."""
        H, C = shape.num_heads, shape.kv_lora_rank
        w = w_kv_b.view(H, shape.nope_dim + shape.v_dim, C)
        if q_latent is None:
            q_latent = q_pe.new_empty(q_pe.shape[0], H, C + shape.rope_dim)
            q_latent[..., C:] = q_pe
        # cuBLAS writes the strided [heads, T, C] view in place (batch stride C + rope, row stride heads * (C + rope))
        torch.bmm(q_nope.transpose(0, 1), w[:, :shape.nope_dim], out=q_latent[..., :C].transpose(0, 1))
        out = self.latent_attention(q_latent, cache, meta, C, shape.scale)  # [T, H, C]
        # per-head values straight into [T, H, v] (the o_proj's input rows; a [H, T, v] result would need a copy
        # for every step of more than one token)
        v = out.new_empty(out.shape[0], H, shape.v_dim)
        torch.bmm(out.transpose(0, 1), w[:, shape.nope_dim:].transpose(1, 2), out=v.transpose(0, 1))
        return v


class TorchMLABackend(MLABackend):
    """The reference: works on every device, not CUDA-graph safe (the store checks its slots on the host)."""

    name = "torch"

    def latent_attention(self, q, cache, meta, kv_lora_rank, scale):
        return mla_latent_attention_ref(q, cache, meta, kv_lora_rank, scale)


class TritonMLABackend(MLABackend):
    """The Triton latent kernel (kernels/triton/mla_attention.py) for every step; decode steps read only
    device tensors, so they are captured in CUDA graphs. A step with prefill tokens plans, on the device,
    which sequence each token belongs to."""

    name = "triton"
    supports_cuda_graph = True
    supports_verify_graph = True  # the token -> sequence plan is a device searchsorted

    def plan(self, meta: AttentionMetadata) -> torch.Tensor | None:
        if meta.is_decode:
            return None
        tokens = torch.arange(meta.slot_mapping.shape[0], dtype=torch.int32, device=meta.slot_mapping.device)
        return torch.searchsorted(meta.cu_seqlens_q[1:], tokens, right=True).to(torch.int32)

    def store(self, latent, k_pe, cache, slot_mapping) -> None:
        from kernels.triton.mla_attention import store_latent as store
        store(latent, k_pe, cache, slot_mapping)

    def norm_rope_store(self, latent, norm_weight, eps, q_pe, k_pe, positions, cos_sin_cache, interleaved, q_out,
                        cache, slot_mapping) -> None:
        from kernels.rope import rope_kernel_fits
        if not rope_kernel_fits(q_pe.shape[-1], cos_sin_cache):
            return super().norm_rope_store(latent, norm_weight, eps, q_pe, k_pe, positions, cos_sin_cache,
                                           interleaved, q_out, cache, slot_mapping)
        from kernels.triton.mla_attention import norm_rope_store
        norm_rope_store(latent, norm_weight, eps, q_pe, k_pe, positions, cos_sin_cache, interleaved, q_out, cache,
                        slot_mapping)

    def latent_attention(self, q, cache, meta, kv_lora_rank, scale):
        from kernels.triton.mla_attention import mla_attention
        token_seq = None if meta.is_decode else meta.plan
        return mla_attention(q, cache, meta.seq_lens, meta.block_tables, meta.cu_seqlens_q, token_seq, kv_lora_rank,
                             scale)


class FlashMLABackend(TritonMLABackend):
    """FlashMLA's dense decode kernel (Hopper) for decode steps, the Triton kernel for steps with prefill
    tokens. FlashMLA schedules its splits on the device from the step's seq_lens in its first call of a forward;
    the other layers reuse that schedule, so each forward (each graph replay too) starts a fresh one."""

    name = "flashmla"

    def begin_forward(self, meta: AttentionMetadata) -> AttentionMetadata:
        if not meta.is_decode:
            return meta
        from flash_mla import get_mla_metadata
        return dataclasses.replace(meta, plan=get_mla_metadata()[0])

    def latent_attention(self, q, cache, meta, kv_lora_rank, scale):
        if not meta.is_decode:
            return super().latent_attention(q, cache, meta, kv_lora_rank, scale)
        from flash_mla import flash_mla_with_kvcache
        out, _ = flash_mla_with_kvcache(q[:, None], cache[:, :, None], meta.block_tables, meta.seq_lens,
                                        kv_lora_rank, meta.plan, softmax_scale=scale, causal=True)
        return out[:, 0]


def flash_mla_usable(device: torch.device, dtype: torch.dtype, block_size: int, kv_lora_rank: int,
                     rope_dim: int, kv_dtype: torch.dtype | None = None) -> str | None:
    """None when FlashMLA runs here, else why not."""
    if importlib.util.find_spec("flash_mla") is None:
        return "flash_mla is not installed (../shared/device/kernels.sh builds it)"
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "FlashMLA's dense decode kernel needs a Hopper (sm90) GPU"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"FlashMLA computes in bf16/fp16, not {dtype}"
    if kv_dtype not in (None, dtype):
        return f"FlashMLA's dense decode reads {dtype} latents, not {kv_dtype} (FP8 KV: the Triton kernel)"
    if block_size != FLASH_MLA_BLOCK_SIZE:
        return f"FlashMLA reads {FLASH_MLA_BLOCK_SIZE}-token pages: start with --block-size {FLASH_MLA_BLOCK_SIZE}"
    if (kv_lora_rank, rope_dim) != FLASH_MLA_DIMS:
        return f"FlashMLA is built for 512 + 64 latents, not {kv_lora_rank} + {rope_dim}"
    return None


def triton_mla_usable(device: torch.device, kv_lora_rank: int, rope_dim: int) -> str | None:
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return "the Triton MLA kernel needs a CUDA device and triton"
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    if not (pow2(kv_lora_rank) and pow2(rope_dim)):
        return f"the Triton MLA kernel takes power-of-two widths >= 16, not {kv_lora_rank} + {rope_dim}"
    return None


def get_mla_backend(name: str, device: torch.device, dtype: torch.dtype, block_size: int, kv_lora_rank: int,
                    rope_dim: int, kv_dtype: torch.dtype | None = None) -> MLABackend:
    """`name` is auto | torch | triton | flashmla (flashinfer, a GQA choice, means auto here). auto: FlashMLA
    where it runs, else Triton on CUDA, else torch. `kv_dtype` is the cache's (None: the model's)."""
    if name in ("auto", "flashinfer"):
        why = flash_mla_usable(device, dtype, block_size, kv_lora_rank, rope_dim, kv_dtype)
        if why is None:
            name = "flashmla"
        else:
            if device.type == "cuda":
                log.info("MLA decode without FlashMLA: %s", why)
            name = "triton" if triton_mla_usable(device, kv_lora_rank, rope_dim) is None else "torch"
    if name == "torch":
        return TorchMLABackend()
    if name == "triton":
        why = triton_mla_usable(device, kv_lora_rank, rope_dim)
        if why:
            raise ValueError(why)
        return TritonMLABackend()
    if name == "flashmla":
        why = flash_mla_usable(device, dtype, block_size, kv_lora_rank, rope_dim, kv_dtype)
        if why:
            raise ValueError(f"attention backend flashmla: {why}")
        return FlashMLABackend()
    raise ValueError(f"unknown MLA attention backend {name!r}: choose auto, torch, triton or flashmla")
