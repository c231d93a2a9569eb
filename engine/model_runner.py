"""ModelRunner: owns the model and the KV pool; turns a scheduled batch into tensors, runs the
forward pass and samples. One runner per rank."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.errors import UnsupportedModelError
from engine.kv_cache import KVCacheSpec, allocate_pool
from engine.loader import checkpoint_dtype, load_model
from engine.models import model_class
from engine.sampler import SamplerOutput, SamplingMetadata, sample
from engine.scheduler import ScheduledSeq
from kernels.attention import AttentionMetadata, get_attention_backend

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UnsupportedModelError("device 'cuda' requested but CUDA is not available", param="device")
    return torch.device(name)


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    dtype = checkpoint_dtype(hf_config)
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32  # fp16 matmuls are slow or missing on CPUs
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_path: Path | None, max_model_len: int,
                 progress: bool = False):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        if config.kv_cache_dtype != "auto":
            raise UnsupportedModelError("kv_cache_dtype fp8 needs the GPU fast path (not in this build)",
                                        param="kv_cache_dtype")
        self.vocab_size = hf_config.vocab_size
        self.backend = get_attention_backend(config.attention_backend, self.device)
        self.model = load_model(model_class(hf_config), hf_config, model_path, self.backend, self.dtype,
                                self.device, max_model_len, progress)
        attn = self.model.attention_layers()
        self.kv_spec = KVCacheSpec(len(attn), attn[0].num_kv_heads, attn[0].head_dim, config.block_size, self.dtype)
        self.kv_pool: torch.Tensor | None = None

    # ---- KV pool -----------------------------------------------------------------------------
    def kv_budget_blocks(self) -> int:
        """Blocks that fit the configured budget (an exact count, a byte budget, or a GPU fraction)."""
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_bytes is not None:
            return self.kv_spec.num_blocks_for(self.config.kv_cache_memory_bytes)
        if self.device.type == "cpu":
            return self.kv_spec.num_blocks_for(CPU_DEFAULT_KV_BYTES)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_allocated(self.device)
        budget = total * self.config.gpu_memory_utilization - used_by_others - self._profile_peak_bytes()
        return self.kv_spec.num_blocks_for(int(budget))

    def _profile_peak_bytes(self) -> int:
        """Peak memory of the largest step (max_num_batched_tokens in one prefill) besides the KV pool."""
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = min(self.config.max_num_batched_tokens, 1 << 16)
        blocks = -(-tokens // self.config.block_size)
        pool = allocate_pool(self.kv_spec, blocks, self.device)
        self.bind_kv_pool(pool)
        with torch.inference_mode():
            meta = AttentionMetadata(
                slot_mapping=torch.arange(tokens, device=self.device),
                cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
                seq_lens=torch.tensor([tokens], dtype=torch.int32, device=self.device),
                block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device)[None],
                max_seqlen_q=tokens, max_seqlen_k=tokens, block_size=self.config.block_size)
            meta.plan = self.backend.plan(meta)
            ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
            hidden = self.model(ids, torch.arange(tokens, device=self.device), meta)
            rows = min(self.config.max_num_seqs, tokens)
            self.model.compute_logits(hidden[:rows]).float().softmax(-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - pool.numel() * pool.element_size()
        self.kv_pool = None
        del pool
        torch.cuda.empty_cache()
        return int(peak - self._weights_bytes())

    def _weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def bind_kv_pool(self, pool: torch.Tensor) -> None:
        self.kv_pool = pool
        for i, layer in enumerate(self.model.attention_layers()):
            layer.kv_cache = pool[:, i]

    def allocate_kv_pool(self, num_blocks: int) -> torch.Tensor:
        pool = allocate_pool(self.kv_spec, num_blocks, self.device)
        self.bind_kv_pool(pool)
        return pool

    # ---- one step ----------------------------------------------------------------------------
    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        bs = self.config.block_size
        input_ids, positions, slots, cu_q, seq_lens, logits_idx = [], [], [], [0], [], []
        max_blocks = 0
        for s in batch:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            cu_q.append(cu_q[-1] + s.num_new_tokens)
            seq_lens.append(end)
            max_blocks = max(max_blocks, len(table))
            if s.samples:
                logits_idx.append(cu_q[-1] - 1)
        tables = [s.seq.block_table + [0] * (max_blocks - len(s.seq.block_table)) for s in batch]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            max_seqlen_q=max(s.num_new_tokens for s in batch), max_seqlen_k=max(seq_lens),
            block_size=bs, is_decode=all(s.num_new_tokens == 1 for s in batch))
        return (torch.tensor(input_ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev), meta,
                torch.tensor(logits_idx, dtype=torch.int64, device=dev))

    def sampling_metadata(self, seqs, stop_ids_of) -> SamplingMetadata:
        dev, V = self.device, self.vocab_size
        params = [s.params for s in seqs]
        f32 = dict(dtype=torch.float32, device=dev)
        m = SamplingMetadata(
            temperature=torch.tensor([0.0 if p.greedy else p.temperature for p in params], **f32),
            top_k=torch.tensor([p.top_k if p.top_k > 0 else V for p in params], dtype=torch.int64, device=dev),
            top_p=torch.tensor([p.top_p for p in params], **f32),
            min_p=torch.tensor([p.min_p for p in params], **f32),
            seeds=torch.tensor([s.sampling_seed for s in seqs], dtype=torch.int64, device=dev),
            steps=torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.int64, device=dev),
            all_greedy=all(p.greedy for p in params),
            need_top_k=any(0 < p.top_k < V for p in params),
            need_top_p=any(p.top_p < 1.0 for p in params),
            need_min_p=any(p.min_p > 0.0 for p in params))
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            m.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], **f32)
            m.presence_penalty = torch.tensor([p.presence_penalty for p in params], **f32)
            m.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], **f32)
            prompt_mask = torch.zeros(len(seqs), V, dtype=torch.bool, device=dev)
            counts = torch.zeros(len(seqs), V, dtype=torch.int32, device=dev)
            for i, s in enumerate(seqs):
                prompt_mask[i, torch.tensor(s.token_ids[:s.num_prompt_tokens], device=dev)] = True
                out = s.output_token_ids
                if out:
                    counts[i].index_add_(0, torch.tensor(out, device=dev),
                                         torch.ones(len(out), dtype=torch.int32, device=dev))
            m.prompt_mask, m.output_counts = prompt_mask, counts
        rows, toks = [], []
        for i, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                ids = stop_ids_of(s)
                rows.extend([i] * len(ids))
                toks.extend(ids)
        if rows:
            m.min_tokens_mask = (torch.tensor(rows, device=dev), torch.tensor(toks, device=dev))
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        m.max_num_logprobs = max(wanted) if wanted else None
        return m

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], stop_ids_of) -> SamplerOutput | None:
        """Runs one forward over the batch; samples the sequences that completed their tokens."""
        input_ids, positions, meta, logits_idx = self.prepare(batch)
        meta.plan = self.backend.plan(meta)
        hidden = self.model(input_ids, positions, meta)
        sampling = [s.seq for s in batch if s.samples]
        if not sampling:
            return None
        logits = self.model.compute_logits(hidden[logits_idx]).float()
        return sample(logits, self.sampling_metadata(sampling, stop_ids_of))

    @torch.inference_mode()
    def prefill_logits(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits of every fed token (tests compare them with the reference implementation)."""
        input_ids, positions, meta, _ = self.prepare(batch)
        meta.plan = self.backend.plan(meta)
        return self.model.compute_logits(self.model(input_ids, positions, meta)).float()
