"""FlashInfer attention backend: FlashInfer's paged prefill (ragged queries over cached context,
causal) for steps with any prefill chunk, and the Triton GQA decode kernel for pure-decode steps.

Decode is Triton's because it measured faster on an H100 (Qwen3-0.6B shape, CUDA-graph replays,
`slipstream bench attention`): on par with FlashInfer's CUDA-core decode on bf16 pages at large batch,
faster at batch 1 (7 vs 9 us per layer at 2k tokens), and on FP8 pages 1.8 vs 1.5-1.7 TB/s (FlashInfer
widens E4M3 to bf16 and is instruction-bound; Triton widens to fp16 in one packed instruction). End to
end: bf16 18.2k vs 17.1k output tok/s, batch-1 TPOT 1.54 vs 1.78 ms.

In a step with prefill chunks, the leading one-token rows (sequences decoding while others prefill:
the scheduler puts running sequences first) also go to the Triton decode kernel, and FlashInfer
prefills the rest. In the throughput bench's prefill phase (16 mixed steps, H100) this took attention
from 142 ms (FlashInfer for every row) to 97 ms (42 FlashInfer + 56 decode).

FP8 pages on Hopper (`fp8_attention` auto or fp8) run FP8 tensor-core math: q and the softmax
probabilities are rounded to E4M3, decode rows go to FlashInfer's XQA kernel (kernels/attention/
xqa_decode.py; 2.5-2.8 against 1.9-2.0 TB/s for the Triton kernel) and prefill to FlashAttention-3 with
an FP8 q (170 against 460 us per layer for FA2 with a bf16 q, a 16.6k-token step). The error against
the fp32 reference grows from 2e-3 to 3e-2, as in vLLM's FP8 KV path on Hopper (FA3 with an FP8 q).
`fp8_attention="exact"` keeps the model-dtype q: Triton decode and FA2 prefill.

The prefill `plan` runs once per step on host arrays (no device read-back) and every layer reuses it;
decode needs no plan (the kernel reads seq_lens and block tables on the device), so decode CUDA graphs
need no per-graph state. The block-major pool's per-layer view `pool[:, layer]` is FlashInfer's NHD
layout, strided over pages."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.attention.base import AttentionBackend, AttentionShape
from kernels.attention.metadata import AttentionMetadata
from kernels.attention.xqa_decode import XQA_PAGE_SIZES, XqaDecode, xqa_fp8_supported

WORKSPACE_BYTES = 256 << 20
FP8_ATTENTION = ("auto", "fp8", "exact")
FP8 = torch.float8_e4m3fn


@dataclass
class MixedPlan:
    """A step with prefill chunks: rows [0, num_decode_rows) are one-token sequences for the decode
    kernel, the rest FlashInfer's (planned) prefill."""
    prefill: object
    num_decode_rows: int


