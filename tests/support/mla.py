"""A random ragged MLA step over a paged latent cache, for the kernel tests (CPU and GPU): sequence b has
seq_lens[b] tokens cached in shuffled pages, the last q_lens[b] of them fed by this step."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kernels.attention import AttentionMetadata
from kernels.attention.metadata import host_meta_from_tables
from kernels.attention.mla import MLAShape


@dataclass
class MLAStep:
    q_nope: torch.Tensor  # [T, heads, nope]
    q_pe: torch.Tensor  # [T, heads, rope]
    cache: torch.Tensor  # [blocks, block_size, kv_lora_rank + rope], strided over blocks like a pool's layer view
    meta: AttentionMetadata
    w_kv_b: torch.Tensor  # [heads * (nope + v), kv_lora_rank]
    shape: MLAShape


def random_mla_step(q_lens: list[int], seq_lens: list[int], block_size: int, heads: int = 16,
                    kv_lora_rank: int = 512, rope_dim: int = 64, nope_dim: int = 128, v_dim: int = 128,
                    dtype=torch.bfloat16, device="cpu", seed: int = 0, layers: int = 2) -> MLAStep:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype=dtype, device=device)
    latent_dim = kv_lora_rank + rope_dim
    pages = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(pages) + 3
    order = torch.randperm(num_blocks, generator=g).numpy().astype(np.int32)
    tables = np.zeros((len(seq_lens), max(pages)), np.int32)
    start = 0
    for b, n in enumerate(pages):
        tables[b, :n] = order[start:start + n]
        start += n
    # a pool of `layers` layers, this step attending over layer 1's strided view
    cache = rnd(num_blocks, layers, block_size, latent_dim)[:, 1]
    slots = []
    for b, (q, n) in enumerate(zip(q_lens, seq_lens)):
        slots += [int(tables[b, p // block_size]) * block_size + p % block_size for p in range(n - q, n)]
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq = np.asarray(seq_lens, np.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        cu_seqlens_q=torch.tensor(cu, device=device), seq_lens=torch.tensor(seq, device=device),
        block_tables=torch.tensor(tables, device=device), max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens),
        block_size=block_size, is_decode=all(q == 1 for q in q_lens),
        host=host_meta_from_tables(cu, seq, tables, block_size))
    T = sum(q_lens)
    scale = (nope_dim + rope_dim) ** -0.5
    w = rnd(heads * (nope_dim + v_dim), kv_lora_rank) * kv_lora_rank ** -0.5
    return MLAStep(rnd(T, heads, nope_dim), rnd(T, heads, rope_dim), cache, meta, w,
                   MLAShape(heads, kv_lora_rank, rope_dim, nope_dim, v_dim, scale))


def check_triton_kernels(device: str = "cpu") -> float:
    """The Triton latent kernel and store against the torch reference, small float32 shapes, decode steps and a
    verify step (two and three tokens a sequence) split across programs, and prefill chunks; runs on the CPU under TRITON_INTERPRET=1 (a fresh process: the variable
    is read when the kernels are defined). Returns the largest error."""
    import kernels.triton.mla_attention as mla
    from kernels.attention.mla import TorchMLABackend, TritonMLABackend
    from kernels.attention.mla_ref import store_latent
    worst = 0.0
    for q_lens, seq_lens, bs in [([1], [300], 16), ([1, 1, 1], [1, 17, 70], 16), ([2, 3], [300, 40], 16),
                                 ([5, 1, 12], [5, 20, 30], 8)]:
        s = random_mla_step(q_lens, seq_lens, bs, heads=20, kv_lora_rank=32, rope_dim=16, nope_dim=8, v_dim=8,
                            dtype=torch.float32, device=device)
        want = TorchMLABackend().attend(s.q_nope, s.q_pe, s.cache, s.meta, s.w_kv_b, s.shape)
        backend = TritonMLABackend()
        s.meta.plan = backend.plan(s.meta)
        worst = max(worst, float((backend.attend(s.q_nope, s.q_pe, s.cache, s.meta, s.w_kv_b, s.shape)
                                  - want).abs().max()))
    # FP8 pages (unit scale): both widen the same E4M3 values
    s = random_mla_step([2, 1, 5], [40, 70, 5], 16, heads=20, kv_lora_rank=32, rope_dim=16, nope_dim=8, v_dim=8,
                        dtype=torch.float32, device=device, seed=3)
    s.cache = s.cache.to(torch.float8_e4m3fn)
    want = TorchMLABackend().attend(s.q_nope, s.q_pe, s.cache, s.meta, s.w_kv_b, s.shape)
    backend = TritonMLABackend()
    s.meta.plan = backend.plan(s.meta)
    worst = max(worst, float((backend.attend(s.q_nope, s.q_pe, s.cache, s.meta, s.w_kv_b, s.shape) - want).abs().max()))
    pool, want = torch.zeros(10, 2, 4, 48, device=device), torch.zeros(10, 2, 4, 48, device=device)
    fused = torch.randn(5, 60, device=device)
    slots = torch.tensor([3, -1, 17, 0, 39], device=device)
    mla.store_latent(fused[:, :32], fused[:, 40:56], pool[:, 1], slots)
    keep = slots >= 0
    store_latent(torch.cat([fused[:, :32], fused[:, 40:56]], -1)[keep], want[:, 1], slots[keep])
    assert torch.equal(pool, want), "the Triton latent store differs from the torch store"
    pool, want = (torch.zeros(10, 2, 4, 48, device=device, dtype=torch.float8_e4m3fn) for _ in range(2))
    # E4M3 values (Triton's interpreter rounds a carry into the exponent wrongly: 7.95 -> 4), some past 448:
    # both stores saturate those
    fused = (fused * 100).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    fused[:, ::7] = 1000 * fused[:, ::7].sign()
    mla.store_latent(fused[:, :32], fused[:, 40:56], pool[:, 1], slots)
    store_latent(torch.cat([fused[:, :32], fused[:, 40:56]], -1)[keep], want[:, 1], slots[keep])
    assert torch.equal(pool.float(), want.float()) and pool.float().abs().max() == 448, "FP8 latent store"
    return max(worst, check_norm_rope_store(device))


def check_norm_rope_store(device: str = "cpu") -> float:
    """The fused latent norm + rope + store (one launch) against the reference backend's three steps, on
    strided views of one projection output, interleaved and not, a padding slot (-1) written nowhere; into a
    float32 cache and into an FP8 one (k_pe large enough that some values saturate at E4M3's 448)."""
    from kernels.attention.mla import TorchMLABackend
    from kernels.rope import rope_cos_sin_cache
    from kernels.triton.mla_attention import norm_rope_store
    g = torch.Generator(device=device).manual_seed(5)
    T, H, C, R = 5, 3, 32, 16
    cos_sin = rope_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, R, 2, device=device).float() / R), 64)
    positions = torch.tensor([0, 7, 63, 2, 30], device=device)
    slots = torch.tensor([3, -1, 17, 0, 39], device=device)
    weight = torch.rand(C, generator=g, device=device) + 0.5
    worst = 0.0
    # an FP8 cache on a GPU only: Triton's interpreter rounds a carry into the exponent wrongly (7.95 -> 4)
    fp8 = [(True, torch.float8_e4m3fn)] if torch.device(device).type == "cuda" else []
    for interleaved, cache_dtype in [(False, torch.float32), (True, torch.float32)] + fp8:
        proj = torch.randn(T, H * R + 8 + C + R, generator=g, device=device)  # [q_pe heads | pad | latent | k_pe]
        if cache_dtype != torch.float32:
            proj[:, -R:] *= 400
        q_pe, latent, k_pe = proj[:, :H * R].view(T, H, R), proj[:, H * R + 8:-R], proj[:, -R:]
        got_cache, want_cache = (torch.zeros(10, 4, C + R, device=device, dtype=cache_dtype) for _ in range(2))
        got_q, want_q = (torch.zeros(T, H, C + R, device=device) for _ in range(2))
        norm_rope_store(latent, weight, 1e-6, q_pe, k_pe, positions, cos_sin, interleaved, got_q[..., C:], got_cache,
                        slots)
        TorchMLABackend().norm_rope_store(latent, weight, 1e-6, q_pe, k_pe, positions, cos_sin, interleaved,
                                          want_q[..., C:], want_cache, slots)
        got_cache, want_cache = got_cache.float(), want_cache.float()
        assert torch.equal(got_q[..., :C], want_q[..., :C]) and torch.equal(got_cache == 0, want_cache == 0)
        worst = max(worst, float((got_q - want_q).abs().max()))
        if cache_dtype == torch.float32:
            worst = max(worst, float((got_cache - want_cache).abs().max()))
        else:  # the same E4M3 values, but where float32 rounding puts a value on the other side of a tie (1 ulp)
            assert got_cache.abs().max() == 448 and ((got_cache - want_cache).abs() <= want_cache.abs() / 8).all()
            assert (got_cache == want_cache).float().mean() > 0.97
    return worst


def with_mtp_layer(src: Path, dst: Path) -> Path:
    """A copy of a tiny V3 checkpoint with an MTP module, as DeepSeek-V3 / Kimi-K2 checkpoints carry it: one more
    layer (`model.layers.{num_hidden_layers}`: enorm, hnorm, eh_proj, a decoder layer (the last one's copy),
    shared_head, embed_tokens)."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    last, g = f"model.layers.{n - 1}.", torch.Generator().manual_seed(3)
    mtp = {f"model.layers.{n}." + k[len(last):]: v.clone() for k, v in tensors.items() if k.startswith(last)}
    hidden = tensors["model.norm.weight"].shape[0]
    mtp.update({f"model.layers.{n}.enorm.weight": torch.ones(hidden),
                f"model.layers.{n}.hnorm.weight": torch.ones(hidden),
                f"model.layers.{n}.eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=g) * 0.05,
                f"model.layers.{n}.shared_head.norm.weight": torch.ones(hidden),
                f"model.layers.{n}.shared_head.head.weight": tensors["lm_head.weight"].clone(),
                f"model.layers.{n}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone()})
    save_file({**tensors, **mtp}, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return dst
