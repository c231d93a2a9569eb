"""ModelRunner: owns the model, the KV pool and the decode CUDA graphs; turns a scheduled batch into
tensors (vectorised numpy on the host, one pinned copy per dtype), runs the forward pass and samples.
One runner per rank."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.config import EngineConfig
from engine.cuda_graph import DecodeGraphRunner, DecodeInputs, capture_sizes
from engine.errors import UnsupportedModelError
from engine.kv_cache import KVCacheSpec, allocate_pool, kv_cache_dtype
from engine.loader import checkpoint_dtype, load_model
from engine.models import model_class
from engine.sampler import SamplerOutput, SamplingMetadata, sample
from engine.scheduler import ScheduledSeq
from engine.warmup import warm_up_gemms
from kernels.attention import AttentionMetadata, PagedHostMeta, get_attention_backend

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


@dataclass
class StepStats:
    """What the last step computed (benchmarks turn it into bytes moved per decode step)."""

    is_decode: bool = False
    num_seqs: int = 0
    num_tokens: int = 0
    kv_tokens: int = 0  # KV entries attended over, summed over the batch
    graph: bool = False


@dataclass
class StepInputs:
    """Host arrays of one step, built without per-token Python loops."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    logits_idx: np.ndarray  # [S] int64: rows whose logits are sampled
    host: PagedHostMeta
    block_tables: np.ndarray | None  # [B, pages] int32 (only for backends that read them)
    max_seqlen_q: int
    is_decode: bool
    # tokens still in flight (async scheduling): input_ids[pending_dst] = previous step's
    # sampled tokens[pending_src], filled on the device
    pending_dst: np.ndarray  # [P] int64
    pending_src: np.ndarray  # [P] int64