class FlashInferBackend(AttentionBackend):
    supports_cuda_graph = True
    needs_block_tables = True  # the Triton decode kernel reads them

    def __init__(self, device: torch.device, fp8_attention: str = "auto"):
        super().__init__()
        if fp8_attention not in FP8_ATTENTION:
            raise ValueError(f"unknown fp8_attention {fp8_attention!r}: choose {', '.join(FP8_ATTENTION)}")
        self.device = device
        self.fp8_attention = fp8_attention
        self.xqa: XqaDecode | None = None  # set by configure() when FP8 math decodes
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = None  # configure() builds it: the FA3 FP8 or the auto-chosen kernel
        self.plan_dtypes: dict | None = None
        self._planned: torch.cuda.Event | None = None

    def configure(self, shape: AttentionShape) -> None:
        """Picks the kernels (FP8 math or exact) for the model's attention shape; plans need it."""
        import flashinfer
        super().configure(shape)
        fp8_ok = xqa_fp8_supported(self.device, shape.q_dtype, shape.kv_dtype, shape.block_size, shape.head_dim)
        if self.fp8_attention == "fp8" and not fp8_ok:
            raise ValueError("fp8_attention fp8 needs a Hopper GPU (SM90), FP8 KV pages, a bf16/fp16 model, "
                             f"block_size in {XQA_PAGE_SIZES} and head_dim a multiple of 16 up to 256")
        fp8_math = fp8_ok and self.fp8_attention != "exact"
        self.plan_dtypes = dict(q_data_type=FP8 if fp8_math else shape.q_dtype, kv_data_type=shape.kv_dtype,
                                o_data_type=shape.q_dtype)
        self.xqa = XqaDecode(self.device, shape.num_kv_heads, shape.head_dim, shape.block_size) if fp8_math else None
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                      backend="fa3" if fp8_math else "auto")

    @property
    def name(self) -> str:
        return "flashinfer-fp8+xqa-decode" if self.xqa is not None else "flashinfer+triton-decode"

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, meta: AttentionMetadata) -> MixedPlan | None:
        """FlashInfer's prefill plan for a step with prefill chunks; None for a decode step."""
        assert self.prefill is not None, "FlashInferBackend.configure() was not called"
        if meta.is_decode:
            return None
        # FlashInfer stages every plan through one pinned host buffer and an async copy: with async
        # scheduling the next step is planned while this one may still be queued, so the previous
        # plan's copy must have left the buffer first (it has, unless the device is a step behind)
        if self._planned is not None:
            self._planned.synchronize()
        h, s = meta.paged_host(), self.shape
        one = np.diff(h.qo_indptr) == 1
        nd = int(one.argmin())  # leading one-token rows (not all: this is no decode step)
        page0 = h.kv_indptr[nd]
        self.prefill.plan(_t(h.qo_indptr[nd:] - h.qo_indptr[nd]), _t(h.kv_indptr[nd:] - page0),
                          _t(h.kv_indices[page0:]), _t(h.kv_last_page_len[nd:]),
                          s.num_heads, s.num_kv_heads, s.head_dim, meta.block_size, causal=True,
                          sm_scale=s.scale, **self.plan_dtypes, seq_lens=_t(h.seq_lens[nd:]),
                          max_token_per_sequence=meta.max_seqlen_q)
        self._planned = torch.cuda.Event()
        self._planned.record()
        return MixedPlan(self.prefill, nd)

    # ---- forward -------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
               k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        if q.stride(-2) != q.shape[-1] or q.stride(-1) != 1:
            q = q.contiguous()
        scales = (scale, k_scale, v_scale)
        if meta.is_decode:
            return self._decode(q, kv_cache, meta.seq_lens, meta.block_tables, scales, torch.empty_like(q))
        nd, out = meta.plan.num_decode_rows, torch.empty_like(q)
        if nd:
            self._decode(q[:nd], kv_cache, meta.seq_lens[:nd], meta.block_tables[:nd], scales, out[:nd])
        kv_scales = {} if k_scale == 1.0 and v_scale == 1.0 else dict(k_scale=k_scale, v_scale=v_scale)
        q_prefill = q[nd:]
        if self.xqa is not None:  # FP8 math: FA3 takes an E4M3 q (saturated, as XQA rounds its q)
            from kernels.triton.elementwise import saturate_fp8
            q_prefill = saturate_fp8(q_prefill)
        meta.plan.prefill.run(q_prefill, kv_cache, out=out[nd:], **kv_scales)
        return out

    def _decode(self, q, kv_cache, seq_lens, block_tables, scales, out) -> torch.Tensor:
        scale, k_scale, v_scale = scales
        if self.xqa is not None:
            return self.xqa(q, kv_cache, seq_lens, block_tables, out, scale, k_scale, v_scale)
        from kernels.triton.decode_attention import decode_attention
        return decode_attention(q, kv_cache, seq_lens, block_tables, scale, k_scale, v_scale, out=out)


def _t(a: np.ndarray) -> torch.Tensor:
    """Host int32 tensor over a numpy array (FlashInfer copies what it needs to the device)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))
