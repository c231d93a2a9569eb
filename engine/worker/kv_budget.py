"""How many KV blocks one rank's pool gets: an exact count, a byte budget, or (CUDA) what the configured
share of the GPU leaves after the weights and the peak activations of the largest step, measured by running
that step once. The engine takes the smallest count over its ranks."""
from __future__ import annotations

import math

import torch

from engine.kv.pool import allocate_pool
from kernels.attention import AttentionMetadata

CPU_DEFAULT_KV_BYTES = 1 << 30


def kv_budget_blocks(runner) -> int:
    config, spec = runner.config, runner.kv_spec
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_memory_bytes is not None:
        return spec.num_blocks_for(config.kv_cache_memory_bytes)
    if runner.device.type == "cpu":
        return spec.num_blocks_for(CPU_DEFAULT_KV_BYTES)
    device = runner.device
    activations = profile_peak_bytes(runner)
    weights = torch.cuda.memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    # our share of the GPU (vLLM's meaning: other engines on it have theirs), and never more than is free now
    budget = min(total * config.gpu_memory_utilization - weights - activations, free - activations - (256 << 20))
    return spec.num_blocks_for(int(budget))


@torch.inference_mode()
def profile_peak_bytes(runner) -> int:
    """Peak memory of the largest step (max_num_batched_tokens in one prefill) besides the KV pool."""
    config, device = runner.config, runner.device
    torch.cuda.reset_peak_memory_stats(device)
    tokens = min(config.max_num_batched_tokens, 1 << 16)
    blocks = -(-tokens // config.block_size)
    pool = allocate_pool(runner.kv_spec, blocks, device)
    runner.bind_kv_pool(pool)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(tokens, device=device),
        cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None],
        max_seqlen_q=tokens, max_seqlen_k=tokens, block_size=config.block_size)
    meta.plan = runner.backend.plan(meta)
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    # positions stay inside the rope table (max_model_len may be shorter than the token budget)
    positions = torch.arange(tokens, device=device) % runner.max_model_len
    hidden = runner.model(ids, positions, meta)
    logits = runner.model.compute_logits(hidden[:min(config.max_num_seqs, tokens)])
    if logits is not None:  # rank 0 samples: the sampler's float32 temporaries
        logits.float().softmax(-1)
    del hidden, logits
    if runner.image_config is not None:  # multimodal: the vision tower on the largest image it may get
        _encode_largest_image(runner)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - pool.numel() * pool.element_size()
    runner.bind_kv_pool(None)
    del pool
    torch.cuda.empty_cache()
    # the step graphs (their pool) and the sampler's [rows, vocab] float32 temporaries: a verify step samples
    # 1 + k rows a sequence
    spec = config.speculative()
    rows = config.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))
    graphs = rows * runner.vocab_size * 4 * 3 if runner.use_cuda_graphs else 0
    return int(peak - runner.weights_bytes() + graphs + _encoder_cache_bytes(runner))


def _encode_largest_image(runner) -> None:
    """One image of the processor's max_pixels (a square grid): an image is encoded whole, whatever the chunk."""
    cfg, device = runner.image_config, runner.device
    side = max(cfg.factor, math.isqrt(cfg.max_pixels) // cfg.factor * cfg.factor)
    grid = (1, side // cfg.patch_size, side // cfg.patch_size)
    patches = torch.zeros(grid[1] * grid[2], 3 * cfg.temporal_patch_size * cfg.patch_size ** 2, dtype=runner.dtype,
                          device=device)
    runner.model.encode_images(patches, [grid])


def _encoder_cache_bytes(runner) -> int:
    """The runner's image-embedding cache at its budget (rows of hidden x (1 + deepstack taps))."""
    if runner.encoder_cache is None:
        return 0
    taps = getattr(runner.model, "num_deepstack", 0)
    return runner.encoder_cache.budget_tokens * runner.hidden_size * (1 + taps) * torch.finfo(runner.dtype).bits // 8
