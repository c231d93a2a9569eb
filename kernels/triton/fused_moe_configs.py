"""Block configs of the fused MoE kernel (kernels/triton/fused_moe.py): the tuned table for known shapes, and a
default by batch size for the rest. Keys: (experts per rank, hidden size, expert intermediate size); per
shape, (largest pair count, gate-up config, down config) rows in increasing order. Both GEMMs of a row share
BLOCK_M (they walk one expert-sorted order). `python -m engine.bench.moe --tune` regenerates rows on a GPU."""
from __future__ import annotations


def _c(bm: int, bn: int, bk: int, group_m: int = 1, warps: int = 4, stages: int = 4) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": warps, "num_stages": stages}


# tuned on Hopper (bf16; each shape says which GPU), see the README's MoE section for the measurements
TUNED: dict[tuple[int, int, int], list[tuple[int, dict, dict]]] = {
    # Qwen3-30B-A3B (128 experts, hidden 2048, intermediate 768): at 16..128 tokens the call reads the experts
    # its tokens hit at 91-95% of the copy bandwidth (README); the one-token row (the gate-up GEMM with SiLU in its
    # epilogue) with the experts rotated past the L2: 27.0 us, 67 %
    (128, 2048, 768): [
        (8, _c(16, 128, 128, 1, 4, 4), _c(16, 32, 128, 1, 4, 3)),
        (32, _c(16, 64, 128, 1, 4, 3), _c(16, 64, 128, 1, 4, 4)),
        (128, _c(16, 64, 128, 8, 4, 4), _c(16, 128, 128, 1, 4, 4)),
        (512, _c(16, 64, 128, 8, 4, 3), _c(16, 64, 128, 8, 4, 3)),
        (1024, _c(16, 128, 128, 1, 4, 4), _c(16, 128, 128, 1, 4, 3)),
        (2048, _c(32, 128, 128, 1, 4, 3), _c(32, 128, 64, 1, 4, 3)),
        (4096, _c(64, 128, 64, 1, 8, 3), _c(64, 128, 64, 8, 4, 4)),
        (16384, _c(64, 128, 64, 1, 4, 3), _c(64, 128, 64, 8, 4, 3)),
        (65536, _c(64, 128, 64, 8, 4, 4), _c(64, 128, 64, 1, 4, 3)),
    ],
    # Moonlight-16B-A3B / DeepSeek-V2-Lite (64 experts, hidden 2048, intermediate 1408), tuned on an H100: 88-96 %
    # of the copy bandwidth at 8..256 tokens; the one-token row on an H200 as Qwen3's: 33.0 us, 75 %
    (64, 2048, 1408): [
        (6, _c(16, 64, 128, 1, 4, 3), _c(16, 32, 128, 1, 4, 4)),
        (12, _c(16, 128, 128, 1, 4, 3), _c(16, 64, 64, 1, 8, 4)),
        (24, _c(16, 64, 256, 1, 4, 4), _c(16, 32, 128, 1, 4, 4)),
        (48, _c(32, 128, 128, 1, 4, 3), _c(32, 128, 128, 1, 4, 4)),
        (96, _c(16, 128, 128, 1, 4, 4), _c(16, 64, 128, 1, 4, 4)),
        (192, _c(16, 128, 128, 1, 4, 3), _c(16, 64, 128, 1, 4, 4)),
        (384, _c(16, 128, 128, 1, 4, 4), _c(16, 64, 128, 1, 4, 4)),
        (768, _c(32, 128, 128, 1, 4, 4), _c(32, 64, 128, 8, 4, 3)),
        (1536, _c(32, 128, 128, 1, 8, 3), _c(32, 128, 128, 8, 4, 3)),
        (3072, _c(64, 64, 128, 8, 4, 3), _c(64, 128, 64, 8, 8, 3)),
        (6144, _c(64, 128, 64, 8, 8, 3), _c(64, 128, 64, 8, 4, 4)),
        (12288, _c(64, 128, 64, 8, 4, 3), _c(64, 128, 64, 1, 4, 3)),
        (24576, _c(64, 128, 64, 8, 4, 3), _c(64, 128, 64, 8, 4, 3)),
    ],
}


