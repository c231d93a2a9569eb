"""One launch for many block copies: program (i, c) moves chunk c of block pair i as 32-bit words."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

WORDS = 4096  # 16 KB per program


@triton.jit
def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids, dst_ids, words_per_block, WORDS: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    mask = offs < words_per_block
    s = tl.load(src_ids + i).to(tl.int64) * words_per_block
    d = tl.load(dst_ids + i).to(tl.int64) * words_per_block
    tl.store(dst_ptr + d + offs, tl.load(src_ptr + s + offs, mask=mask), mask=mask)


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, runs) -> None:
    pairs = [(r + k, d + k) for r, d, n in runs for k in range(n)]
    ids = torch.tensor(pairs, dtype=torch.int32).T.contiguous().to(dst.device, non_blocking=True)
    words = dst[0].nbytes // 4
    grid = (len(pairs), triton.cdiv(words, WORDS))
    _copy_blocks_kernel[grid](src.view(src.shape[0], -1).view(torch.int32), dst.view(dst.shape[0], -1).view(torch.int32),
                              ids[0], ids[1], words, WORDS=WORDS)
