"""Configs of the skinny split-K GEMM (kernels/triton/skinny_gemm.py): the table tuned for the decode projections
of the MoE models' shapes, and the rule for the rest. A config is the output-column tile BN, the K step BK,
the K split S (S programs per output tile, meeting in the serial fix-up), warps and pipeline stages.

The rule (tuned on Qwen3-0.6B's projections): 64-column tiles, 128-wide K steps, and K split until the column
tiles times the split reach ~64 programs. Wider models' projections want more programs than that: the table
has, per (N, K), the best config for up to 4 rows and for up to 16, from `python -m engine.bench.skinny --tune`
(weights rotated past the L2, as a step's layers are)."""
from __future__ import annotations

from typing import NamedTuple


class SkinnyConfig(NamedTuple):
    BN: int
    BK: int
    S: int
    num_warps: int = 4
    num_stages: int = 4


RULE_BN, RULE_BK, RULE_PROGRAMS = 64, 128, 64
ROW_TILE = 16  # the kernel's BM: rows per program
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


def fits_workspace(tiles: int, split: int, bn: int) -> bool:
    """Whether `tiles` output tiles of bn columns, each split `split` ways, fit the shared workspace."""
    return tiles <= WORKSPACE_TILES and tiles * split * bn * ROW_TILE <= WORKSPACE_FLOATS


def rule_split(n: int, k: int, bn: int, bk: int, most: int) -> int | None:
    """K split so that N / bn column tiles times the split reach ~RULE_PROGRAMS (None: the shape does not tile)."""
    if n % bn or k % bk:
        return None
    split = 1
    while n // bn * split * 2 <= RULE_PROGRAMS and split < most and k % (2 * split * bk) == 0:
        split *= 2
    return split


def skinny_config(m: int, n: int, k: int, fp8: bool = False) -> SkinnyConfig | None:
    for rows, cfg in (TUNED_FP8 if fp8 else {}).get((n, k), ()):
        if m <= rows:
            return cfg
    for rows, cfg in TUNED.get((n, k), ()):
        if m <= rows:
            return cfg._replace(BK=min(cfg.BK, 128)) if fp8 else cfg
    split = rule_split(n, k, RULE_BN, RULE_BK, 4)
    return None if split is None else SkinnyConfig(RULE_BN, RULE_BK, split)
