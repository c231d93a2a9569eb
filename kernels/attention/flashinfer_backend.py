"""FlashInfer attention backend: paged prefill (ragged queries over cached context, causal) for steps
with any prefill chunk, paged decode for pure-decode steps (FlashInfer's, or the Triton GQA decode
kernel for FP8 pages). `plan` runs once per step on host arrays
(no device read-back) and every layer reuses it; decode CUDA graphs get one fixed-size wrapper each.
The block-major pool's per-layer view `pool[:, layer]` is FlashInfer's NHD layout, strided over pages."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.attention.metadata import AttentionMetadata, PagedHostMeta

WORKSPACE_BYTES = 256 << 20


@dataclass
class FlashInferPlan:
    wrapper: object
    is_decode: bool


class FlashInferBackend:
    name = "flashinfer"
    supports_cuda_graph = True
    needs_block_tables = False

    def __init__(self, device: torch.device, k_scale: float = 1.0, v_scale: float = 1.0,
                 decode_tensor_cores: bool | None = None, decode_kernel: str = "auto"):
        import flashinfer
        self._fi = flashinfer
        self.device = device
        self.k_scale, self.v_scale = k_scale, v_scale
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self._tensor_cores = decode_tensor_cores
        self.decode_kernel = decode_kernel  # flashinfer | triton | auto (chosen by the KV dtype)
        self.decode = None
        self.shape: dict | None = None
        self._planned: torch.cuda.Event | None = None

    def configure(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                  q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        """The model's attention shape; plans need it before the first layer runs."""
        self.shape = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=scale,
                          q_dtype=q_dtype, kv_dtype=kv_dtype)
        if self.decode_kernel == "auto":
            # measured on an H100 (Qwen3-0.6B shape, CUDA-graph replays): the Triton GQA kernel matches FlashInfer's CUDA-core decode on bf16 pages at
            # large batch and beats it at batch 1 (7 vs 9 us per layer at 2k tokens); on FP8 pages
            # FlashInfer widens E4M3 to bf16 and is instruction-bound (1.7 TB/s), Triton widens to fp16
            # in one packed instruction (2.0 TB/s). End to end: bf16 18.2k vs 17.1k tok/s, TPOT 1.54
            # vs 1.78 ms
            self.decode_kernel = "triton"
        # the Triton decode kernel reads block tables and seq_lens on the device instead of a plan
        self.needs_block_tables = self.decode_kernel == "triton"
        self.name = "flashinfer" if self.decode_kernel == "flashinfer" else "flashinfer+triton-decode"
        if self._tensor_cores is None:
            # GQA groups of Qwen3/Llama-size models are small (2-4): the CUDA-core decode kernel was the
            # faster one on an H100 (batch 256, 161K KV tokens, 28 layers: bf16 8.4 ms, fp8 6.9 ms
            # per step; fp8 with tensor cores 7.5 ms)
            self._tensor_cores = num_heads // num_kv_heads >= 8
        self.decode = self._fi.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                  use_tensor_cores=self._tensor_cores)

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, meta: AttentionMetadata, graph_state=None) -> FlashInferPlan:
        assert self.shape is not None, "FlashInferBackend.configure() was not called"
        # FlashInfer stages every plan through one pinned host buffer and an async copy: with async
        # scheduling the next step is planned while this one may still be queued, so the previous
        # plan's copy must have left the buffer first (it has, unless the device is a step behind)
        if self._planned is not None:
            self._planned.synchronize()
        plan = self._plan(meta, graph_state)
        self._planned = torch.cuda.Event()
        self._planned.record()
        return plan

    def _plan(self, meta: AttentionMetadata, graph_state) -> FlashInferPlan:
        h = meta.paged_host()
        if meta.is_decode and self.decode_kernel == "triton":
            return FlashInferPlan(None, True)
        if meta.is_decode:
            wrapper = graph_state if graph_state is not None else self.decode
            self._plan_decode(wrapper, h, meta.block_size)
            return FlashInferPlan(wrapper, True)
        s = self.shape
        self.prefill.plan(_t(h.qo_indptr), _t(h.kv_indptr), _t(h.kv_indices), _t(h.kv_last_page_len),
                          s["num_heads"], s["num_kv_heads"], s["head_dim"], meta.block_size, causal=True,
                          sm_scale=s["scale"], q_data_type=s["q_dtype"], kv_data_type=s["kv_dtype"],
                          seq_lens=_t(h.seq_lens), max_token_per_sequence=meta.max_seqlen_q)
        return FlashInferPlan(self.prefill, False)

    def _plan_decode(self, wrapper, h: PagedHostMeta, block_size: int) -> None:
        s = self.shape
        wrapper.plan(_t(h.kv_indptr), _t(h.kv_indices), _t(h.kv_last_page_len), s["num_heads"],
                     s["num_kv_heads"], s["head_dim"], block_size, sm_scale=s["scale"], q_data_type=s["q_dtype"],
                     kv_data_type=s["kv_dtype"], seq_lens=_t(h.seq_lens))

    def make_graph_state(self, batch_size: int, max_pages: int):
        """A decode wrapper with fixed device buffers for a CUDA graph of `batch_size` sequences."""
        if self.decode_kernel == "triton":
            return None
        i32 = dict(dtype=torch.int32, device=self.device)
        return self._fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self._tensor_cores,
            paged_kv_indptr_buffer=torch.zeros(batch_size + 1, **i32),
            paged_kv_indices_buffer=torch.zeros(max_pages, **i32),
            paged_kv_last_page_len_buffer=torch.zeros(batch_size, **i32))

    # ---- forward -------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if q.stride(-2) != q.shape[-1] or q.stride(-1) != 1:
            q = q.contiguous()
        if meta.plan.wrapper is None:  # Triton decode
            from kernels.triton.decode_attention import decode_attention
            return decode_attention(q, kv_cache, meta.seq_lens, meta.block_tables, scale, self.k_scale, self.v_scale)
        if self.k_scale == 1.0 and self.v_scale == 1.0:
            return meta.plan.wrapper.run(q, kv_cache)
        return meta.plan.wrapper.run(q, kv_cache, k_scale=self.k_scale, v_scale=self.v_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from kernels.triton.kv_store import store_kv
        store_kv(k, v, kv_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        return self.attend(q, kv_cache, meta, scale)


def _t(a: np.ndarray) -> torch.Tensor:
    """Host int32 tensor over a numpy array (FlashInfer copies what it needs to the device)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))