def _with_shared(rows: list, top_k: int, shared: int) -> list:
    """A stack with `shared` always-on experts after the routed ones: the routed stack's rows at the same token
    counts (each token has top_k + shared pairs)."""
    return [(limit // top_k * (top_k + shared), up, down) for limit, up, down in rows]


# Moonlight with its two shared experts in the stacks (engine/layers/fused_moe.py): the one- and two-token rows
# tuned on an H200 with them (experts rotated past the L2: 40.8 us, 82 % / 67.7 us, 86 % of the copy bandwidth);
# the others are the routed stack's rows at the same token counts
TUNED[(66, 2048, 1408)] = [(8, _c(16, 64, 128, 1, 4, 3), _c(16, 128, 128, 1, 4, 4)),
                           (16, _c(16, 128, 64, 1, 4, 3), _c(16, 64, 64, 1, 4, 4))] + \
    _with_shared(TUNED[(64, 2048, 1408)], 6, 2)[2:]


def default_configs(pairs: int) -> tuple[dict, dict]:
    """Small batches: few pairs per expert, so a 16-row tile and wide K steps (the weights dominate); large
    batches: bigger tiles reuse each weight tile over more rows."""
    if pairs <= 256:
        return _c(16, 64, 128), _c(16, 64, 128)
    if pairs <= 4096:
        return _c(32, 64, 64, 8), _c(32, 64, 64, 8)
    return _c(64, 128, 64, 8, 8, 3), _c(64, 128, 64, 8, 8, 3)


# block-FP8 experts at decode batches (E4M3 weights, 128 x 128 block scales, the activations multiplied in fp16;
# the K step is the block's 128): pair counts past a shape's rows, and shapes not here, take the bf16 rows (their
# BLOCK_K replaced). Qwen3-30B-A3B's swept on an H200 (BLOCK_N and stages, experts rotated past the L2): half the
# bytes per K step want twice bf16's column tiles; 1 token 21.2 us, 128 tokens 180.5 us (80 % of the copy
# bandwidth, against bf16's 306.6 us). Moonlight's with its shared experts by `--tune` at 32 and 128 tokens
# (164.5 us, 79 % / 210.8 us, 66 %; bf16: 233.4 us), its one-token row Qwen3's.
TUNED_FP8: dict[tuple[int, int, int], list[tuple[int, dict, dict]]] = {
    (128, 2048, 768): [(16, _c(16, 64, 128, 1, 4, 4), _c(16, 64, 128, 1, 4, 4)),
                       (512, _c(16, 256, 128, 8, 4, 3), _c(16, 256, 128, 8, 4, 3)),
                       (2048, _c(16, 256, 128, 8, 4, 3), _c(16, 128, 128, 8, 4, 3))],
    (66, 2048, 1408): [(16, _c(16, 64, 128, 1, 4, 4), _c(16, 64, 128, 1, 4, 4)),
                       (256, _c(16, 256, 128, 1, 4, 3), _c(16, 128, 128, 8, 4, 3)),
                       (2048, _c(16, 128, 128, 8, 4, 3), _c(16, 256, 128, 1, 4, 3))],
}


def moe_configs(num_experts: int, hidden: int, intermediate: int, pairs: int,
                fp8: bool = False) -> tuple[dict, dict]:
    key = (num_experts, hidden, intermediate)
    for limit, up, down in TUNED_FP8.get(key, []) if fp8 else []:
        if pairs <= limit:
            return up, down
    rows = TUNED.get(key)
    if rows:
        for limit, up, down in rows:
            if pairs <= limit:
                return up, down
        return rows[-1][1], rows[-1][2]
    return default_configs(pairs)
