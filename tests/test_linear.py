"""Which products the skinny split-K GEMM takes (kernels/linear.py), and the CPU path of `linear`."""
import torch

from kernels.linear import SKINNY_MAX_ROWS, linear, skinny_split


def test_skinny_split_rules():
    bf16 = torch.bfloat16
    # Qwen3-0.6B's projections at one row: wide outputs need no split, the 1024-wide ones split K 4 ways
    assert [skinny_split(1, n, k, bf16) for n, k in ((4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072))] \
        == [1, 4, 1, 4]
    assert skinny_split(1, 2048, 1024, bf16) == 2
    assert skinny_split(1, 1024, 128, bf16) == 1  # K too short to split
    assert skinny_split(SKINNY_MAX_ROWS, 1024, 2048, bf16) == 4
    assert skinny_split(SKINNY_MAX_ROWS + 1, 1024, 2048, bf16) is None  # cuBLAS wins on larger batches
    assert skinny_split(0, 1024, 2048, bf16) is None
    assert skinny_split(1, 1000, 2048, bf16) is None  # N not a multiple of the 64-row tile
    assert skinny_split(1, 1024, 1000, bf16) is None  # K not a multiple of the 128-column step
    assert skinny_split(1, 1024, 2048, torch.float32) is None


def test_linear_on_cpu_is_torch():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 256), torch.randn(128, 256), torch.randn(128)
    assert torch.equal(linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert torch.equal(linear(x, w), x @ w.t())
