"""Configs of the skinny split-K GEMM (kernels/triton/skinny_gemm.py): the table tuned for the decode projections
of the MoE models' shapes, and the rule for the rest. A config is the output-column tile BN, the K step BK,
the K split S (S programs per output tile, meeting in the serial fix-up), warps and pipeline stages.

The rule (tuned on Qwen3-0.6B's projections): 64-column tiles, 128-wide K steps, and K split until the column
tiles times the split reach ~64 programs. Wider models' projections want more programs than that: the table
has, per (N, K), the best config for up to 4 rows and for up to 16, from `python -m engine.bench.skinny --tune`
(weights rotated past the L2, as a step's layers are)."""
from __future__ import annotations

from typing import NamedTuple


ROW_TILE = 16  # the kernel's BM (rows per program) up to 16 rows


class SkinnyConfig(NamedTuple):
    BN: int
    BK: int
    S: int
    num_warps: int = 4
    num_stages: int = 4
    BM: int = ROW_TILE  # wider only for block-FP8 weights past 16 rows (fp8_rows_config)


RULE_BN, RULE_BK, RULE_PROGRAMS = 64, 128, 64
# block-FP8 weights take the skinny GEMM up to this many rows (decode batches): see fp8_rows_config
FP8_MAX_ROWS = 256
# the split-K workspace every skinny GEMM on a device shares (kernels/triton/skinny_gemm.py): tile counters and
# float32 partials
WORKSPACE_TILES, WORKSPACE_FLOATS = 1024, 1 << 20

# (N, K) -> ((rows up to 4, config), (rows up to 16, config)); bf16 weights
TUNED: dict[tuple[int, int], tuple[tuple[int, SkinnyConfig], ...]] = {
    (128, 2048): ((4, SkinnyConfig(16, 128, 8, 4, 4)), (16, SkinnyConfig(16, 256, 8, 4, 4))),
    (2048, 2048): ((4, SkinnyConfig(64, 128, 4, 4, 4)), (16, SkinnyConfig(64, 128, 4, 4, 4))),
    (2048, 2816): ((4, SkinnyConfig(64, 256, 1, 4, 4)), (16, SkinnyConfig(64, 128, 2, 4, 4))),
    (2048, 4096): ((4, SkinnyConfig(64, 256, 4, 4, 3)), (16, SkinnyConfig(64, 256, 4, 4, 3))),
    (2048, 11264): ((4, SkinnyConfig(64, 256, 4, 4, 4)), (16, SkinnyConfig(64, 256, 4, 4, 3))),
    (3648, 2048): ((4, SkinnyConfig(64, 256, 1, 4, 4)), (16, SkinnyConfig(64, 256, 1, 4, 4))),
    (5120, 2048): ((4, SkinnyConfig(64, 256, 1, 4, 4)), (16, SkinnyConfig(64, 256, 1, 4, 4))),
    (5632, 2048): ((4, SkinnyConfig(64, 256, 1, 4, 4)), (16, SkinnyConfig(64, 256, 1, 4, 4))),
    (22528, 2048): ((4, SkinnyConfig(64, 128, 1, 4, 3)), (16, SkinnyConfig(64, 128, 1, 4, 3))),
}

# block-FP8 weights (E4M3, 128-column scale blocks: BK divides 128); shapes not here take the bf16 config with its
# K step cut to 128. Half the bytes per K step want more programs than bf16's (an H200: the K split swept at 1 and
# 16 rows for Qwen3-30B-A3B's qkv / o_proj and Moonlight's dense gate-up / down; Moonlight's query + latent and
# o_proj take the same split by analogy)
TUNED_FP8: dict[tuple[int, int], tuple[tuple[int, SkinnyConfig], ...]] = {
    (2048, 2048): ((16, SkinnyConfig(64, 128, 8, 4, 4)),),
    (2048, 4096): ((16, SkinnyConfig(64, 128, 8, 4, 4)),),
    (2048, 11264): ((16, SkinnyConfig(64, 128, 8, 4, 4)),),
    (3648, 2048): ((16, SkinnyConfig(64, 128, 8, 4, 4)),),
    (5120, 2048): ((16, SkinnyConfig(64, 128, 8, 4, 4)),),
    (22528, 2048): ((16, SkinnyConfig(64, 128, 1, 4, 6)),),
}


def fits_workspace(tiles: int, split: int, bn: int, bm: int = ROW_TILE) -> bool:
    """Whether `tiles` output tiles of bn x bm, each split `split` ways, fit the shared workspace (an unsplit
    GEMM uses none of it)."""
    return split == 1 or (tiles <= WORKSPACE_TILES and tiles * split * bn * bm <= WORKSPACE_FLOATS)


def fp8_rows_config(m: int, n: int, k: int) -> SkinnyConfig | None:
    """17..FP8_MAX_ROWS rows on block-FP8 weights: 32- or 64-row tiles. The FP8-math GEMM (kernels/triton/
    fp8_gemm.py) does badly there; on an H200 (weights rotated past the L2), 5,120 x 2,048 at 32 / 130 / 256 rows
    took 10.5 / 24.0 / 31.8 us here against its 11.5 / 29.3 / 32.0 (with the activations' quantisation launch),
    2,048 x 4,096 9.8 / 26.2 / 24.9 against 20.2 / 57.6 / 62.0; cuBLAS on bf16 weights, twice the bytes: 8.1 /
    11.5 / 10.6 and 9.2 / 10.8 / 10.1 (the widening to fp16 costs more as the row tiles repeat)."""
    long_k = k >= 4096
    bn, bm = 64 if long_k or n % 128 else 128, 32 if m <= 64 else 64
    split = (4 if long_k else 2) if m <= 64 else (2 if long_k else 1)
    tiles = n // bn * -(-m // bm)
    while split > 1 and (k % (split * 128) or not fits_workspace(tiles, split, bn, bm)):
        split //= 2  # the workspace holds every split's partials
    if n % bn or k % (split * 128) or not fits_workspace(tiles, split, bn, bm):
        return None
    return SkinnyConfig(bn, 128, split, BM=bm)


def rule_split(n: int, k: int, bn: int, bk: int, most: int) -> int | None:
    """K split so that N / bn column tiles times the split reach ~RULE_PROGRAMS (None: the shape does not tile)."""
    if n % bn or k % bk:
        return None
    split = 1
    while n // bn * split * 2 <= RULE_PROGRAMS and split < most and k % (2 * split * bk) == 0:
        split *= 2
    return split


def skinny_config(m: int, n: int, k: int, fp8: bool = False) -> SkinnyConfig | None:
    if fp8 and m > ROW_TILE:
        return fp8_rows_config(m, n, k)
    for rows, cfg in (TUNED_FP8 if fp8 else {}).get((n, k), ()):
        if m <= rows:
            return cfg
    for rows, cfg in TUNED.get((n, k), ()):
        if m <= rows:
            return cfg._replace(BK=min(cfg.BK, 128)) if fp8 else cfg
    split = rule_split(n, k, RULE_BN, RULE_BK, 4)
    return None if split is None else SkinnyConfig(RULE_BN, RULE_BK, split)
