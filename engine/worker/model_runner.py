"""ModelRunner: one rank's model shard, its attention backend, its view of the KV pool and the decode CUDA
graphs; turns a StepBatch into a forward pass and (rank 0) samples. Every rank runs the same forward; the
logits are gathered on rank 0, whose samples are broadcast back so that every rank can feed tokens that are
still in flight to the next step on its own device."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.config import EngineConfig
from engine.distributed.parallel import ParallelContext
from engine.errors import UnsupportedModelError
from engine.kv.pool import allocate_pool
from engine.kv.spec import KVCacheSpec, dtype_name, kv_cache_dtype
from engine.models.config import ModelConfig
from engine.models.registry import model_class
from engine.models.weights import load_model
from engine.multimodal.processor import ImageProcessorConfig
from engine.multimodal.step import build_step
from engine.sampling.metadata import sampling_metadata
from engine.sampling.sampler import SamplerOutput, sample
from engine.spec_decode.mtp import MTPDrafter
from engine.spec_decode.verify import sample_rows
from engine.worker.cuda_graph import VERIFY_MAX_TOKENS, GraphInputs, GraphStep, StepGraphRunner, capture_sizes
from engine.worker.encoder_cache import EncoderCache
from engine.worker.host_copy import to_device
from engine.worker.input_batch import StepBatch, StepInputs, fill_pending, prepare_host
from engine.worker.warmup import warm_up_gemms
from kernels.attention import AttentionMetadata, AttentionShape, get_attention_backend
from kernels.attention.mla import get_mla_backend

log = logging.getLogger(__name__)
PROMPT_LOGPROB_ROWS = 512
ENCODER_CACHE_MIN_TOKENS = 16384  # image embedding rows the runner keeps (at least)


def resolve_dtype(name: str, model_config: ModelConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    dtype = model_config.dtype
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32  # fp16 matmuls are slow or missing on CPUs
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


@dataclass
class StepStats:
    """What the last step computed (benchmarks turn it into bytes moved per decode step)."""

    is_decode: bool = False
    num_seqs: int = 0
    num_tokens: int = 0
    kv_tokens: int = 0  # KV entries attended over, summed over the batch
    graph: bool = False


class LaunchedStep:
    """A step whose forward and sampling are queued on the device. `token_ids` (on the device) feed the next
    step's tokens in flight. On rank 0 they are also copied to pinned host memory behind the step; `fetch`
    waits for that copy only, so the host can schedule and launch the next step meanwhile."""

    def __init__(self, seqs: list, out: SamplerOutput, to_host: bool = True):
        self.seqs = seqs  # the sampled sequences, in row order (rank 0)
        self.token_ids = out.token_ids
        on_gpu = out.token_ids.is_cuda
        self._host = out
        self._copied = None
        if to_host and on_gpu:
            self._host = SamplerOutput(*(t.to("cpu", non_blocking=True) if t is not None else t
                                         for t in (out.token_ids, out.logprobs, out.ranks, out.top_ids,
                                                   out.top_logprobs, out.draft_ids)))
            self._copied = torch.cuda.Event()
            self._copied.record()

    def fetch(self) -> SamplerOutput:
        """The host copy of the samples (waits until the device has produced them)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        return self._host


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model_path: Path | None,
                 max_model_len: int, parallel: ParallelContext, device: torch.device, progress: bool = False):
        self.config = config
        self.max_model_len = max_model_len
        self.parallel = parallel
        self.device = device
        self.dtype = resolve_dtype(config.dtype, model_config, device)
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.vocab_size = model_config.vocab_size
        self.hidden_size = model_config.hidden_size
        cls = model_class(model_config)
        spec = config.speculative()
        # DeepSeek's MTP module drafts (engine/spec_decode/mtp.py): built with its KV layer after the decoder layers
        self.mtp = MTPDrafter(self, spec.num_speculative_tokens) if spec is not None and spec.method == "mtp" else None
        if self.mtp:
            if not hasattr(cls, "mtp_hidden") or not getattr(model_config.hf, "num_nextn_predict_layers", 0):
                raise UnsupportedModelError("speculative decoding by MTP needs a checkpoint with MTP modules "
                                            "(num_nextn_predict_layers, DeepSeek-V3 / Kimi-K2)",
                                            param="speculative_config")
            model_config = dataclasses.replace(model_config, num_mtp_layers=1)
        mla = getattr(cls, "attention_kind", "gqa") == "mla"
        if mla:  # latent attention (kernels/attention/mla.py): FlashMLA, Triton or torch
            hf = model_config.hf
            self.backend = get_mla_backend(config.attention_backend, device, self.dtype, config.block_size,
                                           hf.kv_lora_rank, hf.qk_rope_head_dim, self.kv_dtype)
        else:
            self.backend = get_attention_backend(config.attention_backend, device, dtype=self.dtype,
                                                 head_dim=model_config.head_dim, fp8_attention=config.fp8_attention)
        self.model = load_model(cls, model_config, parallel, model_path, self.backend, self.dtype, device,
                                max_model_len, progress)
        self.kv_spec = self.model.kv_cache_spec(config.block_size, dtype_name(self.kv_dtype))
        if isinstance(self.kv_spec, KVCacheSpec):
            attn = self.model.attention_layers()
            self.backend.configure(AttentionShape(attn[0].num_heads, attn[0].num_kv_heads, attn[0].head_dim,
                                                  attn[0].scale, self.dtype, self.kv_dtype, config.block_size))
        self.kv_pool: torch.Tensor | None = None
        # data parallelism exchanges split sizes on the host in every MoE layer: those steps run eagerly
        self.use_cuda_graphs = (device.type == "cuda" and not config.enforce_eager
                                and self.backend.supports_cuda_graph and parallel.dp_size == 1)
        self.graphs: StepGraphRunner | None = None
        self.last_step = StepStats()
        self.prompt_logprob_rows: list | None = None  # the last launch's prompt logprobs (rank 0), in row order
        self.image_config = self.encoder_cache = None
        if model_config.vision is not None:  # multimodal: the device half of image preprocessing, and the cache
            self.image_config = ImageProcessorConfig.from_model(model_config.vision, model_path)
            self.encoder_cache = EncoderCache(max(ENCODER_CACHE_MIN_TOKENS, config.max_num_batched_tokens))

    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    # ---- KV pool -----------------------------------------------------------------------------
    def bind_kv_pool(self, pool: torch.Tensor | None) -> None:
        self.kv_pool = pool
        for i, layer in enumerate(self.model.attention_layers()):
            layer.kv_cache = pool[:, i] if pool is not None else None

    def graph_buckets(self) -> dict[int, list[int]]:
        """Batch-size buckets per tokens per sequence: decode steps (1) and, with speculative decoding on a backend
        whose multi-token steps plan on the device, verify steps (1 + k), up to VERIFY_MAX_TOKENS rows."""
        n = self.config.max_num_seqs
        buckets = {1: capture_sizes(n)}
        spec = self.config.speculative()
        if spec is not None and self.backend.supports_verify_graph:
            q = 1 + spec.num_speculative_tokens
            buckets[q] = capture_sizes(min(n, VERIFY_MAX_TOKENS // q))
        return buckets

    def allocate_kv_pool(self, num_blocks: int) -> torch.Tensor:
        """The pool, then (CUDA) the decode graphs over it and the GEMM warm-up."""
        pool = allocate_pool(self.kv_spec, num_blocks, self.device)
        self.bind_kv_pool(pool)
        if self.use_cuda_graphs:
            self.graphs = StepGraphRunner(self.model, self.backend, self.device, self.graph_buckets(),
                                          self.max_model_len, self.config.block_size, mtp=self.mtp is not None)
            self.graphs.capture()
        if self.device.type == "cuda":  # lazy kernel loading stalls the device mid-step (worker/warmup.py)
            seconds = warm_up_gemms(self.model, self.hidden_size, self.dtype, self.device, self.config.max_num_seqs,
                                    self.config.max_num_batched_tokens)
            log.info("warmed up the GEMM kernels in %.2fs", seconds)
        return pool

    # ---- one step ----------------------------------------------------------------------------
    def _device_inputs(self, x: StepInputs):
        dev, h = self.device, x.host
        ids, pos, slots, logits_idx = to_device([x.input_ids, x.positions, x.slot_mapping, x.logits_idx],
                                                np.int64, dev)
        tables = x.block_tables if x.block_tables is not None else np.zeros((len(h.seq_lens), 0), np.int32)
        cu_q, seq_lens, tables_d = to_device([h.qo_indptr, h.seq_lens, tables], np.int32, dev)
        meta = AttentionMetadata(slot_mapping=slots, cu_seqlens_q=cu_q, seq_lens=seq_lens, block_tables=tables_d,
                                 max_seqlen_q=x.max_seqlen_q, max_seqlen_k=int(h.seq_lens.max()),
                                 block_size=self.config.block_size, is_decode=x.is_decode, host=h)
        return ids, pos, meta, logits_idx

    def forward(self, x: StepInputs, prev_tokens: torch.Tensor | None = None,
                graphable: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, GraphStep | None]:
        """Hidden states of the step, the device indices of the rows to sample (None: all rows) and, when a CUDA
        graph ran it, the replayed step (its hidden rows are the graph's padded layout, `GraphStep.index`).
        Decode and verify steps replay the graph of their bucket where one holds them; `graphable` False keeps
        the step eager (prompt logprobs read the hidden rows in fed order). `prev_tokens` are the samples of the
        step in flight, which feed this one's pending tokens."""
        all_rows = len(x.logits_idx) == len(x.input_ids)
        self.last_step = StepStats(x.is_decode, len(x.host.seq_lens), len(x.input_ids), int(x.host.seq_lens.sum()))
        fill = lambda ids, index=None: fill_pending(ids, x.pending_dst if index is None else index[x.pending_dst],
                                                    x.pending_src, prev_tokens)
        multimodal = bool(x.images) or x.mrope_positions is not None
        if self.graphs is not None and graphable and not multimodal:
            step = self.graphs.run(GraphInputs(x.input_ids, x.positions, x.slot_mapping, x.host, x.block_tables), fill)
            if step is not None:
                self.last_step.graph = True
                if step.q_len == 1:  # the fed rows come first, in order
                    rows = None if all_rows else to_device([x.logits_idx], np.int64, self.device)[0]
                    return step.hidden[:len(x.input_ids)], rows, step
                return step.hidden, to_device([step.index[x.logits_idx]], np.int64, self.device)[0], step
        ids, pos, meta, logits_idx = self._device_inputs(x)
        fill(ids)
        meta.plan = self.backend.plan(meta)
        return self._run_model(ids, pos, meta, x), None if all_rows else logits_idx, None

    def _run_model(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                   x: StepInputs) -> torch.Tensor:
        """The eager forward; a step with image tokens or multimodal rope hands the model its MultiModalStep."""
        if x.images or x.mrope_positions is not None:
            mm = build_step(self.model, x.images, x.mrope_positions, self.encoder_cache, self.image_config, self.device)
            return self.model(ids, positions, meta, mm)
        return self.model(ids, positions, meta)

    @torch.inference_mode()
    def launch(self, batch: StepBatch, block_tables: list[list[int]], prev: LaunchedStep | None = None,
               seqs: list | None = None, stop_ids_of=None, dp_samples: list[int] | None = None) -> LaunchedStep | None:
        """Queues one forward over the batch and the sampling of the rows that complete their tokens; returns
        without waiting for the device (None: nothing sampled). Rank 0 passes the sampled sequences (`seqs`,
        in row order) and samples; the other ranks get rank 0's tokens. With data parallelism the batch is
        this DP group's part (possibly empty: the group then runs the idle step), `dp_samples` the sampled
        rows of every group: the groups' logits go to rank 0, which samples them all, and every rank gets all
        the tokens (rows in DP order, as the engine core numbers them)."""
        p = self.parallel
        own = int(batch.sample_rows().sum())  # with drafts, each sampled row samples 1 + its drafts positions
        total = sum(dp_samples) if dp_samples else own
        prev_tokens = prev.token_ids if prev is not None else None
        logits = None
        self.prompt_logprob_rows = None
        if len(batch.num_new):
            x = prepare_host(batch, block_tables, self.config.block_size, self.backend.needs_block_tables)
            hidden, rows, graph_step = self.forward(x, prev_tokens, graphable=not len(batch.prompt_idx))
            if len(batch.prompt_idx):
                self.prompt_logprob_rows = self._prompt_logprobs(hidden, batch)
            if own:
                logits = self.model.compute_logits(hidden if rows is None else hidden[rows])
        else:
            self.last_step = StepStats()
            self.model.idle_step(self.hidden_size, self.dtype, self.device)
        if total == 0:
            if self.mtp and len(batch.num_new):  # prefill chunks only: the MTP module still writes its KV
                self.mtp.draft(batch, x, hidden, torch.empty(0, dtype=torch.int64), block_tables, graph_step)
            return None
        if p.dp_size > 1 and p.is_first:
            if logits is None:
                logits = torch.empty(0, self.vocab_size, dtype=self.dtype, device=self.device)
            logits = p.gather_rows_to_driver(logits, dp_samples)
        if p.is_driver:
            rows = seqs if batch.spec_lens is None else sample_rows(seqs, batch.spec_lens[batch.samples].tolist())
            out = sample(logits, sampling_metadata(rows, stop_ids_of, self.vocab_size, self.device, prev_tokens))
        else:
            out = SamplerOutput(torch.empty(total, dtype=torch.int64, device=self.device))
        if p.is_first:
            p.broadcast_from_driver(out.token_ids)
        p.broadcast_from_first(out.token_ids)
        if self.mtp and len(batch.num_new):
            out.draft_ids = self.mtp.draft(batch, x, hidden, out.token_ids, block_tables, graph_step)
        return LaunchedStep(seqs or [], out, to_host=p.is_driver)

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: StepBatch) -> list | None:
        """Logprob, rank and top-N of each wanted prompt token (rank 0; every rank joins the logits collective),
        PROMPT_LOGPROB_ROWS rows at a time so that a long prompt never holds [T, vocab] float32 logits. Read back
        at once: a request for its prompt's logprobs costs its prefill steps a host sync."""
        from engine.wire import TokenLogprobs
        idx, targets = to_device([batch.prompt_idx, batch.prompt_targets], np.int64, self.device)
        out = []
        for lo in range(0, len(idx), PROMPT_LOGPROB_ROWS):
            logits = self.model.compute_logits(hidden[idx[lo:lo + PROMPT_LOGPROB_ROWS]])
            if logits is None or not self.parallel.is_driver:
                continue
            lp = logits.float().log_softmax(dim=-1)
            chosen = lp.gather(-1, targets[lo:lo + PROMPT_LOGPROB_ROWS, None])
            ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
            top_lp, top_ids = lp.topk(batch.prompt_topn, dim=-1) if batch.prompt_topn else (lp[:, :0], lp[:, :0])
            for c, r, ti, tl in zip(chosen[:, 0].tolist(), ranks, top_ids.long().tolist(), top_lp.tolist()):
                out.append(TokenLogprobs(c, r, ti, tl))
        return out if self.parallel.is_driver else None

    @torch.inference_mode()
    def prefill_logits(self, scheduled) -> torch.Tensor:
        """Logits of every fed token of the scheduler's batch (tests compare them with the reference)."""
        x = prepare_host(StepBatch.from_scheduled(scheduled), [s.seq.block_table for s in scheduled],
                         self.config.block_size, self.backend.needs_block_tables)
        input_ids, positions, meta, _ = self._device_inputs(x)
        meta.plan = self.backend.plan(meta)
        return self.model.compute_logits(self._run_model(input_ids, positions, meta, x)).float()