def prepare_host(batch: list[ScheduledSeq], block_size: int, with_block_tables: bool) -> StepInputs:
    bs, B = block_size, len(batch)
    n_new = np.fromiter((s.num_new_tokens for s in batch), np.int64, B)
    start = np.fromiter((s.seq.num_computed_tokens for s in batch), np.int64, B)
    end = start + n_new
    cu_q = np.zeros(B + 1, np.int64)
    np.cumsum(n_new, out=cu_q[1:])
    T = int(cu_q[-1])
    is_decode = T == B
    # a sequence with a token in flight feeds exactly that token (it is its last): a placeholder
    # here, filled on the device from the previous step's samples
    pending = np.fromiter((s.seq.num_pending_tokens > 0 for s in batch), bool, B)
    pending_dst = cu_q[1:][pending] - 1
    pending_src = np.fromiter((s.seq.pending_row for s in batch if s.seq.num_pending_tokens), np.int64,
                              len(pending_dst))
    if is_decode:
        input_ids = np.fromiter((0 if s.seq.num_pending_tokens else s.seq.token_ids[st]
                                 for s, st in zip(batch, start.tolist())), np.int64, B)
        positions = start
    else:
        input_ids = np.fromiter(itertools.chain.from_iterable(
            s.seq.token_ids[st:en - 1] + [0] if s.seq.num_pending_tokens else s.seq.token_ids[st:en]
            for s, st, en in zip(batch, start.tolist(), end.tolist())), np.int64, T)
        positions = np.arange(T, dtype=np.int64) + np.repeat(start - cu_q[:-1], n_new)
    pages = (end + bs - 1) // bs
    kv_indptr = np.zeros(B + 1, np.int64)
    np.cumsum(pages, out=kv_indptr[1:])
    kv_indices = np.fromiter(itertools.chain.from_iterable(
        s.seq.block_table[:p] for s, p in zip(batch, pages.tolist())), np.int32, int(kv_indptr[-1]))
    token_base = kv_indptr[:-1] if is_decode else np.repeat(kv_indptr[:-1], n_new)
    slot_mapping = kv_indices[token_base + positions // bs].astype(np.int64) * bs + positions % bs
    samples = np.fromiter((s.samples for s in batch), bool, B)
    host = PagedHostMeta(cu_q.astype(np.int32), kv_indptr.astype(np.int32), kv_indices,
                         (end - (pages - 1) * bs).astype(np.int32), end.astype(np.int32))
    tables = None
    if with_block_tables:
        tables = np.zeros((B, int(pages.max())), np.int32)
        tables[np.arange(tables.shape[1])[None, :] < pages[:, None]] = kv_indices
    return StepInputs(input_ids, positions, slot_mapping, cu_q[1:][samples] - 1, host, tables,
                      int(n_new.max()), is_decode, pending_dst, pending_src)


class LaunchedStep:
    """A step whose forward and sampling are queued on the device. Its sampled tokens (and logprobs)
    are copied to pinned host memory behind them; `fetch` waits for that copy only, so the host can
    schedule and launch the next step meanwhile (async scheduling)."""

    def __init__(self, seqs: list, out: SamplerOutput):
        self.seqs = seqs  # the sampled sequences, in row order
        self.token_ids = out.token_ids  # on the device: the next step feeds its pending tokens from here
        on_gpu = out.token_ids.is_cuda
        self._host = SamplerOutput(*(t.to("cpu", non_blocking=True) if t is not None and on_gpu else t
                                     for t in (out.token_ids, out.logprobs, out.ranks, out.top_ids,
                                               out.top_logprobs)))
        self._copied = None
        if on_gpu:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def fetch(self) -> SamplerOutput:
        """The host copy of the samples (waits until the device has produced them)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        return self._host


def fill_pending(input_ids: torch.Tensor, dst: np.ndarray, src: np.ndarray, prev: LaunchedStep | None) -> None:
    """input_ids[dst] = prev.token_ids[src], on the device: tokens sampled by a step still in flight."""
    if len(dst) == 0:
        return
    assert prev is not None, "a sequence has a token in flight but no step is in flight"
    (idx,) = _to_device([np.stack([dst, src])], np.int64, input_ids.device)
    input_ids.index_copy_(0, idx[0], prev.token_ids.index_select(0, idx[1]).to(input_ids.dtype))


def _penalty_inputs(seqs, vocab_size: int, device: torch.device, prev: LaunchedStep | None):
    """Repetition / presence / frequency penalties of the rows, each prompt's token mask and each
    output's token counts [B, V]. The (row, token) pairs are built on the host in one pass and go to
    the device in one pinned copy: no per-row copies or launches. A token still in flight counts too
    (read from the previous step's samples on the device)."""
    B, chain = len(seqs), itertools.chain.from_iterable
    params = [s.params for s in seqs]
    weights = np.array([[p.repetition_penalty for p in params], [p.presence_penalty for p in params],
                        [p.frequency_penalty for p in params]], np.float32)
    n_prompt = np.fromiter((s.num_prompt_tokens for s in seqs), np.int64, B)
    n_out = np.fromiter((s.num_output_tokens for s in seqs), np.int64, B)
    flight = np.array([(r, s.pending_row) for r, s in enumerate(seqs) if s.num_pending_tokens], np.int64).reshape(-1, 2)
    (w,) = _to_device([weights], np.float32, device)
    prompt_rows, prompt_ids, out_rows, out_ids, flight_rows, flight_src = _to_device([
        np.repeat(np.arange(B), n_prompt),
        np.fromiter(chain(s.token_ids[:s.num_prompt_tokens] for s in seqs), np.int64, int(n_prompt.sum())),
        np.repeat(np.arange(B), n_out),
        np.fromiter(chain(s.output_token_ids for s in seqs), np.int64, int(n_out.sum())),
        flight[:, 0], flight[:, 1]], np.int64, device)
    prompt_mask = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
    prompt_mask[prompt_rows, prompt_ids] = True
    counts = torch.zeros(B, vocab_size, dtype=torch.int32, device=device)
    counts.index_put_((out_rows, out_ids), torch.ones_like(out_rows, dtype=torch.int32), accumulate=True)
    if len(flight):
        counts.index_put_((flight_rows, prev.token_ids[flight_src]), torch.ones_like(flight_rows, dtype=torch.int32),
                          accumulate=True)
    return w[0], w[1], w[2], prompt_mask, counts


def _to_device(arrays: list[np.ndarray], dtype, device: torch.device) -> list[torch.Tensor]:
    """One host->device copy (pinned, asynchronous on CUDA) for several flat arrays of one dtype. Each
    array starts 16-byte aligned in the flat buffer: Triton specialises kernels on pointer alignment,
    and an odd-length neighbour must not trigger a recompile in the middle of serving."""
    step = 16 // np.dtype(dtype).itemsize
    sizes = [a.size for a in arrays]
    starts = np.cumsum([0] + [-(-n // step) * step for n in sizes])
    flat = np.zeros(int(starts[-1]), dtype)
    for a, start, n in zip(arrays, starts, sizes):
        flat[start:start + n] = a.reshape(-1)
    flat = torch.from_numpy(flat)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return [flat[start:start + a.size].view(a.shape) for a, start in zip(arrays, starts.tolist())]


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_path: Path | None, max_model_len: int,
                 progress: bool = False):
        self.config = config
        self.max_model_len = max_model_len
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.vocab_size = hf_config.vocab_size
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        self.backend = get_attention_backend(config.attention_backend, self.device, dtype=self.dtype,
                                             head_dim=head_dim, fp8_attention=config.fp8_attention)
        self.model = load_model(model_class(hf_config), hf_config, model_path, self.backend, self.dtype,
                                self.device, max_model_len, progress)
        attn = self.model.attention_layers()
        if hasattr(self.backend, "configure"):
            self.backend.configure(num_heads=attn[0].num_heads, num_kv_heads=attn[0].num_kv_heads,
                                   head_dim=attn[0].head_dim, scale=attn[0].scale, q_dtype=self.dtype,
                                   kv_dtype=self.kv_dtype, block_size=config.block_size)
        self.kv_spec = KVCacheSpec(len(attn), attn[0].num_kv_heads, attn[0].head_dim, config.block_size,
                                   self.kv_dtype)
        self.hidden_size = hf_config.hidden_size
        self.kv_pool: torch.Tensor | None = None
        self.use_cuda_graphs = (self.device.type == "cuda" and not config.enforce_eager
                                and getattr(self.backend, "supports_cuda_graph", False))
        self.graphs: DecodeGraphRunner | None = None
        self.last_step = StepStats()
        # benchmarks set a list here to get (start, end) CUDA events of every launched step: the gaps
        # between one step's end and the next one's start are the time the GPU waited for the host
        self.timeline: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None

    # ---- KV pool -----------------------------------------------------------------------------
    def kv_budget_blocks(self) -> int:
        """Blocks that fit the configured budget (an exact count, a byte budget, or a GPU fraction)."""
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_bytes is not None:
            return self.kv_spec.num_blocks_for(self.config.kv_cache_memory_bytes)
        if self.device.type == "cpu":
            return self.kv_spec.num_blocks_for(CPU_DEFAULT_KV_BYTES)
        activations = self._profile_peak_bytes()
        weights = torch.cuda.memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # our share of the GPU (vLLM's meaning: other engines on it have theirs), and never more
        # than is actually free now
        budget = min(total * self.config.gpu_memory_utilization - weights - activations,
                     free - activations - (256 << 20))
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
            # positions stay inside the rope table (max_model_len may be shorter than the token budget)
            positions = torch.arange(tokens, device=self.device) % self.max_model_len
            hidden = self.model(ids, positions, meta)
            rows = min(self.config.max_num_seqs, tokens)
            self.model.compute_logits(hidden[:rows]).float().softmax(-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - pool.numel() * pool.element_size()
        self.kv_pool = None
        del pool
        torch.cuda.empty_cache()
        # decode graphs (their pool) and the sampler's [max_num_seqs, vocab] float32 temporaries
        graphs = self.config.max_num_seqs * self.vocab_size * 4 * 3 if self.use_cuda_graphs else 0
        return int(peak - self._weights_bytes() + graphs)

    def _weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def bind_kv_pool(self, pool: torch.Tensor) -> None:
        self.kv_pool = pool
        for i, layer in enumerate(self.model.attention_layers()):
            layer.kv_cache = pool[:, i]

    def allocate_kv_pool(self, num_blocks: int) -> torch.Tensor:
        pool = allocate_pool(self.kv_spec, num_blocks, self.device)
        self.bind_kv_pool(pool)
        if self.use_cuda_graphs:
            self.graphs = DecodeGraphRunner(
                self.model, self.backend, self.device, capture_sizes(self.config.max_num_seqs),
                -(-self.max_model_len // self.config.block_size), self.config.block_size,
                self.hidden_size, self.dtype)
            self.graphs.capture()
        if self.device.type == "cuda":  # lazy kernel loading stalls the device mid-step (engine/warmup.py)
            seconds = warm_up_gemms(self.model, self.hidden_size, self.dtype, self.device, self.config.max_num_seqs,
                                    self.config.max_num_batched_tokens)
            log.info("warmed up the GEMM kernels in %.2fs", seconds)
        return pool

    # ---- one step ----------------------------------------------------------------------------
    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        return self._device_inputs(prepare_host(batch, self.config.block_size, self.backend.needs_block_tables))

    def _device_inputs(self, x: StepInputs):
        dev, h = self.device, x.host
        ids, pos, slots, logits_idx = _to_device([x.input_ids, x.positions, x.slot_mapping, x.logits_idx],
                                                 np.int64, dev)
        tables = x.block_tables if x.block_tables is not None else np.zeros((len(h.seq_lens), 0), np.int32)
        cu_q, seq_lens, tables_d = _to_device([h.qo_indptr, h.seq_lens, tables], np.int32, dev)
        meta = AttentionMetadata(slot_mapping=slots, cu_seqlens_q=cu_q, seq_lens=seq_lens, block_tables=tables_d,
                                 max_seqlen_q=x.max_seqlen_q, max_seqlen_k=int(h.seq_lens.max()),
                                 block_size=self.config.block_size, is_decode=x.is_decode, host=h)
        return ids, pos, meta, logits_idx

    def sampling_metadata(self, seqs, stop_ids_of, prev: LaunchedStep | None = None) -> SamplingMetadata:
        dev, V = self.device, self.vocab_size
        params = [s.params for s in seqs]
        floats = np.array([[0.0 if p.greedy else p.temperature for p in params], [p.top_p for p in params],
                           [p.min_p for p in params]], np.float32)
        ints = np.array([[p.top_k if p.top_k > 0 else V for p in params], [s.sampling_seed for s in seqs],
                         [s.next_output_index for s in seqs]], np.int64)
        (f,), (i,) = _to_device([floats], np.float32, dev), _to_device([ints], np.int64, dev)
        m = SamplingMetadata(
            temperature=f[0], top_p=f[1], min_p=f[2], top_k=i[0], seeds=i[1], steps=i[2],
            all_greedy=all(p.greedy for p in params),
            need_top_k=any(0 < p.top_k < V for p in params),
            need_top_p=any(p.top_p < 1.0 for p in params),
            need_min_p=any(p.min_p > 0.0 for p in params))
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            m.repetition_penalty, m.presence_penalty, m.frequency_penalty, m.prompt_mask, m.output_counts = \
                _penalty_inputs(seqs, V, dev, prev)
        rows, toks = [], []
        for r, s in enumerate(seqs):
            if s.next_output_index < s.params.min_tokens:
                ids = stop_ids_of(s)
                rows.extend([r] * len(ids))
                toks.extend(ids)
        if rows:
            m.min_tokens_mask = tuple(_to_device([np.array(rows, np.int64), np.array(toks, np.int64)], np.int64, dev))
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        m.max_num_logprobs = max(wanted) if wanted else None
        return m

    def forward(self, x: StepInputs, prev: LaunchedStep | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states of the step (a graph replay for decode batches that fit a bucket) and the
        device indices of the rows to sample (None: all rows). `prev` is the step in flight whose
        samples feed this one's pending tokens."""
        all_rows = len(x.logits_idx) == len(x.input_ids)
        self.last_step = StepStats(x.is_decode, len(x.host.seq_lens), len(x.input_ids), int(x.host.seq_lens.sum()))
        fill = lambda ids: fill_pending(ids, x.pending_dst, x.pending_src, prev)
        if self.graphs is not None and x.is_decode:
            hidden = self.graphs.run(DecodeInputs(x.input_ids, x.positions, x.slot_mapping, x.host, x.block_tables),
                                     fill)
            if hidden is not None:
                self.last_step.graph = True
                return hidden, None if all_rows else _to_device([x.logits_idx], np.int64, self.device)[0]
        ids, pos, meta, logits_idx = self._device_inputs(x)
        fill(ids)
        meta.plan = self.backend.plan(meta)
        return self.model(ids, pos, meta), None if all_rows else logits_idx

    @torch.inference_mode()
    def launch(self, batch: list[ScheduledSeq], stop_ids_of, prev: LaunchedStep | None = None) -> LaunchedStep | None:
        """Queues one forward over the batch and the sampling of the sequences that complete their
        tokens; returns without waiting for the device (None: nothing sampled)."""
        start = self._timeline_event()
        x = prepare_host(batch, self.config.block_size, self.backend.needs_block_tables)
        sampling = [s.seq for s in batch if s.samples]
        hidden, rows = self.forward(x, prev)
        step = None
        if sampling:
            logits = self.model.compute_logits(hidden if rows is None else hidden[rows])
            step = LaunchedStep(sampling, sample(logits, self.sampling_metadata(sampling, stop_ids_of, prev)))
        if start is not None:
            self.timeline.append((start, self._timeline_event()))
        return step

    def _timeline_event(self) -> torch.cuda.Event | None:
        if self.timeline is None or self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @torch.inference_mode()
    def prefill_logits(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits of every fed token (tests compare them with the reference implementation)."""
        input_ids, positions, meta, _ = self.prepare(batch)
        meta.plan = self.backend.plan(meta)
        return self.model.compute_logits(self.model(input_ids, positions, meta)).float()
